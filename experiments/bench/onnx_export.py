"""ONNX deployment per model: float ONNX bytes vs compressed ONNX bytes vs ``.sgsc`` bytes, and ONNX Runtime CPU latency
of the float against the compressed file at batch 1 and 64, side by side in one process.

    python experiments/bench/onnx_export.py [--repeats 30]

Each model trains briefly with SafetyGuidedQuantization at the demo's settings (DigitsCNN and a residual BatchNorm CNN
on digits, 40 and 20 epochs; FashionCNN on 6,000 Fashion-MNIST images for 3 epochs, random data when the dataset is
absent; a CharTransformer with 4 layers on random tokens for 300 steps), and its float twin trains alike without the
callback. Then ``export_onnx`` writes the compressed file (pruned, integer weights, checked in ONNX Runtime) and
torch's exporter the float one; classifiers are compared on their test data (ONNX Runtime's argmax against the
compressed PyTorch model's). Latency: median of ``--repeats`` alternating runs per side, the compressed file both
with its weights dequantized at load (``runtime_session``, the default) and with ``DequantizeLinear`` at every run.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedQuantization, export_compressed, export_onnx
from lightning_sgsc.demo import DEMO_SETTINGS
from lightning_sgsc.deploy import runtime_session
from lightning_sgsc.examples import CharTransformer, ClassifierModule, DigitsCNN, DigitsDataModule, FashionCNN
from lightning_sgsc.examples.data import FASHION_MNIST_DIR, load_idx_images
from lightning_sgsc.examples.models import LanguageModule
from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.settings import merge_settings


def _residual_bn_cnn() -> torch.nn.Module:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers.zoo import ResidualBNCNN

    return ResidualBNCNN()


def _data(name: str) -> tuple[DataLoader, torch.Tensor, torch.Tensor | None]:
    """``(training loader, test inputs, test labels)``."""
    g = torch.Generator().manual_seed(0)
    if name in ("digits_cnn", "residual_bn_cnn"):
        dm = DigitsDataModule(seed=0)
        dm.setup("fit")
        dm.setup("test")
        return dm.train_dataloader(), dm.test_set.tensors[0], dm.test_set.tensors[1]
    if name == "fashion_cnn":
        train, test = load_idx_images(FASHION_MNIST_DIR, "train"), load_idx_images(FASHION_MNIST_DIR, "t10k")
        if train is None or test is None:
            x, y = torch.rand(6000, 1, 28, 28, generator=g), torch.randint(0, 10, (6000,), generator=g)
            tx, ty = x[:1000], y[:1000]
        else:
            (x, y), (tx, ty) = train, test
        return DataLoader(TensorDataset(x[:6000], y[:6000]), batch_size=64, shuffle=True, generator=g), tx, ty
    tokens = torch.randint(0, 27, (4800, 33), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16, shuffle=True), tokens[:64, :-1], None


def _train(name: str, compress: bool, loader: DataLoader) -> torch.nn.Module:
    pl.seed_everything(0, verbose=False)
    net = {
        "digits_cnn": DigitsCNN,
        "residual_bn_cnn": _residual_bn_cnn,
        "fashion_cnn": FashionCNN,
        "char_transformer": CharTransformer,
    }[name]()
    module = LanguageModule(net) if name == "char_transformer" else ClassifierModule(net, lr=3e-3)
    settings = merge_settings(DEMO_SETTINGS, {"preservation": {"pool": 2000}})
    callbacks: list[pl.Callback] = [SafetyGuidedQuantization(seed=0, **settings)] if compress else []
    epochs = {"digits_cnn": 40, "residual_bn_cnn": 20, "fashion_cnn": 3, "char_transformer": 1}[name]
    steps = 300 if name == "char_transformer" else -1
    quiet_trainer(epochs, callbacks, max_steps=steps, limit_val_batches=0).fit(module, train_dataloaders=loader)
    return module.net.eval()


def _latency(sessions: list[Any], x: np.ndarray, repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in sessions]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        s.run(None, f)  # warm-up
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def measure(name: str, repeats: int) -> dict[str, Any]:
    loader, tx, ty = _data(name)
    float_net = _train(name, False, loader)
    net = _train(name, True, loader)
    with tempfile.TemporaryDirectory() as tmp:
        sgsc_bytes = export_compressed(net, Path(tmp) / "m.sgsc")
        report = export_onnx(net, tx[:64], Path(tmp) / "q.onnx")
        dynamic = ({0: torch.export.Dim.DYNAMIC},)
        program = torch.onnx.export(float_net, (tx[:64],), dynamo=True, dynamic_shapes=dynamic, verbose=False)
        assert program is not None
        program.save(str(Path(tmp) / "f.onnx"))
        float_bytes = (Path(tmp) / "f.onnx").stat().st_size
        sessions = [  # float; compressed, weights dequantized at load; compressed, DequantizeLinear at every run
            runtime_session(Path(tmp) / "f.onnx"),
            runtime_session(Path(tmp) / "q.onnx"),
            runtime_session(Path(tmp) / "q.onnx", fold_weights=False),
        ]
        compressed = sessions[1].run(None, {sessions[1].get_inputs()[0].name: tx.numpy()})[0]
        with torch.no_grad():
            expected = net(tx).numpy()
        result: dict[str, Any] = {
            "model": name,
            "float_onnx_bytes": float_bytes,
            "onnx_bytes": report.file_bytes,
            "sgsc_bytes": sgsc_bytes,
            "weight_types": sorted(set(report.weight_types.values())),
            "max_abs_diff": float(np.abs(compressed - expected).max()),
            "channels_removed": sum(report.prune.removed.values()) if report.prune else 0,
            "macs": [report.prune.macs_before, report.prune.macs_after] if report.prune else None,
        }
        if ty is not None:
            result["same_argmax_on_test"] = bool((compressed.argmax(-1) == expected.argmax(-1)).all())
            result["test_acc"] = float((compressed.argmax(-1) == ty.numpy()).mean())
        for batch in (1, 64):
            f_ms, q_ms, dq_ms = _latency(sessions, tx[:batch].numpy(), repeats)
            result[f"batch{batch}"] = {
                "float_ms": f_ms,
                "compressed_ms": q_ms,
                "speedup": f_ms / q_ms,
                "compressed_dq_every_run_ms": dq_ms,
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default="digits_cnn,fashion_cnn,char_transformer,residual_bn_cnn")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = []
    for name in args.models.split(","):
        r = measure(name, args.repeats)
        results.append(r)
        b1, b64 = r["batch1"], r["batch64"]
        print(
            f"{name:>17}: float ONNX {r['float_onnx_bytes']:,} B, compressed ONNX {r['onnx_bytes']:,} B"
            f" ({', '.join(r['weight_types'])}), .sgsc {r['sgsc_bytes']:,} B; max |diff| {r['max_abs_diff']:.1e}"
            + (f", same argmax on test: {r['same_argmax_on_test']}" if "same_argmax_on_test" in r else "")
            + f"; channels removed {r['channels_removed']}; latency float vs compressed: batch 1 {b1['float_ms']:.3f}"
            f" vs {b1['compressed_ms']:.3f} ms ({b1['speedup']:.2f}x), batch 64 {b64['float_ms']:.2f} vs"
            f" {b64['compressed_ms']:.2f} ms ({b64['speedup']:.2f}x); DequantizeLinear at every run:"
            f" {b1['compressed_dq_every_run_ms']:.3f} / {b64['compressed_dq_every_run_ms']:.2f} ms",
            flush=True,
        )
    hardware = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(json.dumps({"hardware": hardware, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
