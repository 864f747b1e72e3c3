"""True exported bytes against the bit-count estimate, for the demo CNN (digits) and the reference FashionCNN.

    python experiments/bench/export_size.py [--epochs 10] [--fashion-train 6000]

Each model is trained briefly with SafetyGuidedQuantization (so its channels have real, mixed bit depths), exported,
reloaded into a fresh float skeleton and checked for identical outputs. The FashionCNN trains on the first
``--fashion-train`` Fashion-MNIST training images (random data when the dataset is absent: sizes stay meaningful,
accuracy does not). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedQuantization, model_size
from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule, FashionCNN
from lightning_sgsc.examples.data import FASHION_MNIST_DIR, load_idx_images
from lightning_sgsc.export import export_compressed, load_compressed


def _fit(net: torch.nn.Module, train: DataLoader, epochs: int) -> ClassifierModule:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(net, lr=3e-3)
    callback = SafetyGuidedQuantization(bit_weight=0.5, quantizer_lr=0.01, threshold=0.005)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=train)
    return module


def _measure(name: str, module: ClassifierModule, skeleton: torch.nn.Module, x: torch.Tensor) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.sgsc"
        file_bytes = export_compressed(module.net, path)
        loaded = load_compressed(path, skeleton).eval()
        identical = bool(torch.equal(loaded(x), module.net.eval()(x)))
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fashion-train", type=int, default=6000)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = []
    digits = DigitsDataModule()
    digits.setup()
    module = _fit(DigitsCNN(), digits.train_dataloader(), args.epochs)
    results.append(_measure("DigitsCNN", module, DigitsCNN(), digits.test_set.tensors[0]))
    loaded = load_idx_images(FASHION_MNIST_DIR, "train")
    if loaded is None:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(args.fashion_train, 1, 28, 28, generator=g), torch.randint(0, 10, (args.fashion_train,))
    else:
        x, y = loaded[0][: args.fashion_train], loaded[1][: args.fashion_train]
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    module = _fit(FashionCNN(), train, max(1, args.epochs // 5))
    results.append(_measure("FashionCNN", module, FashionCNN(), x[:256]))
    for r in results:
        print(
            f"{r['model']:>10}: file {r['file_bytes']:,} B, estimate {r['estimate_bytes']:,} B, header "
            f"{r['overhead_bytes']:,} B (allowed {r['allowed_bytes']:,}), {r['bits_per_weight']} bits/weight, "
            f"float32 {r['float32_bytes']:,} B, identical outputs after reload: {r['identical_outputs']}"
        )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
