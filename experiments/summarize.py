"""Turn a folder of run results (``experiments/results/<sweep>/*.json``) into a Markdown table and a Pareto plot.

    python experiments/summarize.py experiments/results/fashion_cnn [--out experiments/results/fashion_cnn]

Writes ``summary.md`` (one row per run, plus mean ± std per variant when several seeds ran) and ``pareto.png``
(test metric against true bytes, one point per run, the Pareto front drawn).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    """Every result JSON in ``folder`` (sorted by run name)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not runs:
        raise SystemExit(f"`folder` must hold run results (*.json), got {str(folder)!r} with none.")
    return runs


def higher_is_better(run: dict[str, Any]) -> bool:
    return run["test_metric_name"].endswith("acc")


def pareto_front(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs no other run beats on both bytes (fewer) and test metric (better), by increasing bytes."""
    sign = 1 if higher_is_better(runs[0]) else -1
    front, best = [], -float("inf")
    for run in sorted(runs, key=lambda r: (r["file_bytes"], -sign * r["test_metric"])):
        if sign * run["test_metric"] > best:
            front.append(run)
            best = sign * run["test_metric"]
    return front


def table(runs: list[dict[str, Any]]) -> str:
    metric = runs[0]["test_metric_name"]
    lines = [
        f"| run | variant | {metric} | file bytes | of float32 | bits/weight | pruned ch. | train s | hardware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['run']} | {r['variant']} | {r['test_metric']:.4f} | {r['file_bytes']:,} | "
            f"{100 * r['file_bytes'] / r['float32_bytes']:.1f} % | {r['bits_per_weight']:.2f} | "
            f"{r.get('pruned_channels', 0)} | {r['train_seconds']:.0f} | {r['hardware']} |"
        )
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["variant"]].append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += [
            "",
            f"| variant | runs | {metric} mean ± std | file bytes mean | bits/weight mean |",
            "|---|---|---|---|---|",
        ]
        for variant, g in groups.items():
            values = [r["test_metric"] for r in g]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            mean_bytes = statistics.mean(r["file_bytes"] for r in g)
            mean_bits = statistics.mean(r["bits_per_weight"] for r in g)
            mean_metric = statistics.mean(values)
            lines.append(
                f"| {variant} | {len(g)} | {mean_metric:.4f} ± {std:.4f} | {mean_bytes:,.0f} | {mean_bits:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in runs}):
        pts = [r for r in runs if r["variant"] == variant]
        ax.scatter([r["file_bytes"] for r in pts], [r["test_metric"] for r in pts], label=variant)
    front = pareto_front(runs)
    ax.plot([r["file_bytes"] for r in front], [r["test_metric"] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("true exported bytes (log)")
    ax.set_ylabel(runs[0]["test_metric_name"])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = load(args.folder)
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table(runs))
    plot(runs, out / "pareto.png")
    print(table(runs))
    print(f"wrote {out / 'summary.md'} and {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
