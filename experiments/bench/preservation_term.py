"""What the preservation term costs or brings: the same runs with and without it, without and with a size penalty.

    python experiments/bench/preservation_term.py [--seeds 0-2]                    # the digits demo, in process
    python experiments/bench/preservation_term.py --summarize experiments/results/preservation_term

The demo part trains the digits CNN (40 epochs, the demo's settings) per seed: float; compressed with the preservation
term (the callback's default, distillation from the float weights) and without it (no preservation set: no term, no
feedback), each at ``bit_weight`` 0 (no size term: every layer stays near its 8 bits) and at the demo's 0.5. The
Hydra runs for ``fashion_cnn`` and ``names_transformer`` are in experiments/README.md; ``--summarize DIR`` tabulates
their JSON results (``<task>/<model>-<variant>-seed<N>.json``) with per-seed values and the mean difference.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import warnings
from pathlib import Path
from typing import Any

from lightning_sgsc import demo
from lightning_sgsc.settings import merge_settings

WITHOUT = {"losses": {"preservation_weight": 0.0}, "preservation": {"size": 0}}


def parse_seeds(text: str) -> list[int]:
    """``"0-2"`` or ``"0,3,5"``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def run_demo(seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        plain = demo.train_one(False, 40, seed, 3e-3)
        for bit_weight in (0.0, demo.DEMO_SETTINGS["losses"]["bit_weight"]):
            for term, extra in (("with", {}), ("without", WITHOUT)):
                settings = merge_settings(demo.DEMO_SETTINGS, {"losses": {"bit_weight": bit_weight}}, extra)
                small = demo.train_one(True, 40, seed, 3e-3, settings)
                row = {
                    "seed": seed,
                    "bit_weight": bit_weight,
                    "term": term,
                    "acc": small["acc"],
                    "float_acc": plain["acc"],
                    "bytes": small["bytes"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def summarize_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per ``bit_weight``: the metric with and without the term per seed, their means and the mean difference."""
    out = []
    for bw in sorted({r["bit_weight"] for r in rows}):
        pick = {(r["term"], r["seed"]): r for r in rows if r["bit_weight"] == bw}
        seeds = sorted({s for t, s in pick if ("with", s) in pick and ("without", s) in pick})
        with_ = [pick[("with", s)][metric] for s in seeds]
        without = [pick[("without", s)][metric] for s in seeds]
        out.append(
            {
                "bit_weight": bw,
                "seeds": seeds,
                "with": with_,
                "without": without,
                "bytes_with": [pick[("with", s)]["bytes"] for s in seeds],
                "bytes_without": [pick[("without", s)]["bytes"] for s in seeds],
                "mean_with": statistics.mean(with_),
                "mean_without": statistics.mean(without),
                "mean_difference": statistics.mean(a - b for a, b in zip(with_, without, strict=True)),
            }
        )
    return out


def read_hydra(folder: Path) -> list[dict[str, Any]]:
    """The JSON results of the Hydra runs in ``folder`` (its subfolders ``*bw<value>``), as rows."""
    rows = []
    for path in sorted(folder.glob("*/*.json")):
        r = json.loads(path.read_text())
        if r.get("variant") not in ("safe", "unsafe"):
            continue
        rows.append(
            {
                "seed": r["config"]["seed"],
                "bit_weight": r["config"]["sgsc"]["bit_weight"],
                "term": "with" if r["variant"] == "safe" else "without",
                r["test_metric_name"].replace("test/", ""): r["test_metric"],
                "bytes": r["file_bytes"],
                "task": r["config"]["task_name"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-2")
    parser.add_argument("--summarize", type=Path, default=None, metavar="DIR", help="tabulate Hydra results there")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.summarize is not None:
        summary = {}
        for task in sorted({r["task"] for r in read_hydra(args.summarize)}):
            rows = [r for r in read_hydra(args.summarize) if r["task"] == task]
            metric = "acc" if "acc" in rows[0] else "loss"
            summary[task] = summarize_rows(rows, metric)
            for s in summary[task]:
                print(f"{task} bit_weight {s['bit_weight']}: {metric} with {s['with']} without {s['without']}")
                print(f"    means {s['mean_with']:.4f} vs {s['mean_without']:.4f}, diff {s['mean_difference']:+.4f}")
        print(json.dumps(summary))
        return
    summary = {"demo": summarize_rows(run_demo(parse_seeds(args.seeds)), "acc")}
    for s in summary["demo"]:
        print(f"demo bit_weight {s['bit_weight']}: mean acc with {s['mean_with']:.4f} without {s['mean_without']:.4f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
