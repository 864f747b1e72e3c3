"""The budget on the same front as the peers: each method fine-tunes the same float FashionCNN for the same steps.

    OMP_NUM_THREADS=1 python experiments/bench/budget_peers.py --seeds 0,1,2 --jobs 2
    python experiments/bench/budget_peers.py --summary experiments/results/budget/peers   # table, check, front.png

Per seed, the float model is ``budget_finetune.py``'s (``--steps`` S steps of FashionCNN on Fashion-MNIST, batch 64,
AdamW 1e-3, that seed), trained once and kept in ``--cache``; every point below starts from a copy of it and
fine-tunes S more steps, validation every 1,000 steps, then is sized as the file it would ship and tested once:

* ``sgsc``: ours, the budget (``max_drop`` 0.003 / 0.01 / 0.03 of the float model's validation accuracy,
  ``reference_value``), ``budget_finetune.py``'s recipe; bytes of :func:`lightning_sgsc.export_compressed`'s file.
* ``diffq``: DiffQ (``pip install diffq``; non-commercial licence, a dev-only peer) with its size penalty λ·MB, group
  size 8, every weight quantized; bytes of its packed quantized state pickled (``packed_model_size``'s measure).
* ``brevitas``: Brevitas per-channel weight QAT at 8 / 4 / 2 bits (float scales, activations float); bytes: weights
  bit-packed at that width + float32 scales and biases.
* ``torchao``: torchao QAT weight fake-quant on the Linear layers (torchao's QAT swaps no Conv2d, so the convolutions
  ship float32): ``8`` int8 per channel, ``4`` int4 in groups of 32, symmetric; bytes: packed integers + float32
  scales + biases + the float32 convolutions.
* ``pruning``: Lightning's ``ModelPruning`` (global L1 unstructured, two steps in the first two epochs) to the given
  sparsity, then int8 per-channel weight post-training quantization; bytes: one-bit occupancy mask + int8
  non-zeros + float32 scales and biases.

One JSON file per run (``<method>-<setting>-seed<N>.json``), written as it ends, so that a stopped sweep keeps what
ran; a run whose file is already in ``--out`` is not run again (the sweep resumes). The float models are trained
first, one job per seed; then the runs, seed by seed, the longest (ours) first. ``--summary`` reads the files: the
means over the seeds each point ran, per seed, the check that every peer point is matched or beaten by one of ours
(no more bytes, no less accuracy: ``peers.py``'s check), the ratio of bytes at the most accurate peer point's
accuracy, and the front plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import os
import pickle
import platform
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from budget_finetune import TASKS
from peers import DiffQModule, aggregate, dominated_check, markdown, parse_seeds, pruned_int8_bytes
from torch import nn

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.demo import DEMO_BUDGET, DEMO_SETTINGS
from lightning_sgsc.examples import ClassifierModule
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed
from lightning_sgsc.settings import merge_settings

POINTS: dict[str, list[float]] = {
    "sgsc": [0.003, 0.01, 0.03],  # max_drop (accuracy, as a fraction)
    "diffq": [2.0, 10.0, 50.0],  # λ per MB
    "brevitas": [8, 4, 2],  # bits
    "torchao": [8, 4],  # bits: int8 per channel, int4 in groups of 32
    "pruning": [0.8, 0.95],  # final sparsity, then int8
}
LAYERS = ("conv1", "conv2", "fc1", "fc2")
TASK = TASKS["fashion_cnn"]
EVERY = 1000


# ------------------------------------------------------------------------------------------------ the float model


def float_model(seed: int, steps: int, cache: Path) -> tuple[ClassifierModule, dict[str, float]]:
    """``budget_finetune.py``'s float model of ``seed`` and its validation/test accuracy, trained once per cache."""
    path = cache / f"fashion_cnn-seed{seed}-steps{steps}.pt"
    pl.seed_everything(seed, verbose=False)  # before the module: its initial weights are the seed's
    data = TASK["data"](seed)
    module = TASK["module"]()
    if path.exists():
        saved = torch.load(path, weights_only=True)
        module.load_state_dict(saved["state"])
        return module, saved["scores"]
    trainer = quiet_trainer(-1, [], max_steps=steps, val_check_interval=min(EVERY, steps), check_val_every_n_epoch=None)
    trainer.fit(module, data)
    scores = {
        "val": float(trainer.validate(module, data, verbose=False)[0]["val/acc"]),
        "test": float(trainer.test(module, data, verbose=False)[0]["test/acc"]),
    }
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # whole or absent: a reader never sees half a file
    torch.save({"state": module.state_dict(), "scores": scores}, partial)
    partial.replace(path)
    return module, scores


# --------------------------------------------------------------------------------------------------------- methods


def _ours(start: ClassifierModule, max_drop: float, seed: int, reference: float) -> tuple[Any, list[Any], Any]:
    target = {"max_drop": max_drop, "reference_value": reference, "monitor": "val/acc", "mode": "max"}
    headroom = {"quantization": {"init_headroom": None}}  # budget_finetune.py's (2 bits)
    settings = merge_settings(DEMO_SETTINGS, merge_settings(DEMO_BUDGET, {"budget": target}), headroom)
    callback = SafetyGuidedQuantization(seed=seed, **settings)

    def size(model: ClassifierModule) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return export_compressed(model.net, Path(tmp) / "model.sgsc")

    return start, [callback], size


def _diffq(start: ClassifierModule, penalty: float) -> tuple[Any, list[Any], Any]:
    module = DiffQModule(penalty, start.net)

    def size(model: DiffQModule) -> int:
        return len(pickle.dumps(model.quantizer.get_quantized_state(packed=True)))

    return module, [], size


def _brevitas(start: ClassifierModule, setting: float) -> tuple[Any, list[Any], Any]:
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    bits = int(setting)
    kw = dict(weight_bit_width=bits, weight_quant=Int8WeightPerChannelFloat)
    net: Any = start.net
    for name in LAYERS:  # the float layers' shapes and weights
        old = getattr(net, name)
        if isinstance(old, nn.Conv2d):
            new = qnn.QuantConv2d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, **kw)
        else:
            new = qnn.QuantLinear(old.in_features, old.out_features, bias=True, **kw)
        new.load_state_dict(old.state_dict(), strict=False)  # weight and bias; the quantizer's scale comes from them
        setattr(net, name, new)

    def size(model: ClassifierModule) -> int:
        total = 0
        for name in LAYERS:
            layer: Any = getattr(model.net, name)
            q = layer.quant_weight()
            total += math.ceil(q.int().numel() * bits / 8) + 4 * q.scale.numel() + 4 * layer.bias.numel()
        return total

    return start, [], size


def torchao_bytes(net: nn.Module, bits: int, group: int | None) -> int:
    """What torchao's QAT model ships: each Linear's weights packed at ``bits`` + a float32 scale per row (``group``
    None) or per group of ``group`` columns (symmetric: no zero point) + float32 biases; every other layer float32."""
    total = 0
    for layer in net.modules():
        if isinstance(layer, nn.Linear):
            rows, cols = layer.weight.shape
            scales = rows * (1 if group is None else math.ceil(cols / group))
            total += math.ceil(layer.weight.numel() * bits / 8) + 4 * scales
            total += 0 if layer.bias is None else 4 * layer.bias.numel()
        elif not list(layer.children()):  # a leaf torchao's QAT leaves float (Conv2d here)
            total += 4 * sum(p.numel() for p in layer.parameters(recurse=False))
    return total


def _torchao(start: ClassifierModule, setting: float) -> tuple[Any, list[Any], Any]:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    bits = int(setting)
    if bits == 8:
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
        group = None
    else:
        group = 32
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=group)  # type: ignore[attr-defined]
    quantize_(start.net, QATConfig(weight_config=weight, step="prepare"))

    def size(model: ClassifierModule) -> int:
        return torchao_bytes(model.net, bits, group)

    return start, [], size


def _pruning(start: ClassifierModule, sparsity: float) -> tuple[Any, list[Any], Any]:
    from lightning.pytorch.callbacks import ModelPruning

    step = 1.0 - math.sqrt(1.0 - sparsity)  # two pruning steps reach the final sparsity
    pruning = ModelPruning(
        "l1_unstructured", amount=lambda epoch: step if epoch < 2 else 0.0, use_global_unstructured=True, verbose=0
    )

    return start, [pruning], pruned_int8_bytes


def available(method: str) -> bool:
    if method in ("sgsc", "pruning"):
        return True
    try:
        __import__(method)
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------- runs


def run_one(method: str, setting: float, seed: int, steps: int, cache: Path, out: Path) -> dict[str, Any]:
    """One point of one seed: a copy of the float model fine-tuned ``steps`` steps, sized, tested; written to
    ``out`` as it ends."""
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    plain, scores = float_model(seed, steps, cache)
    start = copy.deepcopy(plain)
    pl.seed_everything(seed, verbose=False)
    if method == "sgsc":
        module, callbacks, size = _ours(start, setting, seed, scores["val"])
    else:
        module, callbacks, size = {"diffq": _diffq, "brevitas": _brevitas, "torchao": _torchao, "pruning": _pruning}[
            method
        ](start, setting)
    data = TASK["data"](seed)
    trainer = quiet_trainer(
        -1, callbacks, max_steps=steps, val_check_interval=min(EVERY, steps), check_val_every_n_epoch=None
    )
    began = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - began
    nbytes = size(module)  # may replace weights by what is shipped (int8 after pruning), so before the scores
    val = float(trainer.validate(module, data, verbose=False)[0]["val/acc"])
    test = float(trainer.test(module, data, verbose=False)[0]["test/acc"])
    result = {
        "method": method,
        "setting": setting,
        "run": f"{method}-{setting:g}",
        "seed": seed,
        "steps": steps,
        "test_metric_name": "test/acc",
        "test_metric": test,
        "val": val,
        "float_val": scores["val"],
        "float_test": scores["test"],
        "file_bytes": nbytes,
        "float32_bytes": 4 * sum(p.numel() for p in plain.net.parameters()),
        "train_seconds": round(seconds, 1),
        "budget": callbacks[0].budget_summary() if method == "sgsc" else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{method}-{setting:g}-seed{seed}.json").write_text(json.dumps(result) + "\n")
    return result


def _run_job(job: tuple[Any, ...]) -> dict[str, Any]:
    return run_one(*job)


def _float_job(job: tuple[int, int, Path]) -> dict[str, float]:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return float_model(*job)[1]


def plan(methods: list[str], seeds: list[int], steps: int, out: Path) -> list[tuple[Any, ...]]:
    """The runs still to make, seed by seed and in ``POINTS``' order (ours, the longest, first): a run whose JSON is
    already in ``out`` is left out."""
    return [
        (method, setting, seed, steps, out)
        for seed in seeds
        for method in POINTS
        if method in methods
        for setting in POINTS[method]
        if not (out / f"{method}-{setting:g}-seed{seed}.json").exists()
    ]


def summarize(folder: Path, plot_path: Path | None = None) -> dict[str, Any]:
    """The means per point, the peers' check and the bytes ratio at the most accurate peer's accuracy; the plot."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*-seed*.json"))]
    if not runs:
        raise SystemExit(f"`--summary` must name a folder of budget_peers.py results, got {str(folder)!r}.")
    order = {m: i for i, m in enumerate(POINTS)}
    runs.sort(key=lambda r: (order.get(r["method"], 99), r["setting"], r["seed"]))
    float32 = runs[0]["float32_bytes"]
    for r in runs:
        r["of_float32"] = r["file_bytes"] / float32
    points = aggregate(runs)
    checks = dominated_check(points)
    floats = {r["seed"]: r["float_test"] for r in runs}
    header = (
        f"FashionCNN on Fashion-MNIST: each point fine-tunes the same float model {runs[0]['steps']:,} steps, "
        f"seeds {sorted(floats)}; float test accuracy per seed "
        + ", ".join(f"{100 * v:.2f} %" for _, v in sorted(floats.items()))
    )
    print(markdown(points, checks, header))
    print(per_seed_table(runs))
    peers = [p for p in points if p["method"] != "sgsc"]
    ours = [p for p in points if p["method"] == "sgsc"]
    ratio = None
    if peers and ours:
        top = max(peers, key=lambda p: p["test_metric"])
        good = [o for o in ours if o["test_metric"] >= top["test_metric"]]
        if good:
            best = min(good, key=lambda o: o["file_bytes"])
            ratio = top["file_bytes"] / best["file_bytes"]
            print(
                f"most accurate peer point: {top['run']} {100 * top['test_metric']:.2f} % at {top['file_bytes']:,} B;"
                f" ours at least as accurate: {best['run']} {100 * best['test_metric']:.2f} % at"
                f" {best['file_bytes']:,} B: {ratio:.1f}x smaller"
            )
        else:
            closest = max(ours, key=lambda o: o["test_metric"])
            print(
                f"most accurate peer point: {top['run']} {100 * top['test_metric']:.2f} % at {top['file_bytes']:,} B;"
                f" none of ours is as accurate (best: {closest['run']} {100 * closest['test_metric']:.2f} %"
                f" at {closest['file_bytes']:,} B)"
            )
    summary = {
        "all_matched": all(c["matched"] for c in checks) if checks else None,
        "ratio_at_top_peer": ratio,
        "points": len(points),
        "runs": len(runs),
    }
    if plot_path is not None:
        _plot(points, plot_path)
    print(json.dumps(summary))
    return summary


def per_seed_table(runs: list[dict[str, Any]]) -> str:
    """Every run's test accuracy and bytes, one row per point, one column per seed (``—``: that seed did not run)."""
    seeds = sorted({r["seed"] for r in runs})
    cells: dict[str, dict[int, str]] = {}
    for r in runs:
        cells.setdefault(r["run"], {})[r["seed"]] = (
            f"{100 * r['test_metric']:.2f} % at {r['file_bytes'] / 1000:,.1f} KB"
        )
    lines = ["| point | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    lines += [f"| {run} | " + " | ".join(row.get(s, "—") for s in seeds) + " |" for run, row in cells.items()]
    return "\n".join(lines) + "\n"


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in POINTS:
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["file_bytes"])
        if not mine:
            continue
        ax.errorbar(
            [p["file_bytes"] / 1000 for p in mine],
            [100 * p["test_metric"] for p in mine],
            yerr=[100 * p["test_metric_std"] for p in mine],
            fmt="o-" if method == "sgsc" else "o--",
            capsize=2,
            label="ours (budget)" if method == "sgsc" else method,
        )
        for p in mine:
            ax.annotate(
                f"{p['setting']:g}",
                (p["file_bytes"] / 1000, 100 * p["test_metric"]),
                fontsize=7,
                xytext=(4, -9 if method == "pruning" else 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks([10, 20, 50, 100, 200, 500])
    ax.set_xlabel("shipped bytes, KB (log)")
    ax.set_ylabel("test accuracy, % (mean over seeds)")
    ax.set_title("Fine-tuning the same float FashionCNN, same steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=None, help="print the table of a results folder and stop")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=10_000, help="the float model's steps and every fine-tune's")
    parser.add_argument("--methods", default=",".join(POINTS), help=f"comma-separated, of {', '.join(POINTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each a process with 1 thread")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/budget/peers"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lightning-sgsc" / "floats")
    args = parser.parse_args()
    if args.summary is not None:
        summarize(args.summary, args.summary / "front.png")
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in POINTS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: {', '.join(POINTS)}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    missing = [m for m in methods if not available(m)]
    for method in missing:
        print(f"{method}: not installed (pip install {method}), skipped", flush=True)
    jobs = plan([m for m in methods if m not in missing], args.seeds, args.steps, args.out)
    print(f"{len(jobs)} runs to make ({args.out} holds the others)", flush=True)
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    # the float models first, one job per seed, before any run reads them from the cache
    floats = pool.map(_float_job, [(seed, args.steps, args.cache) for seed in args.seeds])
    for seed, scores in zip(args.seeds, floats, strict=True):
        print(f"seed {seed}: float {100 * scores['test']:.2f} % (val {100 * scores['val']:.2f} %)", flush=True)
    jobs = [(method, setting, seed, steps, args.cache, out) for method, setting, seed, steps, out in jobs]
    for r in pool.map(_run_job, jobs):
        print(
            f"{r['run']:>14} seed {r['seed']}: {100 * r['test_metric']:.2f} %"
            f" ({100 * (r['test_metric'] - r['float_test']):+.2f}), {r['file_bytes']:,} B, {r['train_seconds']:.0f} s"
            f" ({platform.machine()}, 1 thread)",
            flush=True,
        )


if __name__ == "__main__":
    main()
