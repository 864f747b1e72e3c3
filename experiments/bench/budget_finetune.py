"""The demo's budget recipe on the two experiments: train float, then fine-tune a copy within ``max_drop`` of it.

    OMP_NUM_THREADS=1 python experiments/bench/budget_finetune.py --task fashion_cnn --seed 0 --max-drop 0.003,0.01,0.03
    OMP_NUM_THREADS=1 python experiments/bench/budget_finetune.py --task names_transformer --seed 0 --max-drop 0.02
    OMP_NUM_THREADS=1 python experiments/bench/budget_finetune.py --task names_gpt2 --seed 0 --max-drop 0.02

A float model trains ``--steps`` steps with the experiment's setup (``fashion_cnn``: FashionCNN, batch 64, AdamW 1e-3,
validation every 1,000 steps, budget on ``val/acc``; ``names_transformer``: CharTransformer, batch 16, AdamW 1e-3 with
weight decay 0.01, validation every 500 steps, budget on ``val/loss``, mode min; ``names_gpt2``: the same with
transformers' GPT2LMHeadModel at that size, 4 layers, 4 heads, n_embd 64, its head tied to the embedding). Its
validation value is the budget's reference. For each ``--max-drop`` a copy of it is then fine-tuned for ``--steps``
more steps under that budget, no preservation set, the last quarter a cool-down (the demo's budget). The test split is
read once per model, at the end. Fashion needs ``apt-get install -y dataset-fashion-mnist``; names reads
``../shared/data/names.txt``. ``--max-drop fixed`` fine-tunes the same copy under the fixed penalty instead
(``bit_weight`` 0.5, no budget), and ``float`` without compression (the float model trained as long as the fine-
tunes): the comparisons. One line per model, and one JSON file per budget in ``--out`` (when given).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.demo import DEMO_BUDGET, DEMO_SETTINGS
from lightning_sgsc.examples import (
    CharTransformer,
    ClassifierModule,
    FashionCNN,
    IDXImageDataModule,
    LanguageModule,
    NamesDataModule,
    gpt2_lm,
)
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed
from lightning_sgsc.settings import merge_settings

TASKS: dict[str, dict[str, Any]] = {
    "fashion_cnn": dict(
        data=lambda seed: IDXImageDataModule(root="/usr/share/datasets/fashion-mnist", batch_size=64, seed=seed),
        module=lambda: ClassifierModule(FashionCNN(), lr=1e-3),
        every=1000,
        metric="acc",
        mode="max",
    ),
    "names_transformer": dict(
        data=lambda seed: NamesDataModule(path="../shared/data/names.txt", block_size=32, batch_size=16, seed=seed),
        module=lambda: LanguageModule(CharTransformer(), lr=1e-3, weight_decay=0.01),
        every=500,
        metric="loss",
        mode="min",
    ),
    "names_gpt2": dict(  # transformers' GPT2LMHeadModel, 4 layers, 4 heads, n_embd 64, tied head
        data=lambda seed: NamesDataModule(path="../shared/data/names.txt", block_size=32, batch_size=16, seed=seed),
        module=lambda: LanguageModule(gpt2_lm(), lr=1e-3, weight_decay=0.01),
        every=500,
        metric="loss",
        mode="min",
    ),
}


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.2f} %" if metric == "acc" else f"{value:.4f} nats"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fashion_cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-drop",
        default="0.003",
        help="comma-separated budgets in the metric's units; 'fixed': no budget; 'float': no compression",
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="folder for <task>-md<max_drop>-seed<N>.json")
    args = parser.parse_args()
    task = TASKS[args.task]
    metric = task["metric"]
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    every = min(task["every"], args.steps)
    schedule = dict(max_steps=args.steps, val_check_interval=every, check_val_every_n_epoch=None)
    pl.seed_everything(args.seed, verbose=False)
    data = task["data"](args.seed)
    plain = task["module"]()
    trainer = quiet_trainer(-1, [], **schedule)
    trainer.fit(plain, data)
    float_val = trainer.validate(plain, data, verbose=False)[0][f"val/{metric}"]
    float_test = trainer.test(plain, data, verbose=False)[0][f"test/{metric}"]
    float32 = 4 * sum(p.numel() for p in plain.net.parameters())
    print(f"{args.task} seed {args.seed}: float {_value(metric, float_test)} (val {_value(metric, float_val)})")

    for label in args.max_drop.split(","):
        pl.seed_everything(args.seed, verbose=False)
        small = copy.deepcopy(plain)
        max_drop = None if label in ("fixed", "float") else float(label)
        if max_drop is None:  # the same fine-tune under the fixed penalty (bit_weight 0.5), no budget, for comparison
            budget: dict[str, Any] = {"preservation": {"size": 0}}
        else:
            target = {
                "max_drop": max_drop,
                "reference_value": float_val,
                "monitor": f"val/{metric}",
                "mode": task["mode"],
            }
            budget = merge_settings(DEMO_BUDGET, {"budget": target})
        headroom = {"quantization": {"init_headroom": None}}  # the experiment's headroom (2 bits)
        settings = merge_settings(DEMO_SETTINGS, budget, headroom)
        callback = None if label == "float" else SafetyGuidedQuantization(seed=args.seed, **settings)
        trainer = quiet_trainer(-1, [callback] if callback else [], **schedule)
        trainer.fit(small, data)
        val = trainer.validate(small, data, verbose=False)[0][f"val/{metric}"]
        test = trainer.test(small, data, verbose=False)[0][f"test/{metric}"]
        nbytes = float32
        if callback is not None:
            with tempfile.TemporaryDirectory() as tmp:
                nbytes = export_compressed(small.net, Path(tmp) / "model.sgsc")
        diff = 100 * (test - float_test) if metric == "acc" else test - float_test
        result = {
            "task": args.task,
            "seed": args.seed,
            "max_drop": max_drop,
            "metric": f"test/{metric}",
            "float_val": float_val,
            "float_test": float_test,
            "val": val,
            "test": test,
            "diff": diff,
            "diff_units": "points" if metric == "acc" else "nats",
            "bytes": nbytes,
            "float32_bytes": float32,
            "fraction": nbytes / float32,
            "budget": callback.budget_summary() if callback else None,
        }
        print(
            f"  max_drop {label}: {_value(metric, test)} (val {_value(metric, val)}), {diff:+.4g}"
            f" {result['diff_units']}, {nbytes:,} B ({100 * result['fraction']:.2f} %)",
            flush=True,
        )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{args.task}-md{label}-seed{args.seed}.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
