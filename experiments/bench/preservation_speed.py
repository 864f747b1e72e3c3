"""Preservation-set scoring speed: all three strategies (Grad-CAM, uncertainty, k-means) on a pool of images.

    python experiments/bench/preservation_speed.py [--pool 60000] [--size 512] [--data DIR]

Uses the Fashion-MNIST training images when present (``apt-get install -y dataset-fashion-mnist``), otherwise random
1×28×28 tensors (the cost does not depend on pixel values). The model is the reference FashionCNN at its
initialisation (the cost does not depend on its weights either). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.utils.data import TensorDataset

from lightning_sgsc.examples import FashionCNN
from lightning_sgsc.examples.data import FASHION_MNIST_DIR, load_idx_images
from lightning_sgsc.preservation import build_preservation_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=60_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data", default=str(FASHION_MNIST_DIR))
    args = parser.parse_args()
    loaded = load_idx_images(args.data, "train")
    if loaded is None:
        source = "random 1x28x28 tensors"
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(args.pool, 1, 28, 28, generator=g), torch.randint(0, 10, (args.pool,), generator=g)
    else:
        source = f"Fashion-MNIST train ({args.data})"
        x, y = loaded[0][: args.pool], loaded[1][: args.pool]
    torch.manual_seed(0)
    model = FashionCNN().eval()
    start = time.perf_counter()
    pset = build_preservation_set(model, TensorDataset(x, y), args.size, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    pool = len(y)
    print(
        f"scored {pool} candidates ({source}) with gradcam + uncertainty + kmeans in {seconds:.1f} s: "
        f"{pool / seconds:.0f} candidates/s; chose {len(pset)} on {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        json.dumps(
            {
                "candidates_per_s": round(pool / seconds, 1),
                "pool": pool,
                "seconds": round(seconds, 2),
                "size": len(pset),
                "source": source,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
