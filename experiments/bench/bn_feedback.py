"""The feedback loop on a BatchNorm network: does a restore fire only when accuracy was lost?

    python experiments/bench/bn_feedback.py [--epochs 40] [--seed 0]

A residual CNN with affine BatchNorm (tests/helpers/zoo.py) trains on digits with the demo's settings. At every
check the script prints what the loop saw (the preservation metric, measured after the BatchNorm statistics are
recalibrated) and did (restored, pruned), beside the test-split accuracy of the model the loop judged (before its
action), measured for this report only (the loop never sees it). Then the same with ``recalibrate_norms=False``,
the statistics as training left them. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.demo import DEMO_SETTINGS
from lightning_sgsc.examples import ClassifierModule, DigitsDataModule
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.settings import merge_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.zoo import ResidualBNCNN


class TestAccuracy(pl.Callback):
    """The test split's accuracy at each check, in the state the loop judges: placed before the compression callback,
    it recalibrates the BatchNorm statistics as the loop is about to (when the loop does) and measures before the
    loop restores or prunes anything. For the report only; the loop never sees it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sgsc: SafetyGuidedQuantization) -> None:
        self.x, self.y, self.sgsc = x, y, sgsc
        self.acc: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            if self.sgsc.settings.preservation.recalibrate_norms:
                self.sgsc.preservation.recalibrate(pl_module)  # what the loop's measurement does first
            self.acc[trainer.current_epoch] = float((pl_module(self.x).argmax(-1) == self.y).float().mean())
        pl_module.train(was)


def run(epochs: int, seed: int, recalibrate: bool) -> list[dict[str, Any]]:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    data.setup("test")
    module = ClassifierModule(ResidualBNCNN(), lr=3e-3)
    norms = {"preservation": {"recalibrate_norms": recalibrate}}
    cb = SafetyGuidedQuantization(seed=seed, **merge_settings(DEMO_SETTINGS, norms))
    x, y = data.test_set.tensors
    report = TestAccuracy(x, y, sgsc=cb)
    quiet_trainer(epochs, [report, cb]).fit(module, data)
    keys = ("epoch", "metric", "reference", "action", "restored", "pruned")
    return [{k: event[k] for k in keys} | {"test_acc": report.acc[event["epoch"]]} for event in cb.history]


def unjustified(checks: list[dict[str, Any]]) -> tuple[int, int]:
    """Checks that restored channels while the test accuracy had not dropped: since the previous check, and since
    the check whose metric the loop compared with (its reference)."""
    since_previous = since_reference = 0
    for i, check in enumerate(checks):
        if not check["restored"] or i == 0:
            continue
        since_previous += check["test_acc"] >= checks[i - 1]["test_acc"]
        ref = next((c for c in reversed(checks[:i]) if c["metric"] == check["reference"]), checks[i - 1])
        since_reference += check["test_acc"] >= ref["test_acc"]
    return since_previous, since_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = {}
    for recalibrate in (True, False):
        checks = run(args.epochs, args.seed, recalibrate)
        key = "recalibrated" if recalibrate else "as_trained"
        out[key] = checks
        moves = [abs(b["metric"] - a["metric"]) for a, b in itertools.pairwise(checks)]
        restores = [c for c in checks if c["restored"]]
        previous, reference = unjustified(checks)
        print(
            f"{key}: {len(checks)} checks, largest move of the metric between checks {100 * max(moves):.1f} points,"
            f" {len(restores)} checks restored ({sum(c['restored'] for c in checks)} channels); restores while the"
            f" test accuracy had not dropped: {previous} since the previous check, {reference} since the loop's"
            f" reference check; final test accuracy {100 * checks[-1]['test_acc']:.2f} %"
        )
        for c in checks:
            print(
                f"  epoch {c['epoch']:>2}: metric {c['metric']:.4f} {c['action']:>7} restored {c['restored']:>3}"
                f" pruned {c['pruned']:>3} test acc {c['test_acc']:.4f}"
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
