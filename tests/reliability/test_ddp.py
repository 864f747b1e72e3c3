"""DDP with 2 CPU processes (gloo): every rank ends with the same quantizer state, masks, history and set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_end_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.helpers.ddp_job", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["history"] == r1["history"] and r0["indices"] == r1["indices"]
    assert r0["budget"] == r1["budget"] and r0["bit_weight"] == r1["bit_weight"]  # one controller for all ranks
    assert any(e["pruned"] or e["restored"] for e in r0["history"])
