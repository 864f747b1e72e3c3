"""The built wheel carries its configs: ``sgsc-train`` runs from an unrelated folder after a non-editable install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_and_sgsc_train_runs_from_an_unrelated_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("lightning_sgsc-*.whl")
    site = tmp_path / "site"  # a non-editable install of the wheel alone; its dependencies come from this venv
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import lightning_sgsc.train as t; print(t.__file__, t.CONF_DIR)"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(site) for p in where)  # the installed copy, not the checkout
    run = subprocess.run(
        [str(site / "bin" / "sgsc-train"), "trainer.max_steps=2", "sgsc.preservation.warmup_epochs=0",
         "sgsc.preservation_size=16", "sgsc.preservation.pool=64"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = (work / "experiments" / "results" / "train").rglob("result.json")
    saved = json.loads(result.read_text())
    assert saved["run"] == "digits_cnn-safe-seed0" and saved["file_bytes"] > 0
