"""The main job: a float model, then the same model compressed under an accuracy budget, on scikit-learn's digits.

    python -m lightning_sgsc.demo [--epochs 40] [--compress-epochs 60] [--max-drop 0.0075] [--seed 0]
                                  [--json results.json] [--onnx demo.onnx] [--one-fit]

The float model trains first; its validation accuracy is the budget's reference. Then a copy of it is fine-tuned
with :class:`SafetyGuidedQuantization` and ``max_drop``: as small as possible while the validation accuracy stays
within ``max_drop`` of the float model's. ``--one-fit``: no float model first; one fit of 100 epochs finds its
reference at the validation accuracy's plateau (:func:`run_one_fit`). The test split is looked at once, at the end,
for the table.

Prints a table (validation and test accuracy, bytes, bits per weight, zero-bit channels) for both models, where the
compressed model's bytes are the size of its exported bit-packed file (checked to reload with identical outputs);
``--json`` writes the same figures with the keys ``float_acc``, ``compressed_acc``, ``float_bytes``,
``compressed_bytes``, ``bits_per_weight`` (and a few more).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from lightning_sgsc.settings import merge_settings

#: Settings the demo compresses with, group by group (see `python -m lightning_sgsc.demo --help`).
#: ``init_headroom=0``: exponents fitted tightly at the start, as the demo was tuned (the default 2 bits of headroom
#: help short runs, such as the peers bench's 1,000 steps).
DEMO_SETTINGS: dict[str, Any] = {
    "quantization": {"init_bits": 8, "init_headroom": 0, "lr": 0.01},
    "losses": {"bit_weight": 0.5},
    "feedback": {"threshold": 0.005},
}

#: The demo's budget: as small as the controller can make it while the validation accuracy stays within 0.75 points
#: of the float model's (``reference_value``, filled in by :func:`run`), fine-tuning the trained float model; the last
#: quarter of the fit is the cool-down. No preservation set: under this budget the distillation term made the demo's
#: models twice as large at the same mean test accuracy (experiments/README.md, "A budget").
DEMO_BUDGET: dict[str, Any] = {
    "budget": {"max_drop": 0.0075, "monitor": "val/acc", "mode": "max", "warmup_checks": 0, "cooldown_fraction": 0.25},
    "preservation": {"size": 0},
}

#: Share of the digits held out for validation in the demo: 360 images, so one image moves the accuracy by 0.28
#: points (with the default 10 %, one image is 0.56 points, more than half the budget).
VAL_FRACTION = 0.2


def train_one(
    compress: bool,
    epochs: int,
    seed: int,
    lr: float,
    settings: dict[str, Any] | None = None,
    onnx: Path | None = None,
    val_fraction: float = 0.1,
    start: Any = None,
) -> dict[str, Any]:
    """One fit of the demo, float or compressed (with ``settings``, default :data:`DEMO_SETTINGS`), from scratch or
    from ``start`` (a trained float :class:`ClassifierModule`, copied: the compression fine-tunes it); a compressed
    model is also written as an ONNX file to ``onnx`` when given (checked in ONNX Runtime on the test split). The
    result holds the fitted module under ``"module"``."""
    import copy

    import lightning.pytorch as pl
    import torch

    from lightning_sgsc import SafetyGuidedQuantization, SGSCRuntimeError, model_size
    from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule
    from lightning_sgsc.examples.training import quiet_trainer
    from lightning_sgsc.export import export_compressed, load_compressed
    from lightning_sgsc.size import format_size_table

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed, val_fraction=val_fraction)
    model = ClassifierModule(DigitsCNN(), lr=lr) if start is None else copy.deepcopy(start)
    callback = (
        SafetyGuidedQuantization(seed=seed, **(DEMO_SETTINGS if settings is None else settings)) if compress else None
    )
    trainer = quiet_trainer(epochs, [callback] if callback else [])
    began = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - began
    val = trainer.validate(model, data, verbose=False)[0]
    test = trainer.test(model, data, verbose=False)[0]
    size = model_size(model)
    file_bytes = size.float32_bytes
    if compress:  # the true size: export the bit-packed artifact and check that it reloads exactly
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "digits_cnn.sgsc"
            file_bytes = export_compressed(model.net, path)
            skeleton = load_compressed(path, DigitsCNN()).eval()
            x = data.test_set.tensors[0]
            if not torch.equal(skeleton(x), model.net.eval()(x)):
                raise SGSCRuntimeError("The exported model's outputs differ from the trained model's.")
    onnx_bytes = None
    if compress and onnx is not None:
        from lightning_sgsc.deploy import export_onnx

        onnx.parent.mkdir(parents=True, exist_ok=True)
        onnx_bytes = export_onnx(model.net, data.test_set.tensors[0], onnx).file_bytes
    return {
        "module": model,
        "onnx_bytes": onnx_bytes,
        "acc": float(test["test/acc"]),
        "val_acc": float(val["val/acc"]),
        "bytes": file_bytes,
        "estimate_bytes": size.total_bytes,
        "size_table": format_size_table(size) if compress else "",
        "float32_bytes": size.float32_bytes,
        "bits_per_weight": size.bits_per_weight if compress else 32.0,
        "zero_bit_channels": size.zero_bit_channels,
        "restores": sum(e["restored"] for e in callback.history) if callback else 0,
        "budget": callback.budget_summary() if callback else None,
        "kept_alive": sum(e["kept_alive"] for e in callback.history) if callback else 0,
        "train_seconds": seconds,
    }


def run(
    epochs: int = 40,
    seed: int = 0,
    lr: float = 3e-3,
    onnx: Path | None = None,
    compress_epochs: int = 60,
    max_drop: float = DEMO_BUDGET["budget"]["max_drop"],
) -> dict[str, Any]:
    """Trains the float model, then compresses it within ``max_drop`` of its validation accuracy (the budget's
    reference: the float model's, measured on the validation split); returns the figures (see the module
    docstring for the keys)."""
    plain = train_one(False, epochs, seed, lr, val_fraction=VAL_FRACTION)
    reference = {"budget": {"max_drop": max_drop, "reference_value": plain["val_acc"]}}
    settings = merge_settings(DEMO_SETTINGS, DEMO_BUDGET, reference)
    small = train_one(
        True, compress_epochs, seed, lr, settings, onnx=onnx, val_fraction=VAL_FRACTION, start=plain["module"]
    )
    return _figures(plain, small, epochs, compress_epochs, seed, settings)


def _figures(
    plain: dict[str, Any], small: dict[str, Any], epochs: int, compress_epochs: int, seed: int, settings: Any
) -> dict[str, Any]:
    return {
        "float_acc": plain["acc"],
        "compressed_acc": small["acc"],
        "float_val_acc": plain["val_acc"],
        "compressed_val_acc": small["val_acc"],
        "float_bytes": plain["bytes"],
        "compressed_bytes": small["bytes"],
        "onnx_bytes": small["onnx_bytes"],
        "compressed_estimate_bytes": small["estimate_bytes"],
        "bits_per_weight": small["bits_per_weight"],
        "compressed_fraction": small["bytes"] / plain["bytes"],
        "zero_bit_channels": small["zero_bit_channels"],
        "restored_channels": small["restores"],
        "kept_alive_channels": small["kept_alive"],
        "float_train_seconds": plain["train_seconds"],
        "compressed_train_seconds": small["train_seconds"],
        "epochs": epochs,
        "compress_epochs": compress_epochs,
        "seed": seed,
        "settings": dict(settings),
        "size_table": small["size_table"],
        "hardware": f"{platform.machine()} CPU, {platform.system()}, Python {platform.python_version()}",
    }


def run_one_fit(
    epochs: int = 100,
    seed: int = 0,
    lr: float = 3e-3,
    onnx: Path | None = None,
    max_drop: float = DEMO_BUDGET["budget"]["max_drop"],
) -> dict[str, Any]:
    """The budget in one fit from scratch: :class:`SafetyGuidedQuantization` with ``max_drop`` and no reference
    trains the DigitsCNN ``epochs`` epochs (size term off until the validation accuracy's plateau, which becomes the
    reference; then compressing within the budget; the last 15 % the cool-down, as many epochs as :func:`run`'s at
    its defaults). The float model it is compared with trains as long. Returns the same figures as :func:`run`, plus
    ``reference`` and ``reference_step``."""
    plain = train_one(False, epochs, seed, lr, val_fraction=VAL_FRACTION)
    one_fit = {"budget": {"max_drop": max_drop, "warmup_checks": 1, "cooldown_fraction": 0.15}}
    settings = merge_settings(DEMO_SETTINGS, DEMO_BUDGET, one_fit)
    small = train_one(True, epochs, seed, lr, settings, onnx=onnx, val_fraction=VAL_FRACTION)
    return {
        **_figures(plain, small, epochs, 0, seed, settings),
        "reference": small["budget"]["reference"],
        "reference_step": small["budget"]["reference_step"],
    }


def format_table(r: dict[str, Any]) -> str:
    """The side-by-side table the demo prints."""
    from lightning_sgsc.size import format_rows

    rows = [
        ("model", "val acc", "test acc", "bytes", "of float32", "bits/weight", "zero-bit ch.", "train s"),
        (
            "float32",
            f"{100 * r['float_val_acc']:.2f} %",
            f"{100 * r['float_acc']:.2f} %",
            f"{r['float_bytes']:,}",
            "100.0 %",
            "32.00",
            "0",
            f"{r['float_train_seconds']:.1f}",
        ),
        (
            "sgsc",
            f"{100 * r['compressed_val_acc']:.2f} %",
            f"{100 * r['compressed_acc']:.2f} %",
            f"{r['compressed_bytes']:,}",
            f"{100 * r['compressed_fraction']:.1f} %",
            f"{r['bits_per_weight']:.2f}",
            str(r["zero_bit_channels"]),
            f"{r['compressed_train_seconds']:.1f}",
        ),
    ]
    return format_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m lightning_sgsc.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the float model (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, init and sampling (default 0)")
    parser.add_argument("--compress-epochs", type=int, default=60, help="epochs of the compressing fine-tune")
    parser.add_argument(
        "--max-drop",
        type=float,
        default=DEMO_BUDGET["budget"]["max_drop"],
        help="the budget: validation accuracy drop allowed",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the weights")
    parser.add_argument(
        "--one-fit",
        action="store_true",
        help="the budget in one fit from scratch, --epochs + --compress-epochs long, its reference found at the"
        " plateau (no float model first; the float model compared trains as long)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--onnx", type=Path, default=None, metavar="PATH", help='also write the compressed model as ONNX (extra "onnx")'
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "compress_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)!r}.")
    if not 0 < args.max_drop < 1:
        parser.error(f"`--max-drop` must be in (0, 1) (accuracy, absolute), got {args.max_drop!r}.")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    if args.one_fit:
        total = args.epochs + args.compress_epochs
        print(
            f"Training a DigitsCNN for {total} epochs under the budget from scratch (reference found at the plateau,"
            f" then within {100 * args.max_drop:g} points of it), and a float one as long (CPU)..."
        )
        result = run_one_fit(total, args.seed, args.lr, args.onnx, args.max_drop)
    else:
        print(
            f"Training a float DigitsCNN for {args.epochs} epochs, then compressing it for {args.compress_epochs}"
            f" epochs within {100 * args.max_drop:g} points of its validation accuracy (CPU)..."
        )
        result = run(args.epochs, args.seed, args.lr, args.onnx, args.compress_epochs, args.max_drop)
    print(format_table(result))
    if args.one_fit:
        print(f"reference {100 * result['reference']:.2f} % (val), fixed at step {result['reference_step']}")
    if args.onnx:
        print(
            f"\nONNX file {args.onnx}: {result['onnx_bytes']:,} bytes (integer weights, pruned channels removed,"
            f" checked in ONNX Runtime); the bit-packed .sgsc file: {result['compressed_bytes']:,} bytes"
        )
    print()
    print("compressed model, per layer (bytes of the bit-packed file, less its header):")
    print(result["size_table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
