"""The FashionCNN compressed by us and by the tools users would pick instead, same data and step budget, one run.

    python experiments/bench/peers.py [--steps 1000] [--methods sgsc,paper,diffq,brevitas,pruning] [--data fashion]
                                      [--jobs 2]   # runs at a time, each in its own process with 1 thread
                                      [--seeds 0,1,2]   # every point once per seed (default); the check uses the means
    python experiments/bench/peers.py --from experiments/results/bench/peers.json   # re-check saved runs, no training
    python experiments/bench/peers.py --methods sgsc_h3 --settings 0.002,0.001   # other settings of one method

Every method trains the same ``FashionCNN`` from the same seed on the same Fashion-MNIST subset (``--train-limit``
training images, batch 64, AdamW 1e-3, ``--steps`` steps) and is scored on the 10,000 test images. Sizes are true
bytes of what a user would ship:

* ``sgsc`` (ours at its defaults, several ``bit_weight``, ``b`` starting at 8 with 2 bits of headroom),
  ``sgsc_h3`` (the same with 3 bits of headroom, down to ``bit_weight`` 0.001, and 0: no size term, ``b`` and ``e``
  still learned per channel, the preservation loss and feedback loop on), ``sgsc_b4`` and ``sgsc_b2``
  (``b`` starting at 4 and 2, headroom 2 and 0; 2 bits is the front of the hyperparameter sweep): the file
  :func:`lightning_sgsc.export_compressed` writes.
* ``paper``: the safety-guided paper's original recipe on our quantizer: ``b`` starts at 32 and ``e`` at -8,
  bit-depth weight γ, restores chosen at random instead of by Taylor score; sized by the same exporter (which stores
  each channel at the bits its integers need, so a channel whose ``b`` stayed at 22 but whose integers fit 9 bits
  costs 9).
* ``diffq``: DiffQ (``pip install diffq``; non-commercial licence, so never a dependency of this project) with its
  size penalty λ·MB, group size 8, every weight quantized (``min_size=0``; biases stay float32); bytes of its packed
  quantized state pickled (``packed_model_size``, what DiffQ's own docs call the true size).
* ``brevitas``: Brevitas fixed-bit QAT of the weights (per-channel float scale, 2/4/8 bits, activations in float);
  bytes = weights bit-packed at that width + float32 scales and biases (Brevitas exports no bit-packed file).
* ``pruning``: Lightning's ``ModelPruning`` (global L1 unstructured, in two steps during the first two epochs), then
  int8 weight-only post-training quantization (per-channel symmetric); bytes = one-bit occupancy mask + the int8
  non-zeros + float32 scales and biases.

Every point (method and setting) trains once per seed of ``--seeds`` (default 0, 1, 2: one seed's differences at
the top are within its noise; the seed sets the model initialisation, every other draw from the global generator
and the callback's ``seed``; the data subset and the batch order stay those of data seed 0) and is reported as the
mean over its seeds (accuracy ± its standard deviation, mean bytes); every run is kept in ``peers.json`` under
``runs``.

Prints one table, writes ``peers.json`` / ``peers.md`` / ``peers.png`` (test accuracy against bytes, log scale,
one front per method) into ``--out``, and checks the target: every peer point is matched or beaten (fewer or equal
bytes and higher or equal accuracy, means over the seeds) by one of ours, with the accuracy margin in points; a
peer point not matched is compared with the most accurate of ours that is no larger. Each comparison also lists
its margin seed by seed: where those change sign, the margin of the means is a tie within the seeds' noise. The
last line is one JSON object. ``--from`` re-checks and re-tabulates the runs of a saved ``peers.json`` (after a
change to the check or the tables) without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import pickle
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.examples import ClassifierModule, FashionCNN, IDXImageDataModule
from lightning_sgsc.examples.data import FASHION_MNIST_DIR
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed, load_compressed
from lightning_sgsc.quant.modules import quantized_layers
from lightning_sgsc.settings import merge_settings
from lightning_sgsc.summarize import pareto_front

FLOAT32_BYTES = 4 * 421_642
SETTINGS: dict[str, list[float]] = {
    "sgsc": [0.02, 0.05, 0.1, 0.5],  # bit_weight, init_bits 8 (the default)
    # bit_weight, init_bits 8, 3 bits of headroom; 0: no size term
    "sgsc_h3": [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05],
    "sgsc_b4": [0.05],  # bit_weight, init_bits 4
    "sgsc_b2": [0.1, 0.5],  # bit_weight, init_bits 2
    "paper": [0.1, 1.0],  # bit_weight (gamma): the recipe's 0.1 and a larger one
    "diffq": [0.5, 2.0, 10.0],  # λ per MB
    "brevitas": [8, 4, 2],  # bits
    "pruning": [0.5, 0.8, 0.95],  # final sparsity
}
OURS: dict[str, dict[str, Any]] = {  # the variants of ours: the callback's arguments besides bit_weight and seed
    "sgsc": {},
    "sgsc_h3": {"quantization": {"init_headroom": 3}},
    "sgsc_b4": {"quantization": {"init_bits": 4}},
    "sgsc_b2": {"quantization": {"init_bits": 2}},
}


# ------------------------------------------------------------------------------------------------------------ data


class RandomImages(pl.LightningDataModule):
    """Random 28×28 images with random labels: only for a smoke run (``--data random``) without Fashion-MNIST."""

    def __init__(self, batch_size: int = 64, n: int = 512) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
        self.batch_size = batch_size
        self.train_set = self.test_set = self.data

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=256)


def make_data(kind: str, train_limit: int) -> pl.LightningDataModule:
    if kind == "random":
        return RandomImages()
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"--data fashion needs Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist); "
            "use --data random for a smoke run."
        )
    return IDXImageDataModule(batch_size=64, train_limit=train_limit, seed=0)


# --------------------------------------------------------------------------------------------------------- methods


class RandomRestores(SafetyGuidedQuantization):
    """The paper's recipe: ``b`` from 32 and ``e`` from -8 at the swap, restores chosen at random."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        fresh = not quantized_layers(pl_module)
        super().setup(trainer, pl_module, stage)
        if fresh:
            with torch.no_grad():
                for _, layer in quantized_layers(pl_module):
                    layer.bits.fill_(32.0)  # computed as 16 (the quantizer's bound); the grid is 2^e either way
                    layer.exponent.fill_(-8.0)

    def _restore_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, bits: float) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.preservation.seed + len(self.history))
        return {name: torch.rand(layer.out_channels_, generator=g) for name, layer in quantized_layers(pl_module)}


def _ours(
    setting: float, paper: bool, seed: int = 0, **kwargs: Any
) -> tuple[ClassifierModule, list[pl.Callback], Callable[..., int]]:
    module = ClassifierModule(FashionCNN())
    kind = RandomRestores if paper else SafetyGuidedQuantization
    callback = kind(bit_weight=setting, seed=seed, **kwargs)

    def size(model: ClassifierModule) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.sgsc"
            nbytes = export_compressed(model.net, path)
            reloaded = load_compressed(path, FashionCNN()).eval()
            x = torch.rand(8, 1, 28, 28)
            if not torch.equal(reloaded(x), model.net.eval()(x)):
                raise RuntimeError("exported model differs from the trained one")
            return nbytes

    return module, [callback], size


class DiffQModule(ClassifierModule):
    """ClassifierModule + DiffQ: noise-injection quantization in training, true quantization in eval mode."""

    def __init__(self, penalty: float, net: nn.Module | None = None) -> None:
        super().__init__(FashionCNN() if net is None else net)
        from diffq import DiffQuantizer

        self.penalty = penalty
        self.quantizer = DiffQuantizer(self.net, group_size=8, min_size=0.0, exclude=["*bias"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) + self.penalty * self.quantizer.model_size()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        logits = {id(qp.logit) for qp in self.quantizer._qparams}  # DiffQ adds its own group for them
        weights = [p for p in self.net.parameters() if id(p) not in logits]
        opt = torch.optim.AdamW(weights, lr=self.lr, weight_decay=self.weight_decay)
        self.quantizer.setup_optimizer(opt)
        return opt


def _diffq(setting: float) -> tuple[pl.LightningModule, list[pl.Callback], Callable[..., int]]:
    module = DiffQModule(setting)

    def size(model: DiffQModule) -> int:
        return len(pickle.dumps(model.quantizer.get_quantized_state(packed=True)))

    return module, [], size


def _brevitas_net(bits: int) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    kw = dict(weight_bit_width=bits, weight_quant=Int8WeightPerChannelFloat)
    net = FashionCNN()
    for name in ("conv1", "conv2"):  # same shapes as our FashionCNN's layers, read from them
        c = getattr(net, name)
        setattr(net, name, qnn.QuantConv2d(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding, **kw))
    for name in ("fc1", "fc2"):
        fc = getattr(net, name)
        setattr(net, name, qnn.QuantLinear(fc.in_features, fc.out_features, bias=True, **kw))
    return net


def _brevitas(setting: float) -> tuple[pl.LightningModule, list[pl.Callback], Callable[..., int]]:
    bits = int(setting)
    module = ClassifierModule(_brevitas_net(bits))

    def size(model: ClassifierModule) -> int:
        total = 0
        for name in ("conv1", "conv2", "fc1", "fc2"):
            layer: Any = getattr(model.net, name)  # brevitas layers
            q = layer.quant_weight()
            total += math.ceil(q.int().numel() * bits / 8) + 4 * q.scale.numel() + 4 * layer.bias.numel()
        return total

    return module, [], size


@torch.no_grad()
def pruned_int8_bytes(model: pl.LightningModule) -> int:
    """Replaces the FashionCNN's weights by their int8 per-channel quantization (the model that is tested) and returns
    what it ships: a one-bit occupancy mask + the int8 non-zeros + float32 scales and biases."""
    total = 0
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer: Any = getattr(model.net, name)
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale).clamp(-127, 127)
        layer.weight.copy_((q * scale).reshape(layer.weight.shape))
        total += math.ceil(q.numel() / 8) + int((q != 0).sum()) + 4 * scale.numel() + 4 * layer.bias.numel()
    return total


def _pruning(setting: float) -> tuple[pl.LightningModule, list[pl.Callback], Callable[..., int]]:
    from lightning.pytorch.callbacks import ModelPruning

    module = ClassifierModule(FashionCNN())
    step = 1.0 - math.sqrt(1.0 - setting)  # two pruning steps reach the final sparsity
    pruning = ModelPruning(
        "l1_unstructured", amount=lambda epoch: step if epoch < 2 else 0.0, use_global_unstructured=True, verbose=0
    )

    return module, [pruning], pruned_int8_bytes


def build(
    method: str, setting: float, seed: int = 0, extra: dict[str, Any] | None = None
) -> tuple[pl.LightningModule, list[pl.Callback], Callable[..., int]]:
    """The module, callbacks and size function of one point; ``seed`` is the callback's (ours and the paper's
    recipe); the peers' randomness comes from the global seed :func:`run_one` sets. ``extra``: more arguments of
    the callback (ours and the paper's recipe only)."""
    if method in OURS or method == "paper":
        return _ours(setting, paper=method == "paper", seed=seed, **merge_settings(OURS.get(method, {}), extra or {}))
    if extra:
        raise ValueError(f"extra callback arguments {sorted(extra)} apply to ours and the paper's recipe, not {method}")
    return {"diffq": _diffq, "brevitas": _brevitas, "pruning": _pruning}[method](setting)


def available(method: str) -> bool:
    module = {"diffq": "diffq", "brevitas": "brevitas"}.get(method)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------- runs


def run_one(
    method: str,
    setting: float,
    data: pl.LightningDataModule,
    steps: int,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    module, callbacks, size = build(method, setting, seed, extra)
    trainer = quiet_trainer(
        -1,
        callbacks,
        max_steps=steps,
        val_check_interval=max(steps // 4, 1),
        limit_val_batches=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    nbytes = size(module)  # may replace weights by what is shipped (int8 after pruning), so before the test
    acc = _test_accuracy(module, data)
    return {
        "method": method,
        "setting": setting,
        "run": f"{method}-{setting:g}",
        "seed": seed,
        "test_metric_name": "test/acc",
        "test_metric": round(acc, 4),
        "file_bytes": nbytes,
        "of_float32": round(nbytes / FLOAT32_BYTES, 4),
        "train_seconds": round(seconds, 1),
    }


@torch.no_grad()
def _test_accuracy(module: pl.LightningModule, data: pl.LightningDataModule) -> float:
    module.eval()
    if getattr(data, "test_set", None) is None:
        data.setup("test")
    correct = total = 0
    for x, y in data.test_dataloader():
        correct += int((module(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / total


def _run_in_worker(job: tuple[Any, ...]) -> dict[str, Any]:
    """One run in a worker process (``--jobs``): 1 thread, its own copy of the data. ``job``: ``(method, setting,
    data kind, train limit, steps, seed)``, optionally followed by ``extra`` callback arguments (see :func:`build`)."""
    method, setting, data_kind, train_limit, steps, seed, *extra = job
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return run_one(method, setting, make_data(data_kind, train_limit), steps, seed, *extra)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per method and setting (in the order first seen): the mean test accuracy over its seeds with
    their standard deviation (0 for one seed), the mean bytes (and the largest), the mean train seconds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    points = []
    for (method, setting), group in groups.items():
        accs = [r["test_metric"] for r in group]
        nbytes = [r["file_bytes"] for r in group]
        mean_bytes = round(statistics.mean(nbytes))
        points.append(
            {
                "method": method,
                "setting": setting,
                "run": group[0]["run"],
                "seeds": [r["seed"] for r in group],
                "test_metric_name": group[0]["test_metric_name"],
                "test_metric": round(statistics.mean(accs), 4),
                "test_metric_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "test_metric_min": min(accs),
                "test_metric_seeds": accs,  # in the order of "seeds"
                "file_bytes": mean_bytes,
                "file_bytes_max": max(nbytes),
                "of_float32": round(mean_bytes / FLOAT32_BYTES, 4),
                "train_seconds": round(statistics.mean(r["train_seconds"] for r in group), 1),
            }
        )
    return points


def is_ours(method: str) -> bool:
    return method in OURS


def dominated_check(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every peer point: the smallest of ours that is at least as accurate (``ours``), whether it is no larger
    (``matched``), and its accuracy margin in points; when not matched, ``closest``: the most accurate of ours that
    is no larger than the peer (if any), with its (negative) margin. ``per_seed``: the margins seed by seed of the point
    compared (``ours`` when matched, else ``closest``) over the seeds both ran, when the points carry per-seed
    accuracies: a margin of the means smaller than the seeds' spread is a tie, not a win or a loss."""
    ours = [r for r in results if is_ours(r["method"])]
    rows = []
    for peer in (r for r in results if not is_ours(r["method"])):
        match = [o for o in ours if o["test_metric"] >= peer["test_metric"]]
        best = min(match, key=lambda o: o["file_bytes"]) if match else None
        ok = best is not None and best["file_bytes"] <= peer["file_bytes"]
        no_larger = [o for o in ours if o["file_bytes"] <= peer["file_bytes"]]
        closest = None if ok or not no_larger else max(no_larger, key=lambda o: o["test_metric"])
        compared = best if ok else closest
        rows.append(
            {
                "peer": peer["run"],
                "ours": best["run"] if best else None,
                "matched": ok,
                "margin": _margin(best, peer),
                "closest": closest["run"] if closest else None,
                "closest_margin": _margin(closest, peer),
                "per_seed": _per_seed_margins(compared, peer),
            }
        )
    return rows


def _margin(ours: dict[str, Any] | None, peer: dict[str, Any]) -> float | None:
    return None if ours is None else round(100 * (ours["test_metric"] - peer["test_metric"]), 2)


def _per_seed_margins(ours: dict[str, Any] | None, peer: dict[str, Any]) -> list[float] | None:
    """``ours - peer`` in accuracy points for every seed both points ran, in ``ours``' seed order (``None``: no
    point, or no per-seed accuracies)."""
    if ours is None or "test_metric_seeds" not in ours or "test_metric_seeds" not in peer:
        return None
    theirs = dict(zip(peer["seeds"], peer["test_metric_seeds"], strict=True))
    margins = [
        round(100 * (acc - theirs[seed]), 2)
        for seed, acc in zip(ours["seeds"], ours["test_metric_seeds"], strict=True)
        if seed in theirs
    ]
    return margins or None


def markdown(points: list[dict[str, Any]], checks: list[dict[str, Any]], header: str) -> str:
    """The points (means over their seeds when there are several) and the checks, as Markdown tables."""
    seeds = max(len(p["seeds"]) for p in points)
    acc = "test acc" if seeds == 1 else f"test acc (mean ± sd, {seeds} seeds)"
    nbytes = "true bytes" if seeds == 1 else "true bytes (mean)"
    lines = [
        header,
        "",
        f"| method | setting | {acc} | {nbytes} | of float32 | train s |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        spread = f" ± {100 * p['test_metric_std']:.2f}" if len(p["seeds"]) > 1 else ""
        lines.append(
            f"| {p['method']} | {p['setting']:g} | {100 * p['test_metric']:.2f}{spread} % | {p['file_bytes']:,} | "
            f"{100 * p['of_float32']:.2f} % | {p['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "| peer point | ours: the smallest at least as accurate (not matched: the most accurate no larger) "
        "| matched or beaten | accuracy margin | margin per seed |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        if c["matched"]:
            compared, margin = c["ours"], c["margin"]
        elif c["closest"] is None:  # every point of ours is larger: the one as accurate (if any) is named as such
            compared, margin = (f"larger only: {c['ours']}" if c["ours"] else None), c["margin"]
        else:
            compared, margin = f"closest: {c['closest']}", c["closest_margin"]
        per_seed = ", ".join(f"{m:+.2f}" for m in c["per_seed"] or []) or "—"
        margin_text = "—" if margin is None else f"{margin:+.2f} points"
        lines.append(
            f"| {c['peer']} | {compared or '—'} | {'yes' if c['matched'] else 'no'} | {margin_text} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against bytes, one front per method; error bars: one standard deviation over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in SETTINGS:
        runs = [p for p in points if p["method"] == method]
        if not runs:
            continue
        front = pareto_front(runs)
        line = ax.plot([r["file_bytes"] for r in front], [100 * r["test_metric"] for r in front], "-", alpha=0.6)[0]
        ax.errorbar(
            [r["file_bytes"] for r in runs],
            [100 * r["test_metric"] for r in runs],
            yerr=[100 * r["test_metric_std"] for r in runs],  # 0 for one seed
            fmt="o",
            capsize=2,
            color=line.get_color(),
            label=method,
        )
    ax.set_xscale("log")
    ax.set_xlabel("true bytes (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("FashionCNN on Fashion-MNIST: accuracy against shipped bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: distinct non-negative integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: got {text!r}; allowed: distinct non-negative integers, comma-separated (0,1,2)")
    return seeds


SETTING_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "brevitas": (lambda v: v.is_integer() and 1 <= v <= 16, "whole bit widths from 1 to 16"),
    "pruning": (lambda v: v < 1, "sparsities below 1"),
}
"""What ``--settings`` allows per method beyond distinct non-negative numbers (the rest: any such number)."""


def parse_settings(text: str, method: str) -> list[float]:
    """``--settings`` for ``method``: distinct non-negative numbers, comma-separated, within its rule."""
    rule, allowed = SETTING_RULES.get(method, (lambda v: True, "numbers"))
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if (
        not values
        or len(set(values)) != len(values)
        or not all(math.isfinite(v) and v >= 0 and rule(v) for v in values)
    ):
        raise SystemExit(
            f"--settings: got {text!r} for {method}; allowed: distinct non-negative {allowed}, comma-separated"
        )
    return values


TRAINING_ARGS = ("steps", "train_limit", "methods", "data", "jobs", "seeds", "settings")
"""The options that choose what is trained (refused with ``--from``, which trains nothing)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--train-limit", type=int, default=20_000)
    parser.add_argument("--methods", default=",".join(SETTINGS))
    parser.add_argument("--data", choices=["fashion", "random"], default="fashion")
    parser.add_argument("--out", default="experiments/results/bench")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in a process with 1 thread")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every point runs once per seed")
    parser.add_argument(
        "--from", dest="saved", metavar="PEERS_JSON", help="train nothing: check and tabulate the runs saved there"
    )
    parser.add_argument(
        "--settings", help="comma-separated settings instead of the method's own (with exactly one --methods)"
    )
    args = parser.parse_args()
    if args.saved is not None:
        training = [f"--{k.replace('_', '-')}" for k in TRAINING_ARGS if getattr(args, k) != parser.get_default(k)]
        if training:
            raise SystemExit(f"--from trains nothing; it cannot be combined with {', '.join(training)}")
        write_outputs(*load_runs(Path(args.saved)), Path(args.out))
        return
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    seeds = parse_seeds(args.seeds)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in SETTINGS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
    settings = dict(SETTINGS)
    if args.settings is not None:
        if len(methods) != 1:
            raise SystemExit(f"--settings: needs exactly one --methods, got {args.methods!r}")
        settings[methods[0]] = parse_settings(args.settings, methods[0])
    jobs = []
    for method in methods:
        if not available(method):
            print(f"{method}: not installed (pip install {method}), skipped", flush=True)
            continue
        for setting in settings[method]:
            jobs += [(method, setting, args.data, args.train_limit, args.steps, seed) for seed in seeds]
    if args.jobs == 1:
        data = make_data(args.data, args.train_limit)
        runs: Any = (run_one(method, setting, data, steps, seed) for method, setting, _, _, steps, seed in jobs)
        threads = f"{torch.get_num_threads()} threads"
    else:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        runs = pool.map(_run_in_worker, jobs)
        threads = f"{args.jobs} runs at a time, 1 thread each"
    results = []
    for r in runs:  # in the order of the jobs, whatever order they finish in
        results.append(r)
        print(
            f"{r['run']:>16} seed {r['seed']}: test acc {100 * r['test_metric']:.2f} %, {r['file_bytes']:,} B "
            f"({100 * r['of_float32']:.2f} % of float32), {r['train_seconds']:.0f} s",
            flush=True,
        )
    hardware = f"{platform.machine()} CPU, {threads}, torch {torch.__version__}"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (means)"
    header = (
        f"FashionCNN, {args.data} data ({args.train_limit:,} training images), {args.steps} steps of batch 64, "
        f"AdamW 1e-3, {seed_text}; {hardware}"
    )
    write_outputs(results, header, seeds, Path(args.out))


def load_runs(path: Path) -> tuple[list[dict[str, Any]], str, list[int]]:
    """``(runs, header, seeds)`` of a ``peers.json`` this script wrote (``--from``)."""
    try:
        saved = json.loads(path.read_text())
        return saved["runs"], saved["setup"], saved["seeds"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--from: {str(path)!r} is not a peers.json with runs, setup and seeds ({err!r})") from None


def write_outputs(results: list[dict[str, Any]], header: str, seeds: list[int], out: Path) -> None:
    """Aggregates the runs, checks the target, prints the tables and writes peers.json / .md / .png into ``out``."""
    points = aggregate(results)
    checks = dominated_check(points)
    text = markdown(points, checks, header)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "setup": header,
        "seeds": seeds,
        "results": points,
        "runs": results,
        "checks": checks,
        "all_matched": all(c["matched"] for c in checks) if checks else None,  # None: no peer point to check
    }
    (out / "peers.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "peers.md").write_text(text)
    plot(points, out / "peers.png")
    print(json.dumps({"all_matched": summary["all_matched"], "points": len(points), "runs": len(results)}))


if __name__ == "__main__":
    main()
