"""Training-step overhead of SafetyGuidedQuantization + SafetyGuidedMixin against the same model without them.

    python experiments/bench/overhead.py [--steps 60] [--rounds 9] [--models digits_cnn,fashion_cnn,char_transformer]
    python experiments/bench/overhead.py --scaling          # FashionCNN width x1/x2/x4, CharTransformer 4/8 layers
    python experiments/bench/overhead.py --also-every-n 16 --steps 67   # and the preservation loss every 16th step

For each model three fits alternate in one process, ``--rounds`` times (in reverse order every other round, so a
machine that speeds up or slows down favours no side), ``--steps`` optimizer steps each:

* ``float``: the plain model (the mixin does nothing without the callback);
* ``quantizer``: the callback without a preservation set (quantized twins, bit-depth term, fused quantizer);
* ``sgsc``: the callback at its defaults (plus the preservation loss on every 8th step, its batch the training
  batch up to 32: 32 for the CNNs, 16 for the transformer; ``--preservation-batch-size`` sets it);
* ``sgsc_every_N`` with ``--also-every-n N``: ``sgsc`` with the preservation loss on every N-th step instead
  (``--steps 67`` times 64 steps, a whole number of 8- and of 16-step periods: the 57 of the default 60 hold 7
  preservation steps of 8 but 3 of 16, which would favour 16).

A timing callback measures every step from batch start to batch end (forward, backward, optimizer step and the
compression terms); the first 3 steps of every fit are dropped and the *mean* of the rest is the per-step cost (a
mean, not a median: the preservation loss runs on one step in eight, and its cost must be counted). Same data
(random tensors of the model's input shape), same batch. ``ratio`` is the median over rounds of each round's
``sgsc / float`` (the fits of a round run back to back): on a shared virtual machine the speed can change by a
quarter from one fit to the next (seen here: the same configuration at 42 and at 54 ms per step in consecutive
fits), and the median keeps one such fit from moving the figure; ``ratio_rounds`` lists every round's and
``ratio_of_means`` is the ratio of the overall means; ``ratio_ci95`` is a 95 % bootstrap interval of the
median over the rounds (a target inside it is within the machine's noise). ``--scaling`` adds the peak memory of
one fit of each side, measured in a fresh child process after a 3-step warm-up fit (which scores the preservation
set once): the growth of the peak resident set over the measured fit on CPU, of torch's peak allocation on GPU.
The last line is one JSON object with a ``ratio`` per model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import Preservation, Quantization, SafetyGuidedQuantization
from lightning_sgsc.examples import CharTransformer, ClassifierModule, DigitsCNN, FashionCNN, LanguageModule
from lightning_sgsc.examples.training import quiet_trainer

SCALING = "fashion_cnn,fashion_cnn_w2,fashion_cnn_w4,char_transformer,char_transformer_l8"
SIDES = ("float", "quantizer", "sgsc")
COMPILED_SIDE = "sgsc_compiled"


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def _setup(name: str, n: int) -> tuple[pl.LightningModule, DataLoader]:
    """``name``: digits_cnn, fashion_cnn[_w2|_w4] (width multiplier), char_transformer[_l8] (layers)."""
    g = torch.Generator().manual_seed(0)
    if name == "digits_cnn":
        module: pl.LightningModule = ClassifierModule(DigitsCNN())
        data = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        batch = 32
    elif name.startswith("fashion_cnn"):
        width = int(name.split("_w")[1]) if "_w" in name else 1
        module = ClassifierModule(FashionCNN(width=width))
        data = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
        batch = 64
    elif name.startswith("char_transformer"):
        layers = int(name.split("_l")[1]) if "_l" in name else 4
        module = LanguageModule(CharTransformer(n_layer=layers))
        x = torch.randint(0, 27, (n, 32), generator=g)
        data = TensorDataset(x, torch.roll(x, -1, dims=1))
        batch = 16
    else:
        raise SystemExit(f"--models: unknown model {name!r}; known: digits_cnn, {SCALING}")
    return module, DataLoader(data, batch_size=batch, shuffle=False)


EVERY_SIDE = "sgsc_every_"
"""Prefix of the extra side ``--also-every-n N`` adds: ``sgsc`` with ``preservation.every_n_steps=N``."""


def _callback(side: str, preservation_batch_size: int | None = None) -> list[pl.Callback]:
    if side == "float":
        return []
    if side == "quantizer":
        return [SafetyGuidedQuantization(preservation_size=0)]
    kwargs: dict[str, Any] = {} if preservation_batch_size is None else {"batch_size": preservation_batch_size}
    if side.startswith(EVERY_SIDE):
        kwargs["every_n_steps"] = int(side[len(EVERY_SIDE) :])
    quantization = Quantization(compile=side == COMPILED_SIDE)
    preservation = Preservation(warmup_epochs=0, size=256, pool=1024, **kwargs)
    return [SafetyGuidedQuantization(quantization, preservation=preservation)]


def sides_for(also_every: int | None, compiled: bool = False) -> tuple[str, ...]:
    """:data:`SIDES`, plus ``sgsc_every_N`` for ``--also-every-n N`` and ``sgsc_compiled`` for ``--compile``."""
    extra = ((f"{EVERY_SIDE}{also_every}",) if also_every is not None else ()) + ((COMPILED_SIDE,) if compiled else ())
    return (*SIDES, *extra)


WARMUP_STEPS = 3
"""Steps dropped at the start of every fit."""


def order(round_: int, sides: tuple[str, ...] = SIDES) -> tuple[str, ...]:
    """``sides`` in the order round ``round_`` runs them: reversed every other round, so a drift of the machine's
    speed within a round favours no side."""
    return sides if round_ % 2 == 0 else sides[::-1]


def measure(
    name: str,
    steps: int,
    rounds: int,
    accelerator: str,
    preservation_batch_size: int | None = None,
    also_every: int | None = None,
    compiled: bool = False,
) -> dict[str, Any]:
    sides = sides_for(also_every, compiled)
    modules = {}
    for side in sides:
        torch.manual_seed(0)
        modules[side] = _setup(name, 4096)
    per_round: dict[str, list[float]] = {side: [] for side in sides}  # mean step time of each fit
    steps_all: dict[str, list[float]] = {side: [] for side in sides}
    batch = None
    for r in range(rounds):
        for side in order(r, sides):
            module, loader = modules[side]
            timer = StepTimer()
            callbacks = [*_callback(side, preservation_batch_size), timer]
            trainer = quiet_trainer(1, callbacks, max_steps=steps, limit_val_batches=0, accelerator=accelerator)
            trainer.fit(module, train_dataloaders=loader)
            times = timer.times[WARMUP_STEPS:]
            per_round[side].append(statistics.mean(times))
            steps_all[side] += times
            if side == "sgsc":
                batch = cast(SafetyGuidedQuantization, callbacks[0]).preservation.effective_batch_size
    ms = {side: 1e3 * statistics.mean(steps_all[side]) for side in sides}
    return {
        "model": name,
        "params": sum(p.numel() for p in modules["float"][0].parameters()),
        "preservation_batch_size": batch,
        **{f"{side}_ms": round(ms[side], 3) for side in sides},
        **ratios(per_round),
        "ratio_of_means": round(ms["sgsc"] / ms["float"], 3),
    }


def ratios(per_round: dict[str, list[float]]) -> dict[str, Any]:
    """``ratio`` / ``quantizer_ratio``: the median over rounds of each round's time against the float fit of the
    same round; ``ratio_rounds``: each round's ``sgsc / float``; for an extra side ``sgsc_every_N`` the same three
    as ``ratio_every_N``, ``ratio_every_N_ci95``, ``ratio_every_N_rounds``."""

    def of(side: str) -> list[float]:
        return [a / b for a, b in zip(per_round[side], per_round["float"], strict=True)]

    out: dict[str, Any] = {"quantizer_ratio": round(statistics.median(of("quantizer")), 3)}
    for side in per_round:
        if side == "sgsc" or side.startswith(EVERY_SIDE) or side == COMPILED_SIDE:
            key = {"sgsc": "ratio", COMPILED_SIDE: "ratio_compiled"}.get(side, f"ratio_every_{side[len(EVERY_SIDE) :]}")
            out[key] = round(statistics.median(of(side)), 3)
            out[f"{key}_ci95"] = [round(v, 3) for v in median_ci(of(side))]
            out[f"{key}_rounds"] = [round(r, 3) for r in of(side)]
    return out


def median_ci(values: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median of ``values`` (resampled with replacement, percentiles 2.5 and 97.5;
    seeded, so a run's figures reproduce from its rounds). With a handful of rounds it is rough, but it says
    whether a target near the median is within the machine's noise."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _peak_memory_child(name: str, side: str, steps: int, accelerator: str) -> None:
    """Runs in a fresh process: a 3-step warm-up fit (the preservation set is scored there, once), then the
    measured fit; prints the peak memory growth over the measured fit in MiB."""
    module, loader = _setup(name, 4096)
    callbacks = _callback(side)
    quiet_trainer(1, callbacks, max_steps=3, limit_val_batches=0, accelerator=accelerator).fit(module, loader)
    trainer = quiet_trainer(1, callbacks, max_steps=steps, limit_val_batches=0, accelerator=accelerator)
    gc.collect()
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.fit(module, train_dataloaders=loader)
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so growth is not hidden by the allocator
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current resident set
        f.write("5")
    trainer.fit(module, train_dataloaders=loader)
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory(name: str, side: str, steps: int, accelerator: str) -> float:
    code = (
        "import sys, logging, warnings; sys.path.insert(0, 'experiments/bench'); warnings.filterwarnings('ignore');"
        "logging.getLogger('lightning.pytorch').setLevel(logging.ERROR); import overhead;"
        f"overhead._peak_memory_child({name!r}, {side!r}, {steps}, {accelerator!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", default=None, help="comma-separated; default: the three example models")
    parser.add_argument("--scaling", action="store_true", help=f"models {SCALING}, with peak memory")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--preservation-batch-size",
        type=int,
        default=None,
        help="default: the callback's (the training batch, at most 32)",
    )
    parser.add_argument(
        "--also-every-n",
        type=int,
        default=None,
        metavar="N",
        help="also time the callback with preservation_every_n_steps=N, alternating with the others",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the callback with compile_quantizer=True (torch.compile)"
    )
    args = parser.parse_args()
    for flag in ("steps", "rounds", "also_every_n"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    models = args.models or (SCALING if args.scaling else "digits_cnn,fashion_cnn,char_transformer")
    results = []
    for name in models.split(","):
        r = measure(
            name,
            args.steps,
            args.rounds,
            args.accelerator,
            args.preservation_batch_size,
            args.also_every_n,
            args.compile,
        )
        if args.scaling:
            r["float_peak_mib"] = peak_memory(name, "float", args.steps, args.accelerator)
            r["sgsc_peak_mib"] = peak_memory(name, "sgsc", args.steps, args.accelerator)
        results.append(r)
        times = ", ".join(f"{side} {r[f'{side}_ms']:.2f}" for side in sides_for(args.also_every_n, args.compile))
        line = (
            f"{name:>20} ({r['params']:,} params, preservation batch {r['preservation_batch_size']}): ms/step {times}"
        )
        line += f"; ratio {r['ratio']:.2f}x"
        line += f" (quantizer alone {r['quantizer_ratio']:.2f}x; rounds {min(r['ratio_rounds']):.2f}-"
        line += f"{max(r['ratio_rounds']):.2f}x, 95 % interval of the median {r['ratio_ci95'][0]:.2f}-"
        line += f"{r['ratio_ci95'][1]:.2f}x, ratio of the means {r['ratio_of_means']:.2f}x)"
        if args.also_every_n is not None:
            key = f"ratio_every_{args.also_every_n}"
            low, high = r[f"{key}_ci95"]
            line += f"; every {args.also_every_n} steps {r[key]:.2f}x ({low:.2f}-{high:.2f}x)"
        if args.compile:
            low, high = r["ratio_compiled_ci95"]
            line += f"; with torch.compile {r['ratio_compiled']:.2f}x ({low:.2f}-{high:.2f}x)"
        if args.scaling:
            line += f"; peak memory float {r['float_peak_mib']} MiB, sgsc {r['sgsc_peak_mib']} MiB"
        print(line, flush=True)
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"{platform.machine()} CPU"
    summary = {"device": device, "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds}
    summary["preservation_batch_size"] = args.preservation_batch_size  # None: the callback's default, per model
    summary["also_every_n"] = args.also_every_n
    summary["compile"] = args.compile
    print(json.dumps({**summary, "ratio": {r["model"]: r["ratio"] for r in results}, "results": results}))


if __name__ == "__main__":
    main()
