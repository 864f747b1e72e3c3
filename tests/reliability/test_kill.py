"""SIGKILLed mid-fit and resumed from last.ckpt, the shipped data modules end bit for bit where an uninterrupted fit
ends: the loader resumes its batch stream, the callback its state, and a check missed on an epoch's last batch runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _job(out: Path, kill_step: int = -1, resume: bool = False) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "tests.helpers.kill_job", str(out), str(kill_step), "resume" if resume else "fresh"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run = _job(out)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_step",
    # mid-epoch 0; epoch 0's last batch (last.ckpt before the set exists); epoch 1's last batch (before its feedback
    # check, which Lightning skips on resume: the callback catches it up); mid-epoch 2
    [17, 41, 81, 95],
)
def test_a_fit_killed_and_resumed_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, uninterrupted, kill_step):
    killed = _job(tmp_path, kill_step)
    assert killed.returncode == -9 and (tmp_path / "last.ckpt").exists(), killed.stderr[-2000:]
    resumed = _job(tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning about the loader
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    straight = uninterrupted["state"]
    different = [k for k in straight if not torch.equal(straight[k], final["state"][k])]
    assert not different, different
    assert final["history"] == uninterrupted["history"]
