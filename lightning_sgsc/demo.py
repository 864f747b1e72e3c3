"""The main job: float and safety-guided compressed training side by side on scikit-learn's digits.

    python -m lightning_sgsc.demo [--epochs 40] [--seed 0] [--json results.json]

Prints a table (test accuracy, bytes, bits per weight, zero-bit channels) for both models; ``--json`` writes the
same figures with the keys ``float_acc``, ``compressed_acc``, ``float_bytes``, ``compressed_bytes``,
``bits_per_weight`` (and a few more).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from pathlib import Path
from typing import Any

#: Settings the demo compresses with (measured in README's results; see `python -m lightning_sgsc.demo --help`).
DEMO_SETTINGS: dict[str, Any] = dict(init_bits=8, bit_weight=0.5, quantizer_lr=0.01, threshold=0.005)


def _train(compress: bool, epochs: int, seed: int, lr: float) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_sgsc import SafetyGuidedQuantization, model_size
    from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    model = ClassifierModule(DigitsCNN(), lr=lr)
    callback = SafetyGuidedQuantization(seed=seed, **DEMO_SETTINGS) if compress else None
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback] if callback else [],
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    test = trainer.test(model, data, verbose=False)[0]
    size = model_size(model)
    return {
        "acc": float(test["test/acc"]),
        "bytes": size.total_bytes if compress else size.float32_bytes,
        "float32_bytes": size.float32_bytes,
        "bits_per_weight": size.bits_per_weight if compress else 32.0,
        "zero_bit_channels": size.zero_bit_channels,
        "restores": sum(e["restored"] for e in callback.history) if callback else 0,
        "train_seconds": seconds,
    }


def run(epochs: int = 40, seed: int = 0, lr: float = 3e-3) -> dict[str, Any]:
    """Trains both models and returns the figures (see the module docstring for the keys)."""
    plain = _train(False, epochs, seed, lr)
    small = _train(True, epochs, seed, lr)
    return {
        "float_acc": plain["acc"],
        "compressed_acc": small["acc"],
        "float_bytes": plain["bytes"],
        "compressed_bytes": small["bytes"],
        "bits_per_weight": small["bits_per_weight"],
        "compressed_fraction": small["bytes"] / plain["bytes"],
        "zero_bit_channels": small["zero_bit_channels"],
        "restored_channels": small["restores"],
        "float_train_seconds": plain["train_seconds"],
        "compressed_train_seconds": small["train_seconds"],
        "epochs": epochs,
        "seed": seed,
        "settings": DEMO_SETTINGS,
        "hardware": f"{platform.machine()} CPU, {platform.system()}, Python {platform.python_version()}",
    }


def format_table(r: dict[str, Any]) -> str:
    """The side-by-side table the demo prints."""
    rows = [
        ("model", "test acc", "bytes", "of float32", "bits/weight", "zero-bit ch.", "train s"),
        ("float32", f"{100 * r['float_acc']:.2f} %", f"{r['float_bytes']:,}", "100.0 %", "32.00", "0",
         f"{r['float_train_seconds']:.1f}"),
        ("sgsc", f"{100 * r['compressed_acc']:.2f} %", f"{r['compressed_bytes']:,}",
         f"{100 * r['compressed_fraction']:.1f} %", f"{r['bits_per_weight']:.2f}", str(r["zero_bit_channels"]),
         f"{r['compressed_train_seconds']:.1f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m lightning_sgsc.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="training epochs for each model (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, init and sampling (default 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the weights")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"`--epochs` must be >= 1, got {args.epochs!r}.")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    print(f"Training a float and a safety-guided compressed DigitsCNN for {args.epochs} epochs each (CPU)...")
    result = run(epochs=args.epochs, seed=args.seed, lr=args.lr)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
