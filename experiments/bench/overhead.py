"""Training-step overhead of SafetyGuidedQuantization + SafetyGuidedMixin against the same model without them.

    python experiments/bench/overhead.py [--steps 30] [--rounds 5] [--models digits_cnn,fashion_cnn,char_transformer]

For each model, float and compressed fits alternate in one process (``--rounds`` times, ``--steps`` optimizer steps
each); a timing callback measures every step from batch start to batch end (forward, backward, optimizer step and
the compression terms), the first 3 steps of every fit are dropped, and the median per-step time of each side gives
the ratio. Same data (random tensors of the model's input shape), same batch, CPU (GPU too when one is available:
``--accelerator gpu``). The last line is one JSON object with a ``ratio`` per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.examples import CharTransformer, ClassifierModule, DigitsCNN, FashionCNN, LanguageModule
from lightning_sgsc.examples.training import quiet_trainer


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
    g = torch.Generator().manual_seed(0)
    if name == "digits_cnn":
        module: pl.LightningModule = ClassifierModule(DigitsCNN())
        data = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        batch = 32
    elif name == "fashion_cnn":
        module = ClassifierModule(FashionCNN())
        data = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
        batch = 64
    else:
        module = LanguageModule(CharTransformer())
        x = torch.randint(0, 27, (n, 32), generator=g)
        data = TensorDataset(x, torch.roll(x, -1, dims=1))
        batch = 16
    return module, DataLoader(data, batch_size=batch, shuffle=False)


def measure(name: str, steps: int, rounds: int, accelerator: str) -> dict[str, Any]:
    torch.manual_seed(0)
    plain, loader = _setup(name, 4096)
    torch.manual_seed(0)
    small, _ = _setup(name, 4096)
    callback = SafetyGuidedQuantization(preservation_warmup_epochs=0, preservation_size=256, preservation_pool=1024)
    timers = {"float": StepTimer(), "sgsc": StepTimer()}
    for _ in range(rounds):
        for label, module, extra in (("float", plain, []), ("sgsc", small, [callback])):
            timer = timers[label]
            before = len(timer.times)
            trainer = quiet_trainer(1, [*extra, timer], max_steps=steps, limit_val_batches=0, accelerator=accelerator)
            trainer.fit(module, train_dataloaders=loader)
            del timer.times[before : before + 3]  # warm-up steps of each fit
    t_float = statistics.median(timers["float"].times)
    t_sgsc = statistics.median(timers["sgsc"].times)
    return {
        "model": name,
        "float_ms": round(1e3 * t_float, 3),
        "sgsc_ms": round(1e3 * t_sgsc, 3),
        "ratio": round(t_sgsc / t_float, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="digits_cnn,fashion_cnn,char_transformer")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = [measure(m, args.steps, args.rounds, args.accelerator) for m in args.models.split(",")]
    for r in results:
        times = f"float {r['float_ms']:.2f} ms/step, sgsc {r['sgsc_ms']:.2f} ms/step"
        print(f"{r['model']:>17}: {times}, ratio {r['ratio']:.2f}x")
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"{platform.machine()} CPU"
    print(
        json.dumps(
            {
                "device": device,
                "threads": torch.get_num_threads(),
                "ratio": {r["model"]: r["ratio"] for r in results},
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
