"""One fit under a budget from scratch beside the two-step recipe, for the same seed and the same total steps.

    OMP_NUM_THREADS=1 python experiments/bench/budget_one_fit.py --task fashion_cnn --seed 0 --max-drop 0.01 \
        --out experiments/results/budget/one_fit
    OMP_NUM_THREADS=1 python experiments/bench/budget_one_fit.py --task names_transformer --seed 0 --max-drop 0.02

Per seed, with ``budget_finetune.py``'s setups (``--task``) and ``--steps`` S (default 10,000):

* **float**: the model trains 2 S steps without compression; its state at S steps is kept (the two-step's start).
* **two-step**: the float model at S steps, fine-tuned S more steps within ``--max-drop`` of its validation value
  (``reference_value``), the last quarter a cool-down: ``budget_finetune.py``'s recipe.
* **one fit**: a fresh model trains 2 S steps with the callback's budget arguments only (``max_drop``, ``monitor``,
  ``mode``, ``cooldown_fraction`` 0.125, as the two-step's cool-down steps; no reference): size term off until the
  validation metric's plateau, then compressing within the budget, then the cool-down.

Both are judged on test against the float model trained 2 S steps (the two-step also against its start). The test
split is read once per model, at the end. One line per model; ``--out``: one JSON file per seed.

    python experiments/bench/budget_one_fit.py --summary experiments/results/budget/one_fit   # the table, per seed

``--summary`` reads those files and prints, per task and budget, each seed and the means (no training).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from budget_finetune import TASKS

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.demo import DEMO_BUDGET, DEMO_SETTINGS
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed
from lightning_sgsc.settings import merge_settings


class _StateAt(pl.Callback):
    """Keeps a copy of the module's state dict at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and self.state is None:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _evaluate(module: pl.LightningModule, data: Any, metric: str, callback: Any = None) -> dict[str, Any]:
    trainer = quiet_trainer(-1, [])
    val = trainer.validate(module, data, verbose=False)[0][f"val/{metric}"]
    test = trainer.test(module, data, verbose=False)[0][f"test/{metric}"]
    net: torch.nn.Module = module.net  # type: ignore[assignment]
    nbytes = 4 * sum(p.numel() for p in net.parameters())
    if callback is not None:
        with tempfile.TemporaryDirectory() as tmp:
            nbytes = export_compressed(net, Path(tmp) / "model.sgsc")
    return {"val": float(val), "test": float(test), "bytes": nbytes}


def summarize(folder: Path) -> None:
    """Per task and budget: each seed's change against the float model trained as long, and the means."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*-md*-seed*.json")):
        r = json.loads(path.read_text())
        groups.setdefault((r["task"], r["max_drop"]), []).append(r)
    if not groups:
        raise SystemExit(f"`--summary` must name a folder of budget_one_fit.py results, got {str(folder)!r}.")
    for (task, max_drop), runs in sorted(groups.items()):
        acc = TASKS[task]["metric"] == "acc"
        scale, unit, digits = (100, "points", 2) if acc else (1, "nats", 4)
        print(f"{task}, max_drop {max_drop:g}, seeds {[r['seed'] for r in runs]} (change of test {unit} against float)")
        for name, label in (("float_half", "float, S steps"), ("two_step", "two-step"), ("one_fit", "one fit")):
            changes = [scale * (r[name]["test"] - r["float"]["test"]) for r in runs]
            sizes = [r[name]["bytes"] for r in runs]
            cells = ", ".join(f"{c:+.{digits}f} at {b / 1000:.1f} KB" for c, b in zip(changes, sizes, strict=True))
            fraction = statistics.mean(b / r["float32_bytes"] for b, r in zip(sizes, runs, strict=True))
            print(
                f"  {label:>14}: {cells}; mean {statistics.mean(changes):+.{digits}f} {unit} at"
                f" {statistics.mean(sizes) / 1000:.1f} KB ({100 * fraction:.2f} % of float32)"
            )
        floats = ", ".join(f"{scale * r['float']['test']:.{digits}f}" for r in runs)
        print(f"  float, 2 S steps, test: {floats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=None, help="print the table of a results folder and stop")
    parser.add_argument("--task", choices=sorted(TASKS), default="fashion_cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=10_000, help="S: the two-step's float and fine-tune steps")
    parser.add_argument("--out", type=Path, default=None, help="folder for <task>-md<max_drop>-seed<N>.json")
    args = parser.parse_args()
    if args.summary is not None:
        return summarize(args.summary)
    task, steps = TASKS[args.task], args.steps
    metric = task["metric"]
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    every = min(task["every"], steps)
    schedule = dict(val_check_interval=every, check_val_every_n_epoch=None)
    monitor = {"monitor": f"val/{metric}", "mode": task["mode"], "max_drop": args.max_drop}
    headroom = {"quantization": {"init_headroom": None}}  # the experiment's headroom (2 bits), as budget_finetune
    result: dict[str, Any] = {"task": args.task, "seed": args.seed, "max_drop": args.max_drop, "steps": steps}

    def fit(module: pl.LightningModule, max_steps: int, callbacks: list[pl.Callback]) -> float:
        pl.seed_everything(args.seed, verbose=False)
        began = time.perf_counter()
        quiet_trainer(-1, callbacks, max_steps=max_steps, **schedule).fit(module, task["data"](args.seed))
        return time.perf_counter() - began

    # float, 2 S steps, its state at S kept
    data = task["data"](args.seed)
    pl.seed_everything(args.seed, verbose=False)
    plain, at = task["module"](), _StateAt(steps)
    seconds = fit(plain, 2 * steps, [at])
    result["float"] = {**_evaluate(plain, data, metric), "seconds": seconds}
    start = task["module"]()
    assert at.state is not None
    start.load_state_dict(at.state)
    result["float_half"] = _evaluate(start, data, metric)

    # two-step: the float model at S, fine-tuned S steps within max_drop of its validation value
    budget = {"budget": {**monitor, "reference_value": result["float_half"]["val"]}}
    settings = merge_settings(DEMO_SETTINGS, DEMO_BUDGET, budget, headroom)
    callback = SafetyGuidedQuantization(seed=args.seed, **settings)
    small = copy.deepcopy(start)
    seconds = fit(small, steps, [callback])
    result["two_step"] = {**_evaluate(small, data, metric, callback), "seconds": seconds}
    result["two_step"]["budget"] = callback.budget_summary()

    # one fit from scratch, 2 S steps, the budget's arguments only
    budget = {"budget": {**monitor, "warmup_checks": 1, "cooldown_fraction": 0.125}}
    settings = merge_settings(DEMO_SETTINGS, DEMO_BUDGET, budget, headroom)
    callback = SafetyGuidedQuantization(seed=args.seed, **settings)
    pl.seed_everything(args.seed, verbose=False)
    fresh = task["module"]()
    seconds = fit(fresh, 2 * steps, [callback])
    result["one_fit"] = {**_evaluate(fresh, data, metric, callback), "seconds": seconds}
    result["one_fit"]["budget"] = callback.budget_summary()
    result["float32_bytes"] = result["float"]["bytes"]

    for name in ("float_half", "float", "two_step", "one_fit"):
        r = result[name]
        diff = r["test"] - result["float"]["test"]
        acc = metric == "acc"
        shown = f"{100 * r['test']:.2f} % ({100 * diff:+.2f} points)" if acc else f"{r['test']:.4f} nats ({diff:+.4f})"
        extra = ""
        if name == "one_fit":
            b = r["budget"]
            extra = f", reference {b['reference']:.4f} fixed at step {b['reference_step']}"
        print(f"{args.task} seed {args.seed} {name:>10}: {shown}, {r['bytes']:,} B{extra}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.task}-md{args.max_drop:g}-seed{args.seed}.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
