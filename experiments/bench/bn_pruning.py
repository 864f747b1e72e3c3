"""Physical pruning of a BatchNorm network: torchvision's ResNet-18 on digits, channels and MACs removed, CPU latency.

    python experiments/bench/bn_pruning.py [--epochs 6] [--repeats 30]

torchvision's ``resnet18`` (10 classes; the 8×8 digit images upsampled to 32×32, three channels) trains with
SafetyGuidedQuantization from 4 bits with a strong size penalty, so channels reach zero bits and are pruned (their
BatchNorm ``gamma``/``beta`` zeroed with them). The compressed model is exported, reloaded into a fresh float
skeleton (outputs compared with ``torch.equal``), its zero channels removed (``prune_zero_channels``) and timed against
the same model unpruned, alternating in one process, median of ``--repeats`` rounds at batch 1 and 64. Test accuracy
is reported for the float ResNet-18 trained alike and for the compressed one (digits' test split, once). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from export_size import _latency
from torch import nn

from lightning_sgsc import SafetyGuidedQuantization, export_compressed, load_compressed, model_size, prune_zero_channels
from lightning_sgsc.examples import ClassifierModule, DigitsDataModule
from lightning_sgsc.examples.training import quiet_trainer

SETTINGS: dict[str, Any] = {
    "quantization": {"init_bits": 4, "lr": 0.05},
    "losses": {"bit_weight": 0.5},
    "feedback": {"threshold": 0.01},
}


class DigitsResNet18(nn.Module):
    """torchvision's ResNet-18 on 1×8×8 digits: upsampled to 3×32×32 inside, so any digits batch goes in."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.resnet = resnet18(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=32, mode="nearest").expand(-1, 3, -1, -1)
        return self.resnet(x)


def _train(compress: bool, epochs: int) -> tuple[ClassifierModule, DigitsDataModule, float]:
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(seed=0)
    module = ClassifierModule(DigitsResNet18(), lr=1e-3)
    callbacks: list[pl.Callback] = [SafetyGuidedQuantization(seed=0, **SETTINGS)] if compress else []
    trainer = quiet_trainer(epochs, callbacks)
    trainer.fit(module, data)
    return module, data, float(trainer.test(module, data, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _, _, float_acc = _train(False, args.epochs)
    module, data, acc = _train(True, args.epochs)
    net = module.net.eval()
    size = model_size(net)
    x = data.test_set.tensors[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.sgsc"
        file_bytes = export_compressed(net, path)
        unpruned = load_compressed(path, DigitsResNet18()).eval()
        pruned = load_compressed(path, DigitsResNet18()).eval()
    with torch.no_grad():
        identical = torch.equal(unpruned(x), net(x))
    report = prune_zero_channels(pruned, x[:64])
    with torch.no_grad():
        same_argmax = bool((pruned(x).argmax(1) == unpruned(x).argmax(1)).all())
    latency = {}
    for batch in (1, 64):
        before, after = _latency(unpruned, pruned, x[:batch], args.repeats)
        latency[f"batch{batch}"] = {"float_ms": before * 1e3, "pruned_ms": after * 1e3, "speedup": before / after}
    result = {
        "model": "torchvision resnet18 (digits, 32x32)",
        "float_test_acc": float_acc,
        "compressed_test_acc": acc,
        "float32_bytes": size.float32_bytes,
        "file_bytes": file_bytes,
        "identical_after_reload": identical,
        "zero_bit_channels": size.zero_bit_channels,
        "channels_removed": sum(report.removed.values()),
        "zero_channels_kept": sum(report.kept_zero.values()),
        "params": [report.params_before, report.params_after],
        "macs": [report.macs_before, report.macs_after],
        "max_abs_diff": report.max_abs_diff,
        "same_argmax_on_test": same_argmax,
        "latency": latency,
        "settings": SETTINGS,
        "epochs": args.epochs,
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    print(
        f"resnet18 on digits: test acc float {100 * float_acc:.2f} %, compressed {100 * acc:.2f} % at {file_bytes:,} B"
        f" ({100 * file_bytes / size.float32_bytes:.1f} % of float32); channels removed {result['channels_removed']:,}"
        f" (zero channels kept {result['zero_channels_kept']:,}); params {report.params_before:,} ->"
        f" {report.params_after:,}; MACs {report.macs_before:,} -> {report.macs_after:,}; max |diff| after pruning"
        f" {report.max_abs_diff:.2e}; latency pruned vs unpruned: batch 1 {latency['batch1']['speedup']:.2f}x"
        f" ({latency['batch1']['float_ms']:.2f} -> {latency['batch1']['pruned_ms']:.2f} ms), batch 64"
        f" {latency['batch64']['speedup']:.2f}x ({latency['batch64']['float_ms']:.1f} ->"
        f" {latency['batch64']['pruned_ms']:.1f} ms)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
