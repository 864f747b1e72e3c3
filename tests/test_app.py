"""The Hydra app as users run it: a multirun keeps every job, a sweeper tunes on validation, the user's own model and
callbacks run through it, ``--cfg job`` documents every setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedMixin

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "sgsc.preservation_size=0",
]


def _app(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lightning_sgsc.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]


@pytest.mark.slow
def test_a_budget_sweep_keeps_every_job_and_the_summary_draws_them(tmp_path):
    sweep = tmp_path / "front"
    run = _app(
        "-m", "sgsc=budget", "sgsc.max_drop=0.003,0.01,0.03", "sgsc.budget.warmup_checks=1", *TINY,
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(sweep)
    assert sorted(r["config"]["sgsc"]["max_drop"] for r in results) == [0.003, 0.01, 0.03]
    assert len({r["output_dir"] for r in results}) == 3  # one folder each: nothing overwritten
    for r in results:
        folder = Path(r["output_dir"])
        assert (folder / "model.sgsc").exists() and (folder / "logs" / "metrics.csv").exists()
        assert (folder / "train.log").read_text().count("[sgsc-train]") == 1  # the job's one line, in its log
    assert run.stdout.count("[sgsc-train]") == 3
    from lightning_sgsc import summarize

    summarize.main([str(sweep)])
    table = (sweep / "summary.md").read_text()
    assert all(f"| {d} |" in table for d in ("0.003", "0.01", "0.03")) and (sweep / "front.png").exists()


@pytest.mark.slow
def test_an_optuna_sweep_keeps_every_trial_and_optimises_a_validation_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    run = _app("-m", "sweep=optuna_front", "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(sweep)
    assert len(results) == 3 and len({r["output_dir"] for r in results}) == 3
    assert all(r["config"]["optimized_metric"] == ["val_metric", "file_bytes"] for r in results)
    import yaml

    optimization = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    front = [tuple(s["values"]) for s in optimization["solutions"]]  # the Pareto front of (val metric, bytes)
    assert front and set(front) <= {(r["val_metric"], r["file_bytes"]) for r in results}


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UserModel(SafetyGuidedMixin, pl.LightningModule):
    """A user's own model, defined outside the package: it logs val/f1-like metric under its own name, no test step,
    and keeps its network as `mlp`."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.mlp, self.lr = UserNet(), lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/score", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class UserData(pl.LightningDataModule):
    def __init__(self, n: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 6, generator=g)
        self.data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64)


@pytest.mark.slow
def test_the_users_own_model_data_and_checkpoint_callback_run_through_the_app(tmp_path):
    out = tmp_path / "job"
    run = _app(
        "model._target_=tests.test_app.UserModel", "~model.net", "model.lr=0.02", "~model.weight_decay",
        "data._target_=tests.test_app.UserData", "~data.batch_size", "~data.val_fraction", "~data.test_fraction",
        "~data.seed", "metric=val/score", "net=mlp", "trainer.max_epochs=2", "sgsc.preservation_size=0",
        "trainer.callbacks=[{_target_: lightning.pytorch.callbacks.ModelCheckpoint, monitor: val/score, mode: max}]",
        f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = _results(out)
    assert result["val_metric_name"] == "val/score" and "test_metric" not in result  # no test step: none read
    assert list(out.rglob("*.ckpt")), "the user's ModelCheckpoint wrote its file into the job's folder"
    from lightning_sgsc import load_compressed

    loaded = load_compressed(out / "model.sgsc", UserNet())  # `net=mlp`: the network exported
    assert isinstance(loaded, UserNet)


def test_cfg_job_shows_every_callback_setting_with_its_help(tmp_path):
    from lightning_sgsc.config import SETTINGS, field_help

    run = _app("--cfg", "job", "sgsc=budget", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    text = " ".join(run.stdout.split())
    for group, cls in SETTINGS.items():
        for field, help_text in field_help(cls).items():
            if field not in ("data", "source", "output_fn"):
                assert f"{field}:" in text and " ".join(help_text.split()[:4]) in text, (group, field)
    assert "optimized_metric: val_metric" in text and "max_drop: 0.01 # shortcut for budget.max_drop" in text


def test_a_test_metric_is_refused_as_what_a_sweeper_optimises():
    from lightning_sgsc import SGSCValueError
    from lightning_sgsc.train import objective

    result = {"val_metric": 0.9, "test_metric": 0.91, "file_bytes": 1000}
    assert objective(result, "val_metric") == 0.9 and objective(result, ["val_metric", "file_bytes"]) == (0.9, 1000.0)
    with pytest.raises(SGSCValueError, match=r"`optimized_metric` must be a validation metric or the file's bytes"):
        objective(result, "test_metric")
