"""The demo's budget recipe on Fashion-MNIST: train float, then fine-tune a copy within ``max_drop`` of its val/acc.

    OMP_NUM_THREADS=1 python experiments/bench/budget_fashion.py --seed 0 [--max-drop 0.003] [--steps 10000]

A float FashionCNN trains ``--steps`` steps (batch 64, AdamW 1e-3, validation every 1,000 steps: the fashion_cnn
experiment's setup); its validation accuracy is the budget's reference. A copy is then fine-tuned for ``--steps``
more steps with ``max_drop`` on ``val/acc``, no preservation set, the last quarter a cool-down (the demo's budget).
The test split is read once per model, at the end. Needs ``apt-get install -y dataset-fashion-mnist``. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.demo import DEMO_BUDGET, DEMO_SETTINGS
from lightning_sgsc.examples import ClassifierModule, FashionCNN, IDXImageDataModule
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed

ROOT = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drop", type=float, default=0.003)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    schedule = dict(max_steps=args.steps, val_check_interval=min(1000, args.steps), check_val_every_n_epoch=None)
    pl.seed_everything(args.seed, verbose=False)
    data = IDXImageDataModule(root=ROOT, batch_size=64, seed=args.seed)
    plain = ClassifierModule(FashionCNN(), lr=1e-3)
    trainer = quiet_trainer(-1, [], **schedule)
    trainer.fit(plain, data)
    float_val = trainer.validate(plain, data, verbose=False)[0]["val/acc"]
    float_test = trainer.test(plain, data, verbose=False)[0]["test/acc"]

    pl.seed_everything(args.seed, verbose=False)
    small = copy.deepcopy(plain)
    budget = {**DEMO_BUDGET, "max_drop": args.max_drop, "reference_value": float_val}
    settings = {**DEMO_SETTINGS, **budget, "init_headroom": None}  # the experiment's headroom (2 bits)
    callback = SafetyGuidedQuantization(seed=args.seed, **settings)
    trainer = quiet_trainer(-1, [callback], **schedule)
    trainer.fit(small, data)
    val = trainer.validate(small, data, verbose=False)[0]["val/acc"]
    test = trainer.test(small, data, verbose=False)[0]["test/acc"]
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = export_compressed(small.net, Path(tmp) / "fashion.sgsc")
    float32 = 4 * sum(p.numel() for p in plain.net.parameters())
    result = {
        "seed": args.seed,
        "max_drop": args.max_drop,
        "float_val": float_val,
        "float_test": float_test,
        "val": val,
        "test": test,
        "diff_points": 100 * (test - float_test),
        "bytes": nbytes,
        "fraction": nbytes / float32,
        "budget": callback.budget.summary(),
    }
    print(
        f"seed {args.seed}: float {100 * float_test:.2f} % (val {100 * float_val:.2f}) -> {100 * test:.2f} %"
        f" (val {100 * val:.2f}), {result['diff_points']:+.2f} points, {nbytes:,} B ({100 * result['fraction']:.2f} %)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
