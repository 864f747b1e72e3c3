"""``sgsc-summarize <folder>``: a sweep's results as a table and a front plot.

Reads every ``result.json`` under the folder (one per job of ``sgsc-train``; the flat ``*.json`` results of earlier
releases too), prints one row per job and, when a variant ran more than once, mean ± std per variant; writes
``summary.md`` and ``front.png`` (the reported metric against the file's true bytes, one point per job, budgets
labelled by their ``max_drop``, the Pareto front drawn). The reported metric is the test metric where the run read the
test split, else its validation metric.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    """Every result under ``folder``, by run name then folder."""
    files = sorted({*folder.rglob("result.json"), *folder.glob("*.json")})
    runs = []
    for path in files:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and "run" in run and ("val_metric" in run or "test_metric" in run):
            run.setdefault("output_dir", str(path.parent))
            runs.append(run)
    if not runs:
        raise SystemExit(f"`folder` must hold run results (result.json), got {str(folder)!r} with none.")
    return sorted(runs, key=lambda r: (r["run"], r["output_dir"]))


def metric_of(run: dict[str, Any]) -> tuple[str, float]:
    """``(name, value)`` of what the report shows: the test metric if the run read it, else the validation one."""
    if "test_metric" in run:
        return run["test_metric_name"], float(run["test_metric"])
    return run["val_metric_name"], float(run["val_metric"])


def higher_is_better(run: dict[str, Any]) -> bool:
    return metric_of(run)[0].endswith("acc")


def budget_of(run: dict[str, Any]) -> float | None:
    """The run's ``max_drop`` (shortcut or group), if it ran under a budget."""
    sgsc = (run.get("config") or {}).get("sgsc") or {}
    return sgsc.get("max_drop") or (sgsc.get("budget") or {}).get("max_drop")


def pareto_front(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs no other run beats on both bytes (fewer) and the metric (better), by increasing bytes."""
    sign = 1 if higher_is_better(runs[0]) else -1
    front, best = [], -float("inf")
    for run in sorted(runs, key=lambda r: (r["file_bytes"], -sign * metric_of(r)[1])):
        if sign * metric_of(run)[1] > best:
            front.append(run)
            best = sign * metric_of(run)[1]
    return front


def table(runs: list[dict[str, Any]]) -> str:
    name = metric_of(runs[0])[0]
    lines = [
        f"| run | variant | budget | {name} | file bytes | of float32 | bits/weight | pruned ch. | train s | folder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        budget = budget_of(r)
        lines.append(
            f"| {r['run']} | {r['variant']} | {'' if budget is None else budget} | {metric_of(r)[1]:.4f} | "
            f"{r['file_bytes']:,} | {100 * r['file_bytes'] / r['float32_bytes']:.1f} % | {r['bits_per_weight']:.2f} | "
            f"{r.get('pruned_channels', 0)} | {r['train_seconds']:.0f} | {Path(r['output_dir']).name} |"
        )
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["variant"]].append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += [
            "",
            f"| variant | runs | {name} mean ± std | file bytes mean | bits/weight mean |",
            "|---|---|---|---|---|",
        ]
        for variant, g in groups.items():
            values = [metric_of(r)[1] for r in g]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            mean_bytes = statistics.mean(r["file_bytes"] for r in g)
            mean_bits = statistics.mean(r["bits_per_weight"] for r in g)
            lines.append(
                f"| {variant} | {len(g)} | {statistics.mean(values):.4f} ± {std:.4f} | {mean_bytes:,.0f} | "
                f"{mean_bits:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """The front plot (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in runs}):
        pts = [r for r in runs if r["variant"] == variant]
        ax.scatter([r["file_bytes"] for r in pts], [metric_of(r)[1] for r in pts], label=variant)
    for r in runs:
        budget = budget_of(r)
        if budget is not None:
            ax.annotate(f"{budget:g}", (r["file_bytes"], metric_of(r)[1]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    front = pareto_front(runs)
    ax.plot([r["file_bytes"] for r in front], [metric_of(r)[1] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("true file bytes (log)")
    ax.set_ylabel(metric_of(runs[0])[0])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``sgsc-summarize FOLDER [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="sgsc-summarize", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep's folder (searched for result.json)")
    parser.add_argument("--out", type=Path, default=None, help="where summary.md and front.png go (default: folder)")
    args = parser.parse_args(argv)
    runs = load(args.folder)
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "summary.md").write_text(text)
    plot(runs, out / "front.png")
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'front.png'}")


if __name__ == "__main__":
    main()
