"""Every command and code block in README.md runs as written (on tiny budgets: ``fast_dev_run``, fake Fashion-MNIST
files, two Optuna trials), so the README stays copy-paste runnable. ``make demo`` and ``make test`` are run by
tests/test_demo.py and CI."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.helpers.data import write_mnist_like

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    """Each shell command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _translated(command: str, tmp: Path, fashion: Path) -> list[str] | None:
    """The command as the test runs it (a tiny budget, files under ``tmp``), or ``None`` for the make targets."""
    words = shlex.split(command)
    tool, args = words[0], words[1:]
    if tool == "make":
        return None
    if tool == "sgsc-train":
        multirun = "-m" in args or any(a.startswith("sweep=") for a in args)
        extra = ["trainer.fast_dev_run=true", f"data.root={fashion}" if "experiment=fashion_cnn" in args else ""]
        extra.append(f"hydra.sweep.dir={tmp / 'sweeps' / str(len(list(tmp.glob('sweeps/*'))))}" if multirun else "")
        extra.append(f"hydra.run.dir={tmp / 'train' / 'run'}" if not multirun else "")
        if any(a == "sweep=optuna_front" for a in args):
            extra.append("hydra.sweeper.n_trials=2")
        return [sys.executable, "-m", "lightning_sgsc.train", *args, *(e for e in extra if e)]
    if tool == "sgsc-summarize":
        return [sys.executable, "-m", "lightning_sgsc.summarize", str(tmp / "sweeps")]
    if tool == "sgsc":
        extra = ["--trainer.fast_dev_run", "true"] if args[0] == "fit" else []
        return [sys.executable, "-m", "lightning_sgsc.cli", *args, *extra]
    raise AssertionError(f"a README command no test runs: {command!r}")


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    fashion = write_mnist_like(tmp_path / "fashion")
    _make_checkpoint(tmp_path / "last.ckpt")  # what `sgsc export last.ckpt` reads
    ran = 0
    for command in _commands():
        args = _translated(command, tmp_path, fashion)
        if args is None:
            continue
        run = _run(args, tmp_path)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
        ran += 1
    assert ran >= 7 and (tmp_path / "net.sgsc").exists() and (tmp_path / "sweeps" / "summary.md").exists()


def _make_checkpoint(path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_sgsc import SafetyGuidedQuantization
    from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule

    cb = SafetyGuidedQuantization(preservation_size=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent, callbacks=[cb],
    )  # fmt: skip
    trainer.fit(ClassifierModule(DigitsCNN()), DigitsDataModule())
    trainer.save_checkpoint(path)


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    import torch

    from lightning_sgsc import quantize_
    from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule

    monkeypatch.chdir(tmp_path)
    datamodule = DigitsDataModule()
    datamodule.setup()
    model = ClassifierModule(DigitsCNN())
    quantize_(model.net)
    namespace = {  # the names the README's snippets leave to the reader
        "datamodule": datamodule,
        "dataset": datamodule.train_set,
        "model": model,
        "MyNet": DigitsCNN,
        "example_inputs": datamodule.val_set.tensors[0][:4],
        "torch": torch,
    }
    blocks = _blocks("python")
    assert len(blocks) >= 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            block = block.replace("max_epochs=5", "max_epochs=1")
            exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "net.sgsc").exists() and (tmp_path / "net.onnx").exists()
