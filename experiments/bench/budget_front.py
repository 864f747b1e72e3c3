"""The accuracy/size front of the budget beside the fixed penalty, from ``budget_finetune.py`` results.

    python experiments/bench/budget_front.py experiments/results/budget/fashion_finetune [--out front.png]

Reads every ``<task>-md<max_drop>-seed<N>.json`` in the folder (``fixed``: the fixed-penalty fine-tune; ``float``:
the float model trained as long, uncompressed), prints one row per budget (per seed, then the mean) and draws the
change of the test metric against the float model of the same seed, per run, over the exported bytes, each budget's
level dotted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The runs of ``folder`` grouped by budget label (``"0.003"``, ..., ``"fixed"``), seeds in order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(folder.glob("*-md*-seed*.json")):
        label = path.stem.split("-md", 1)[1].rsplit("-seed", 1)[0]
        groups[label].append(json.loads(path.read_text()))
    if not groups:
        raise SystemExit(f"`folder` must hold budget_finetune.py results, got {str(folder)!r} with none.")
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] in ("fixed", "float"), kv[0])))


def change(run: dict[str, Any]) -> float:
    """Test change against the float model of the same seed: points for an accuracy, nats for a loss."""
    is_loss = run.get("metric", "test/acc").endswith("loss")
    return run["test"] - run["float_test"] if is_loss else 100 * (run["test"] - run["float_test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="the plot (default: <folder>/front.png)")
    args = parser.parse_args()
    groups = load(args.folder)
    unit = "nats" if next(iter(groups.values()))[0].get("metric", "test/acc").endswith("loss") else "points"
    digits = 4 if unit == "nats" else 2
    for label, runs in groups.items():
        per_seed = ", ".join(f"{change(r):+.{digits}f} at {r['bytes'] / 1000:.1f} KB" for r in runs)
        mean_kb = statistics.mean(r["bytes"] for r in runs) / 1000
        fraction = statistics.mean(r["fraction"] for r in runs)
        mean = statistics.mean(map(change, runs))
        print(
            f"max_drop {label:>6}: seeds {[r['seed'] for r in runs]}: {per_seed};"
            f" mean {mean:+.{digits}f} {unit} at {mean_kb:.1f} KB ({100 * fraction:.2f} % of float32)"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in groups.items():
        name = {"fixed": "fixed penalty (bit_weight 0.5)", "float": "float, trained as long"}.get(
            label, f"max_drop {label}"
        )
        marker = {"fixed": "x", "float": "s"}.get(label, "o")
        points = ax.scatter([r["bytes"] / 1000 for r in runs], [change(r) for r in runs], label=name, marker=marker)
        if label not in ("fixed", "float"):  # the budget itself (judged on validation data), in the points' colour
            level = float(label) if unit == "nats" else -100 * float(label)  # a loss may rise, an accuracy fall
            ax.axhline(level, color=points.get_facecolor()[0], linestyle=":", linewidth=0.8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    low, high = ax.get_xlim()  # round ticks in KB, unlabelled minor ones
    ax.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000) if low <= t <= high])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("exported file, KB (log)")
    ax.set_ylabel(f"test change vs float, {unit}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.folder / "front.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
