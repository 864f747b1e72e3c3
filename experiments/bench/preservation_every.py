"""What adding the preservation loss less often costs in quality: the demo and a few peers points, side by side.

    python experiments/bench/preservation_every.py [--every 8,16] [--demo-seeds 0-9] [--peers-seeds 0,1,2] [--jobs 2]
    python experiments/bench/preservation_every.py --demo-epochs 1 --peers-steps 3 --peers-data random  # smoke run

``preservation.every_n_steps`` trades the preservation loss's extra forward and backward (what ``overhead.py
--also-every-n N`` times) against how often the model is pulled toward its preservation set. For each value in
``--every`` this trains, with nothing else changed:

* the demo's compressed DigitsCNN (``make demo``'s settings, 40 epochs, 2 threads) for every seed of
  ``--demo-seeds``, next to the float model of the same seed;
* the peers bench's points of ours that decide its table (``sgsc_h3`` at bit_weight 0, 0.01 and 0.05, ``sgsc_b2``
  0.1, ``sgsc`` 0.05; FashionCNN, 1,000 steps on 20,000 Fashion-MNIST images, tested on the 10,000) for every
  seed of ``--peers-seeds``, ``--jobs`` runs at a time in processes of one thread (``--peers-seeds none``: skip).

It prints every run, then per value the mean and standard deviation of accuracy and bytes; for the peers points
also the differences seed by seed against the first value of ``--every``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import peers  # a sibling script: experiments/bench is on the path when this runs

from lightning_sgsc import demo
from lightning_sgsc.settings import merge_settings

PEERS_POINTS: tuple[tuple[str, float], ...] = (
    ("sgsc_h3", 0.0),
    ("sgsc_h3", 0.01),
    ("sgsc_h3", 0.05),
    ("sgsc_b2", 0.1),
    ("sgsc", 0.05),
)


def parse_ints(flag: str, text: str, least: int) -> list[int]:
    """``"0-9"`` or ``"0,1,2"`` (or ``"none"``: no value) as distinct integers ``>= least``."""
    if text == "none":
        return []
    try:
        if "-" in text.strip("-"):
            first, last = text.split("-")
            values = list(range(int(first), int(last) + 1))
        else:
            values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or min(values) < least:
        raise SystemExit(
            f"--{flag}: got {text!r}; allowed: distinct integers >= {least}, as 'a,b,c' or 'first-last'"
            + (" or 'none'" if flag == "peers-seeds" else "")
        )
    return values


def demo_runs(every: list[int], seeds: list[int], epochs: int = 40) -> list[dict[str, Any]]:
    runs = []
    for seed in seeds:
        plain = demo.train_one(False, epochs, seed, 3e-3)
        for n in every:
            settings = merge_settings(demo.DEMO_SETTINGS, {"preservation": {"every_n_steps": n}})
            small = demo.train_one(True, epochs, seed, 3e-3, settings)
            run = {"every": n, "seed": seed, "acc": round(small["acc"], 4), "float_acc": round(plain["acc"], 4)}
            run |= {"bytes": small["bytes"], "bits_per_weight": round(small["bits_per_weight"], 3)}
            print(json.dumps({"demo": run}), flush=True)
            runs.append(run)
    return runs


def peers_runs(
    every: list[int], seeds: list[int], jobs: int, steps: int = 1000, data: str = "fashion"
) -> list[dict[str, Any]]:
    todo = [
        (m, s, data, 20_000, steps, seed, {"preservation": {"every_n_steps": n}})
        for m, s in PEERS_POINTS
        for seed in seeds
        for n in every
    ]
    runs = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, run in zip(todo, pool.map(peers._run_in_worker, todo), strict=True):
            run = {**run, "every": job[-1]["preservation"]["every_n_steps"]}
            print(json.dumps({"peers": {k: run[k] for k in ("run", "seed", "every", "test_metric", "file_bytes")}}))
            runs.append(run)
    return runs


def summarize(demo_rows: list[dict[str, Any]], peers_rows: list[dict[str, Any]], every: list[int]) -> dict[str, Any]:
    """Means and standard deviations per value of ``every`` (and per peers point), and the peers points' per-seed
    differences against ``every[0]``, in accuracy points."""

    def stats(values: list[float]) -> list[float]:
        return [round(statistics.mean(values), 3), round(statistics.stdev(values), 3) if len(values) > 1 else 0.0]

    out: dict[str, Any] = {"demo": {}, "peers": {}}
    for n in every:
        rows = [r for r in demo_rows if r["every"] == n]
        if rows:
            out["demo"][n] = {
                "acc_mean_sd": stats([100 * r["acc"] for r in rows]),
                "gap_to_float_mean": round(statistics.mean(100 * (r["acc"] - r["float_acc"]) for r in rows), 3),
                "bytes_mean_sd": stats([r["bytes"] for r in rows]),
                "seeds": [r["seed"] for r in rows],
            }
    for point in dict.fromkeys(r["run"] for r in peers_rows):
        by = {(r["every"], r["seed"]): r for r in peers_rows if r["run"] == point}
        seeds = sorted({seed for _, seed in by})
        entry: dict[int, Any] = {}
        for n in every:
            entry[n] = {
                "acc_mean": round(statistics.mean(100 * by[n, s]["test_metric"] for s in seeds), 3),
                "bytes_mean": round(statistics.mean(by[n, s]["file_bytes"] for s in seeds)),
            }
            if n != every[0]:
                diffs = [100 * (by[n, s]["test_metric"] - by[every[0], s]["test_metric"]) for s in seeds]
                entry[n]["diff_per_seed"] = [round(d, 2) for d in diffs]
        out["peers"][point] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", default="8,16", help="values of preservation.every_n_steps, the first the base")
    parser.add_argument("--demo-seeds", default="0-9")
    parser.add_argument("--peers-seeds", default="0,1,2", help="'none' skips the peers points")
    parser.add_argument("--jobs", type=int, default=2, help="peers runs at a time, each in a process of 1 thread")
    parser.add_argument("--demo-epochs", type=int, default=40)
    parser.add_argument("--peers-steps", type=int, default=1000)
    parser.add_argument("--peers-data", choices=["fashion", "random"], default="fashion", help="random: smoke runs")
    args = parser.parse_args()
    every = parse_ints("every", args.every, 1)
    demo_seeds = parse_ints("demo-seeds", args.demo_seeds, 0)
    peers_seeds = parse_ints("peers-seeds", args.peers_seeds, 0)
    for flag in ("jobs", "demo_epochs", "peers_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    demo_rows = demo_runs(every, demo_seeds, args.demo_epochs)
    peers_rows = peers_runs(every, peers_seeds, args.jobs, args.peers_steps, args.peers_data) if peers_seeds else []
    summary = summarize(demo_rows, peers_rows, every)
    for n, d in summary["demo"].items():
        (acc, sd), (nbytes, _) = d["acc_mean_sd"], d["bytes_mean_sd"]
        print(f"demo, every {n}: {acc:.2f} ± {sd:.2f} % ({d['gap_to_float_mean']:+.2f} vs float), {nbytes:,.0f} B")
    for point, entry in summary["peers"].items():
        parts = [f"every {n}: {e['acc_mean']:.2f} % at {e['bytes_mean']:,} B" for n, e in entry.items()]
        diffs = [f"{n}: {e['diff_per_seed']}" for n, e in entry.items() if "diff_per_seed" in e]
        print(f"{point}: " + "; ".join(parts) + (f" (per seed vs {every[0]}: {'; '.join(diffs)})" if diffs else ""))
    print(json.dumps({"every": every, **summary}))


if __name__ == "__main__":
    main()
