"""True exported bytes against the bit-count estimate, and pruned-model CPU latency against float, for the demo CNN
(digits) and the reference FashionCNN.

    python experiments/bench/export_size.py [--epochs 10] [--fashion-train 6000]

Each model is trained briefly with SafetyGuidedQuantization (so its channels have real, mixed bit depths), exported,
reloaded into a fresh float skeleton and checked for identical outputs, then its zero channels are removed
(``prune_zero_channels``) and its CPU latency at batch 1 and 256 is measured against the float model, the two
alternating in one process (median of ``--repeats`` rounds). The FashionCNN trains on the first
``--fashion-train`` Fashion-MNIST training images (random data when the dataset is absent: sizes stay meaningful,
accuracy does not). The last line is one JSON object.
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

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedQuantization, model_size
from lightning_sgsc.demo import DEMO_SETTINGS
from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule, FashionCNN
from lightning_sgsc.examples.data import FASHION_MNIST_DIR, load_idx_images
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.export import export_compressed, load_compressed
from lightning_sgsc.prune import pruned_copy


def _fit(net: torch.nn.Module, train: DataLoader, epochs: int) -> ClassifierModule:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(net, lr=3e-3)
    callback = SafetyGuidedQuantization(**DEMO_SETTINGS)
    trainer = quiet_trainer(epochs, [callback], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=train)
    return module


def _latency(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per forward of ``a`` and ``b``, alternating (a, b, a, b, ...) so both see the same machine."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        for model in (a, b):
            model(x)  # warm-up
        for _ in range(repeats):
            for i, model in enumerate((a, b)):
                start = time.perf_counter()
                model(x)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _measure(
    name: str,
    module: ClassifierModule,
    skeleton: torch.nn.Module,
    float_model: torch.nn.Module,
    x: torch.Tensor,
    repeats: int,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.sgsc"
        file_bytes = export_compressed(module.net, path)
        loaded = load_compressed(path, skeleton).eval()
        identical = bool(torch.equal(loaded(x), module.net.eval()(x)))
    pruned, report = pruned_copy(loaded, x[:8])
    latency = {}
    for batch in (1, 256):
        xb = x[:batch] if len(x) >= batch else x.repeat((batch + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:batch]
        t_float, t_pruned = _latency(float_model.eval(), pruned, xb, repeats)
        latency[f"batch{batch}"] = {
            "float_ms": round(1e3 * t_float, 4),
            "pruned_ms": round(1e3 * t_pruned, 4),
            "speedup": round(t_float / t_pruned, 3),
        }
    size = model_size(module.net)
    estimate = size.total_bytes
    return {
        "model": name,
        "file_bytes": file_bytes,
        "estimate_bytes": estimate,
        "overhead_bytes": file_bytes - estimate,
        "allowed_bytes": round(0.05 * estimate + 1024),
        "within_bound": file_bytes <= 1.05 * estimate + 1024,
        "float32_bytes": size.float32_bytes,
        "bits_per_weight": round(size.bits_per_weight, 3),
        "identical_outputs": identical,
        "params_float": report.params_before,
        "params_pruned": report.params_after,
        "macs_float": report.macs_before,
        "macs_pruned": report.macs_after,
        "channels_removed": sum(report.removed.values()),
        "latency": latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fashion-train", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = []
    digits = DigitsDataModule()
    digits.setup()
    torch.manual_seed(0)
    float_digits = DigitsCNN()
    module = _fit(copy.deepcopy(float_digits), digits.train_dataloader(), args.epochs)
    results.append(_measure("DigitsCNN", module, DigitsCNN(), float_digits, digits.test_set.tensors[0], args.repeats))
    loaded = load_idx_images(FASHION_MNIST_DIR, "train")
    if loaded is None:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(args.fashion_train, 1, 28, 28, generator=g), torch.randint(0, 10, (args.fashion_train,))
    else:
        x, y = loaded[0][: args.fashion_train], loaded[1][: args.fashion_train]
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    float_fashion = FashionCNN()
    module = _fit(copy.deepcopy(float_fashion), train, max(1, args.epochs // 5))
    results.append(_measure("FashionCNN", module, FashionCNN(), float_fashion, x[:256], args.repeats))
    for r in results:
        print(
            f"{r['model']:>10}: file {r['file_bytes']:,} B, estimate {r['estimate_bytes']:,} B, header "
            f"{r['overhead_bytes']:,} B (allowed {r['allowed_bytes']:,}), {r['bits_per_weight']} bits/weight, "
            f"float32 {r['float32_bytes']:,} B, identical outputs after reload: {r['identical_outputs']}"
        )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
