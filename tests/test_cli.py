"""The LightningCLI entry point, through a subprocess as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS_FIT = (
    "fit",
    "--model",
    "lightning_sgsc.examples.ClassifierModule",
    "--model.net",
    "lightning_sgsc.examples.DigitsCNN",
    "--data",
    "lightning_sgsc.examples.DigitsDataModule",
    "--trainer.callbacks+=lightning_sgsc.SafetyGuidedQuantization",
)


def _sgsc(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lightning_sgsc.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_fit_with_the_callback_from_flags(tmp_path):
    run = _sgsc(
        *DIGITS_FIT,
        "--trainer.callbacks.init_bits=4",
        "--trainer.callbacks.budget.max_drop=0.01",  # a budget, from nested flags as every other setting
        "--trainer.callbacks.budget.monitor=val/acc",
        "--trainer.callbacks.budget.mode=max",
        "--trainer.callbacks.feedback.threshold=0.01",
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[sgsc] at 4 bits, quantized 3 layers" in run.stderr + run.stdout


@pytest.mark.slow
def test_fit_with_the_callback_from_yaml(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        """
model:
  class_path: lightning_sgsc.examples.ClassifierModule
  init_args:
    net: {class_path: lightning_sgsc.examples.DigitsCNN, init_args: {width: 8}}
data:
  class_path: lightning_sgsc.examples.DigitsDataModule
trainer:
  accelerator: cpu
  fast_dev_run: true
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_sgsc.SafetyGuidedQuantization
      init_args:
        init_bits: 6
        bit_weight: 0.2
        exclude: ["net.fc"]
        budget: {max_drop: 0.02, monitor: val/loss, mode: min, cooldown_fraction: 0.25}
"""
    )
    run = _sgsc("fit", "--config", "cfg.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[sgsc] at 6 bits, quantized 2 layers" in run.stderr + run.stdout


def test_bad_callback_argument_is_reported(tmp_path):
    run = _sgsc(
        *DIGITS_FIT,
        "--trainer.callbacks.init_bits=40",
        "--trainer.fast_dev_run=true",
        cwd=tmp_path,
    )
    assert run.returncode != 0
    assert "`quantization.init_bits` must be in [2, 16], got 40" in run.stderr


def test_the_callbacks_help_shows_every_setting_with_its_help_from_the_settings_docstrings(tmp_path):
    run = _sgsc("fit", "--trainer.callbacks.help", "lightning_sgsc.SafetyGuidedQuantization", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    from lightning_sgsc.config import SETTINGS, field_help

    for group, cls in SETTINGS.items():
        for field, text in field_help(cls).items():
            if field in ("data", "source", "output_fn"):
                continue  # datasets: given in Python
            assert f"--trainer.callbacks.{group}.{field} " in run.stdout, (group, field)
            assert " ".join(text.split()[:3]) in " ".join(run.stdout.split()), (group, field)
