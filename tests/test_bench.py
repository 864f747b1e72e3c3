"""The benchmark scripts run end to end on tiny budgets (their figures come from full runs, not from here)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sgsc import SafetyGuidedQuantization

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "bench"))

import budget_front  # noqa: E402
import budget_one_fit  # noqa: E402
import budget_peers  # noqa: E402
import overhead  # noqa: E402
import peers  # noqa: E402
import preservation_every  # noqa: E402


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_overhead_prints_a_ratio_per_model_and_peak_memory_when_scaling():
    out = subprocess.run(
        [sys.executable, "experiments/bench/overhead.py", "--steps", "4", "--rounds", "1", "--scaling",
         "--models", "char_transformer_l8"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    summary = _last_json(out.stdout)
    assert set(summary["ratio"]) == {"char_transformer_l8"} and summary["preservation_batch_size"] is None
    (deep,) = summary["results"]
    assert deep["preservation_batch_size"] == 16  # the callback's default follows the training batch of 16
    assert deep["params"] > 400_000  # 8 layers: twice the blocks of the 205,595-parameter default
    assert deep["ratio"] > 0 and deep["quantizer_ms"] > 0 and deep["sgsc_peak_mib"] >= 0


def test_overhead_ratio_is_the_median_of_the_rounds_so_one_shifted_fit_does_not_move_it():
    per_round = {"float": [10.0, 10.0, 13.0], "quantizer": [11.0, 11.0, 11.0], "sgsc": [12.0, 12.0, 12.0]}
    got = overhead.ratios(per_round)
    assert got["ratio"] == 1.2 and got["quantizer_ratio"] == 1.1
    assert got["ratio_rounds"] == [1.2, 1.2, 0.923]


def test_the_overhead_ratio_comes_with_a_bootstrap_interval_of_its_median():
    # identical rounds: no spread, the interval is the point
    assert overhead.median_ci([1.3] * 5) == (1.3, 1.3)
    rounds = [1.1, 1.2, 1.25, 1.3, 1.35, 1.4, 1.6]
    low, high = overhead.median_ci(rounds)
    assert min(rounds) <= low < statistics.median(rounds) < high <= max(rounds)
    assert overhead.median_ci(rounds) == (low, high)  # seeded: the same rounds give the same interval
    got = overhead.ratios({"float": [10.0] * 3, "quantizer": [11.0] * 3, "sgsc": [12.0, 13.0, 14.0]})
    assert got["ratio"] == 1.3 and got["ratio_ci95"][0] >= 1.2 and got["ratio_ci95"][1] <= 1.4


def test_rounds_alternate_the_order_of_the_sides():
    assert overhead.order(0) == ("float", "quantizer", "sgsc") == overhead.order(2)
    assert overhead.order(1) == ("sgsc", "quantizer", "float")


@pytest.mark.slow
def test_the_scaling_models_grow_as_named():
    sizes = {
        name: sum(p.numel() for p in overhead._setup(name, 8)[0].parameters()) for name in overhead.SCALING.split(",")
    }
    assert sizes["fashion_cnn"] == 421_642
    assert sizes["fashion_cnn"] < sizes["fashion_cnn_w2"] < sizes["fashion_cnn_w4"]
    assert sizes["char_transformer"] < sizes["char_transformer_l8"]


def test_overhead_sides_use_the_callback_defaults_unless_a_preservation_batch_is_given():
    assert overhead._callback("float") == []
    assert overhead._callback("quantizer")[0].settings.preservation.size == 0
    default = SafetyGuidedQuantization().settings.preservation.batch_size
    assert overhead._callback("sgsc")[0].settings.preservation.batch_size == default
    assert overhead._callback("sgsc", 16)[0].settings.preservation.batch_size == 16
    default_every = SafetyGuidedQuantization().settings.preservation.every_n_steps
    assert overhead._callback("sgsc")[0].settings.preservation.every_n_steps == default_every
    extra = overhead._callback("sgsc_every_16", 16)[0]
    assert extra.settings.preservation.every_n_steps == 16 and extra.settings.preservation.batch_size == 16


def test_also_every_n_adds_a_side_timed_in_the_same_rounds_with_its_own_ratio():
    assert overhead.sides_for(None) == overhead.SIDES
    sides = overhead.sides_for(16)
    assert sides == ("float", "quantizer", "sgsc", "sgsc_every_16")
    assert overhead.order(1, sides) == sides[::-1]
    got = overhead.ratios(
        {"float": [10.0] * 3, "quantizer": [11.0] * 3, "sgsc": [13.0] * 3, "sgsc_every_16": [12.0, 12.0, 12.5]}
    )
    assert got["ratio"] == 1.3 and got["ratio_every_16"] == 1.2 and got["ratio_every_16_rounds"] == [1.2, 1.2, 1.25]
    assert got["ratio_every_16_ci95"][0] >= 1.2


def test_overhead_refuses_counts_below_one(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["overhead.py", "--also-every-n", "0"])
    with pytest.raises(SystemExit, match="--also-every-n must be >= 1, got 0"):
        overhead.main()


@pytest.mark.slow
@pytest.mark.parametrize(("jobs", "seeds"), [(1, "0"), (2, "0,1")])
def test_peers_runs_every_method_it_can_import_and_checks_the_front(tmp_path, jobs, seeds):
    out = subprocess.run(
        [
            sys.executable,
            "experiments/bench/peers.py",
            "--steps",
            "3",
            "--data",
            "random",
            "--methods",
            "sgsc,paper,pruning",
            "--out",
            str(tmp_path),
            "--jobs",
            str(jobs),
            "--seeds",
            seeds,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    n_seeds = len(seeds.split(","))
    points = len(peers.SETTINGS["sgsc"]) + 2 + 3
    assert _last_json(out.stdout)["points"] == points and _last_json(out.stdout)["runs"] == points * n_seeds
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["sgsc"] * len(peers.SETTINGS["sgsc"]) + ["paper"] * 2 + [
        "pruning"
    ] * 3
    assert all(p["seeds"] == list(range(n_seeds)) for p in saved["results"])
    assert [r["seed"] for r in saved["runs"]] == list(range(n_seeds)) * points
    assert len(saved["checks"]) == 5  # one per peer point
    assert (tmp_path / "peers.png").stat().st_size > 0 and "| pruning | 0.95 |" in (tmp_path / "peers.md").read_text()


def test_the_dominance_check_needs_a_smaller_and_at_least_as_accurate_point_of_ours():
    def point(method, acc, nbytes):
        return {"method": method, "run": f"{method}-{acc}", "test_metric": acc, "file_bytes": nbytes}

    results = [
        point("sgsc", 0.90, 100),
        point("sgsc", 0.85, 50),
        point("brevitas", 0.88, 120),
        point("brevitas", 0.86, 40),
        point("diffq", 0.95, 500),
        point("pruning", 0.80, 30),
        point("sgsc_b2", 0.81, 25),  # ours too (b starting at 2): never a peer
    ]
    checks = {c["peer"]: c for c in peers.dominated_check(results)}
    assert set(checks) == {"brevitas-0.88", "brevitas-0.86", "diffq-0.95", "pruning-0.8"}
    unmatched = {"closest": None, "closest_margin": None, "per_seed": None}
    assert checks["brevitas-0.88"] == {
        "peer": "brevitas-0.88", "ours": "sgsc-0.9", "matched": True, "margin": 2.0, **unmatched
    }  # fmt: skip
    # ours at >= 0.86 needs 100 bytes, more than 40: not matched; the most accurate of ours within 40 bytes is 0.81
    assert checks["brevitas-0.86"]["matched"] is False and checks["brevitas-0.86"]["ours"] == "sgsc-0.9"
    assert checks["brevitas-0.86"]["closest"] == "sgsc_b2-0.81" and checks["brevitas-0.86"]["closest_margin"] == -5.0
    assert checks["diffq-0.95"] == {
        "peer": "diffq-0.95", "ours": None, "matched": False, "margin": None,
        "closest": "sgsc-0.9", "closest_margin": -5.0, "per_seed": None,
    }  # fmt: skip
    assert checks["pruning-0.8"] == {
        "peer": "pruning-0.8", "ours": "sgsc_b2-0.81", "matched": True, "margin": 1.0, **unmatched
    }  # fmt: skip
    # nothing of ours is as small as the peer: no closest point either
    alone = peers.dominated_check([point("sgsc", 0.90, 100), point("brevitas", 0.95, 50)])
    assert alone[0]["closest"] is None and alone[0]["matched"] is False


def _peer_run(method, setting, seed, acc, nbytes):
    """One saved run of peers.py, as ``run_one`` returns it (train seconds 10 + seed)."""
    return {
        "method": method, "setting": setting, "run": f"{method}-{setting:g}", "seed": seed,
        "test_metric_name": "test/acc", "test_metric": acc, "file_bytes": nbytes, "train_seconds": 10.0 + seed,
    }  # fmt: skip


def test_points_are_the_means_over_their_seeds_and_the_check_uses_them():
    runs = [
        _peer_run("sgsc", 0.1, 0, 0.90, 100),
        _peer_run("sgsc", 0.1, 1, 0.84, 110),
        _peer_run("brevitas", 4, 0, 0.88, 200),
    ]
    runs.append(_peer_run("brevitas", 4, 1, 0.86, 200))
    ours, peer = peers.aggregate(runs)
    assert ours["seeds"] == [0, 1] and ours["test_metric"] == 0.87 and ours["test_metric_min"] == 0.84
    assert ours["test_metric_std"] == round(statistics.stdev([0.90, 0.84]), 4) and ours["file_bytes"] == 105
    assert ours["file_bytes_max"] == 110 and ours["train_seconds"] == 10.5
    assert peer["test_metric"] == 0.87 and peer["run"] == "brevitas-4"
    # one seed of ours (0.84) is below the peer's mean, the means are equal: matched, by 0 points
    # seed by seed: ours +2 points on seed 0, -2 on seed 1: a tie, which the per-seed margins show
    assert ours["test_metric_seeds"] == [0.90, 0.84] and peer["test_metric_seeds"] == [0.88, 0.86]
    assert peers.dominated_check([ours, peer]) == [
        {
            "peer": "brevitas-4", "ours": "sgsc-0.1", "matched": True, "margin": 0.0,
            "closest": None, "closest_margin": None, "per_seed": [2.0, -2.0],
        }
    ]  # fmt: skip
    text = peers.markdown([ours, peer], peers.dominated_check([ours, peer]), "header")
    assert "test acc (mean ± sd, 2 seeds)" in text and "| sgsc | 0.1 | 87.00 ± 4.24 % | 105 |" in text
    assert "| brevitas-4 | sgsc-0.1 | yes | +0.00 points | +2.00, -2.00 |" in text
    single = peers.aggregate(runs[:1])
    assert single[0]["test_metric_std"] == 0.0 and "| 90.00 % |" in peers.markdown(single, [], "h")


def test_an_unmatched_peer_is_compared_with_our_most_accurate_point_no_larger_seed_by_seed():
    runs = [_peer_run("sgsc", 0.01, s, a, 150) for s, a in [(0, 0.88), (1, 0.86), (2, 0.87)]]
    runs += [_peer_run("sgsc", 0.1, s, a, 90) for s, a in [(0, 0.85), (1, 0.84), (2, 0.85)]]
    runs += [_peer_run("brevitas", 8, s, a, 400) for s, a in [(0, 0.87), (1, 0.88)]]  # seed 2 missing: not compared
    (check,) = peers.dominated_check(peers.aggregate(runs))
    assert check["matched"] is False and check["ours"] is None  # ours' best mean, 0.87, is below 0.875
    assert check["closest"] == "sgsc-0.01" and check["closest_margin"] == -0.5
    assert check["per_seed"] == [1.0, -2.0]  # seeds 0 and 1 only
    text = peers.markdown(peers.aggregate(runs), [check], "header")
    assert "| brevitas-8 | closest: sgsc-0.01 | no | -0.50 points | +1.00, -2.00 |" in text


def test_a_peer_smaller_than_every_point_of_ours_says_ours_is_larger_only():
    runs = [_peer_run("sgsc", 0.01, 0, 0.90, 500), _peer_run("pruning", 0.95, 0, 0.85, 100)]
    (check,) = peers.dominated_check(peers.aggregate(runs))
    assert check["matched"] is False and check["ours"] == "sgsc-0.01" and check["closest"] is None
    text = peers.markdown(peers.aggregate(runs), [check], "header")
    assert "| pruning-0.95 | larger only: sgsc-0.01 | no | +5.00 points | — |" in text


def test_peers_from_a_saved_file_rechecks_its_runs_without_training(tmp_path, monkeypatch, capsys):
    runs = [_peer_run("sgsc", 0.1, 0, 0.90, 100), _peer_run("sgsc", 0.1, 1, 0.88, 100)]
    runs += [_peer_run("brevitas", 4, 0, 0.87, 200), _peer_run("brevitas", 4, 1, 0.89, 200)]
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"setup": "the saved header", "seeds": [0, 1], "runs": runs, "results": []}))
    monkeypatch.setattr(peers, "run_one", None)  # training would fail
    monkeypatch.setattr(sys, "argv", ["peers.py", "--from", str(saved), "--out", str(tmp_path / "out")])
    peers.main()
    written = json.loads((tmp_path / "out" / "peers.json").read_text())
    assert written["runs"] == runs and written["setup"] == "the saved header" and written["seeds"] == [0, 1]
    assert written["results"] == peers.aggregate(runs) and written["all_matched"] is True
    assert written["checks"][0]["per_seed"] == [3.0, -1.0]
    assert (tmp_path / "out" / "peers.md").read_text().startswith("the saved header")
    assert _last_json(capsys.readouterr().out) == {"all_matched": True, "points": 2, "runs": 4}
    saved.write_text(json.dumps({"setup": "ours only", "seeds": [0, 1], "runs": runs[:2]}))
    monkeypatch.setattr(sys, "argv", ["peers.py", "--from", str(saved), "--out", str(tmp_path / "ours")])
    peers.main()
    assert json.loads((tmp_path / "ours" / "peers.json").read_text())["all_matched"] is None  # nothing to match
    for extra in (["--seeds", "1"], ["--steps", "5"]):
        monkeypatch.setattr(sys, "argv", ["peers.py", "--from", str(saved), *extra])
        with pytest.raises(SystemExit, match=f"cannot be combined with {extra[0]}"):
            peers.main()
    monkeypatch.setattr(sys, "argv", ["peers.py", "--from", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match=r"--from: .*missing\.json.* is not a peers\.json"):
        peers.main()


@pytest.mark.parametrize(
    ("text", "method"),
    [("", "sgsc"), ("x", "sgsc"), ("0.1,0.1", "sgsc_h3"), ("-0.1", "diffq"), ("nan", "sgsc"), ("4.5", "brevitas"),
     ("32", "brevitas"), ("1", "pruning")],
)  # fmt: skip
def test_peers_refuses_settings_a_method_cannot_take(text, method):
    with pytest.raises(SystemExit, match=f"--settings: got {text!r} for {method}"):
        peers.parse_settings(text, method)


def test_peers_settings_replace_those_of_the_one_method_given(monkeypatch):
    assert peers.parse_settings("0.002,0.001", "sgsc_h3") == [0.002, 0.001]
    assert peers.parse_settings("8,3", "brevitas") == [8.0, 3.0] and peers.parse_settings("0.9", "pruning") == [0.9]
    monkeypatch.setattr(sys, "argv", ["peers.py", "--methods", "sgsc,brevitas", "--settings", "0.1"])
    with pytest.raises(SystemExit, match="--settings: needs exactly one --methods"):
        peers.main()
    jobs = []
    monkeypatch.setattr(peers, "make_data", lambda kind, limit: None)
    monkeypatch.setattr(peers, "write_outputs", lambda *args: None)
    monkeypatch.setattr(peers, "run_one", lambda *job: jobs.append(job[:2]) or {"run": "-", "seed": 0, "test_metric": 0,
                        "file_bytes": 0, "of_float32": 0, "train_seconds": 0})  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["peers.py", "--methods", "sgsc_h3", "--settings", "0.002,0.001", "--seeds", "0"])
    peers.main()
    assert jobs == [("sgsc_h3", 0.002), ("sgsc_h3", 0.001)]


@pytest.mark.parametrize("text", ["", "a", "0,0", "-1", "1,,2"])
def test_peers_refuses_seeds_that_are_not_distinct_non_negative_integers(text):
    with pytest.raises(SystemExit, match="--seeds"):
        peers.parse_seeds(text)
    assert peers.parse_seeds("2,0,1") == [2, 0, 1]


def test_pruning_size_counts_the_mask_the_int8_non_zeros_scales_and_biases():
    module, _, size = peers._pruning(0.5)
    net = module.net
    with_zeros = net.fc1.weight.detach().clone()
    with_zeros[:, ::2] = 0
    net.fc1.weight.data.copy_(with_zeros)
    nbytes = size(module)
    layers = (net.conv1, net.conv2, net.fc1, net.fc2)
    n = sum(layer.weight.numel() for layer in layers)
    nonzero = sum(int((layer.weight != 0).sum()) for layer in layers)
    expected = sum(
        -(-layer.weight.numel() // 8) + 4 * layer.weight.shape[0] + 4 * layer.bias.numel() for layer in layers
    )
    assert nbytes == expected + nonzero and nonzero < n


@pytest.mark.parametrize(
    ("method", "bits", "headroom"), [("sgsc", 8, None), ("sgsc_h3", 8, 3), ("sgsc_b4", 4, None), ("sgsc_b2", 2, None)]
)
def test_each_variant_of_ours_starts_at_its_bit_depth_and_counts_as_ours(method, bits, headroom):
    _, (callback,), _ = peers.build(method, 0.1)
    assert callback.settings.quantization.init_bits == bits and callback.loss_weights(0)["bits"] == 0.1
    assert callback.settings.quantization.init_headroom == headroom
    assert peers.is_ours(method) and not peers.is_ours("paper")


@pytest.mark.slow
def test_overhead_also_every_n_times_the_extra_side_end_to_end(monkeypatch, capsys):
    argv = ["overhead.py", "--models", "digits_cnn", "--steps", "5", "--rounds", "1", "--also-every-n", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    overhead.main()
    out = capsys.readouterr().out
    summary = _last_json(out)
    (result,) = summary["results"]
    assert summary["also_every_n"] == 2 and result["sgsc_every_2_ms"] > 0 and result["ratio_every_2"] > 0
    assert "every 2 steps" in out


@pytest.mark.slow
def test_overhead_compile_times_the_compiled_quantizer_as_its_own_side(monkeypatch, capsys):
    argv = ["overhead.py", "--models", "digits_cnn", "--steps", "5", "--rounds", "1", "--compile"]
    monkeypatch.setattr(sys, "argv", argv)
    overhead.main()
    out = capsys.readouterr().out
    summary = _last_json(out)
    (result,) = summary["results"]
    assert summary["compile"] and result["sgsc_compiled_ms"] > 0 and result["ratio_compiled"] > 0
    assert "with torch.compile" in out
    assert overhead._callback(overhead.COMPILED_SIDE)[0].settings.quantization.compile


def test_preservation_every_parses_seed_ranges_and_lists_and_refuses_the_rest():
    assert preservation_every.parse_ints("demo-seeds", "0-3", 0) == [0, 1, 2, 3]
    assert preservation_every.parse_ints("every", "8,16", 1) == [8, 16]
    assert preservation_every.parse_ints("peers-seeds", "none", 0) == []
    for bad in ("8,8", "0", "x", "", "3-1"):
        with pytest.raises(SystemExit, match=r"--every: got .*; allowed: distinct integers >= 1"):
            preservation_every.parse_ints("every", bad, 1)


def test_preservation_every_summary_means_and_per_seed_differences_against_the_first_value():
    demo_rows = [
        {"every": n, "seed": s, "acc": a, "float_acc": 0.99, "bytes": b}
        for n, s, a, b in [(8, 0, 0.97, 2000), (8, 1, 0.95, 2200), (16, 0, 0.96, 2100), (16, 1, 0.96, 2100)]
    ]
    peers_rows = [
        {"run": "sgsc-0.05", "every": n, "seed": s, "test_metric": a, "file_bytes": 1000 + n}
        for n, s, a in [(8, 0, 0.87), (8, 1, 0.86), (16, 0, 0.875), (16, 1, 0.855)]
    ]
    got = preservation_every.summarize(demo_rows, peers_rows, [8, 16])
    assert got["demo"][8]["acc_mean_sd"][0] == 96.0 and got["demo"][16]["acc_mean_sd"] == [96.0, 0.0]
    assert got["demo"][8]["gap_to_float_mean"] == -3.0 and got["demo"][8]["bytes_mean_sd"][0] == 2100
    point = got["peers"]["sgsc-0.05"]
    assert point[8]["acc_mean"] == 86.5 and "diff_per_seed" not in point[8]
    assert point[16]["diff_per_seed"] == [0.5, -0.5] and point[16]["bytes_mean"] == 1016


def test_peers_passes_extra_callback_arguments_to_ours_only():
    _, (callback,), _ = peers.build("sgsc_h3", 0.01, 0, {"preservation": {"every_n_steps": 16}})
    assert (
        callback.settings.preservation.every_n_steps == 16 and callback.settings.quantization.init_headroom == 3
    )  # the variant's own kept
    _, (plain,), _ = peers.build("sgsc_h3", 0.01, 0)
    assert plain.settings.preservation.every_n_steps == SafetyGuidedQuantization().settings.preservation.every_n_steps
    with pytest.raises(ValueError, match=r"extra callback arguments \['preservation'\] apply to ours"):
        peers.build("pruning", 0.5, 0, {"preservation": {"every_n_steps": 16}})


@pytest.mark.slow
def test_preservation_every_trains_the_demo_at_each_value(monkeypatch, capsys):
    import lightning_sgsc

    seen = []

    class Spy(lightning_sgsc.SafetyGuidedQuantization):
        def __init__(self, **kwargs):
            seen.append(kwargs["preservation"]["every_n_steps"])
            super().__init__(**kwargs)

    monkeypatch.setattr(lightning_sgsc, "SafetyGuidedQuantization", Spy)
    argv = [
        "preservation_every.py",
        "--every",
        "8,16",
        "--demo-seeds",
        "0",
        "--demo-epochs",
        "1",
        "--peers-seeds",
        "none",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    preservation_every.main()
    summary = _last_json(capsys.readouterr().out)
    assert seen == [8, 16] and summary["every"] == [8, 16] and summary["peers"] == {}
    assert set(summary["demo"]) == {"8", "16"} and all(d["seeds"] == [0] for d in summary["demo"].values())


def test_peers_worker_passes_extra_callback_arguments_when_the_job_has_them(monkeypatch):
    calls = []
    monkeypatch.setattr(peers, "make_data", lambda kind, limit: (kind, limit))
    monkeypatch.setattr(peers, "run_one", lambda *args: calls.append(args) or {"run": "x"})
    peers._run_in_worker(("sgsc", 0.05, "random", 10, 3, 1))
    peers._run_in_worker(("sgsc", 0.05, "random", 10, 3, 1, {"preservation_every_n_steps": 16}))
    assert calls[0] == ("sgsc", 0.05, ("random", 10), 3, 1)
    assert calls[1] == ("sgsc", 0.05, ("random", 10), 3, 1, {"preservation_every_n_steps": 16})


@pytest.mark.slow
def test_preservation_every_runs_the_peers_points_in_workers_at_each_value(monkeypatch):
    monkeypatch.setattr(preservation_every, "PEERS_POINTS", (("sgsc", 0.05),))
    runs = preservation_every.peers_runs([8, 16], [0], jobs=1, steps=2, data="random")
    assert [(r["run"], r["seed"], r["every"]) for r in runs] == [("sgsc-0.05", 0, 8), ("sgsc-0.05", 0, 16)]
    assert all(r["file_bytes"] > 0 for r in runs)


def test_the_budget_front_groups_runs_by_budget_and_measures_each_against_its_own_float_model(tmp_path, capsys):
    def run(label, seed, float_test, test, nbytes):
        result = dict(seed=seed, float_test=float_test, test=test, bytes=nbytes, fraction=nbytes / 100_000)
        (tmp_path / f"fashion_cnn-md{label}-seed{seed}.json").write_text(json.dumps(result))

    run("0.01", 0, 0.90, 0.89, 2000)
    run("0.01", 1, 0.80, 0.80, 4000)
    run("fixed", 0, 0.90, 0.85, 1000)
    groups = budget_front.load(tmp_path)
    assert list(groups) == ["0.01", "fixed"] and [r["seed"] for r in groups["0.01"]] == [0, 1]
    assert budget_front.change(groups["0.01"][0]) == pytest.approx(-1.0)  # points, against the same seed's float
    loss = dict(metric="test/loss", float_test=2.0, test=2.01)
    assert budget_front.change(loss) == pytest.approx(0.01)  # nats for a loss
    sys.argv = ["budget_front.py", str(tmp_path)]
    budget_front.main()
    out = capsys.readouterr().out
    assert "mean -0.50 points at 3.0 KB (3.00 % of float32)" in out and (tmp_path / "front.png").stat().st_size > 0


def _budget_peer_run(method: str, setting: float, seed: int, acc: float, nbytes: int) -> dict:
    return {
        "method": method,
        "setting": setting,
        "run": f"{method}-{setting:g}",
        "seed": seed,
        "steps": 100,
        "test_metric_name": "test/acc",
        "test_metric": acc,
        "float_test": 0.9,
        "file_bytes": nbytes,
        "float32_bytes": 1_686_568,
        "train_seconds": 1.0,
    }


def test_budget_peers_summary_checks_the_front_and_the_ratio_at_the_most_accurate_peer(tmp_path, capsys):
    runs = [
        _budget_peer_run("sgsc", 0.01, 0, 0.90, 10_000),
        _budget_peer_run("sgsc", 0.01, 1, 0.88, 12_000),
        _budget_peer_run("diffq", 2.0, 0, 0.89, 100_000),
        _budget_peer_run("diffq", 2.0, 1, 0.88, 120_000),
        _budget_peer_run("brevitas", 2, 0, 0.80, 8_000),
        _budget_peer_run("brevitas", 2, 1, 0.80, 8_000),
    ]
    for r in runs:
        (tmp_path / f"{r['run']}-seed{r['seed']}.json").write_text(json.dumps(r))
    got = budget_peers.summarize(tmp_path, tmp_path / "front.png")
    out = capsys.readouterr().out
    # diffq (mean 88.5 % at 110 KB) is beaten by ours (89 % at 11 KB): 10x smaller at its accuracy
    assert got["ratio_at_top_peer"] == pytest.approx(110_000 / 11_000)
    # brevitas-2 is smaller than any of ours: not matched, so the front is not all ours
    assert got["all_matched"] is False and got["runs"] == 6 and got["points"] == 3
    assert "| brevitas-2 | closest:" not in out and "| diffq-2 | sgsc-0.01 | yes |" in out
    assert "| point | seed 0 | seed 1 |" in out and "| sgsc-0.01 | 90.00 % at 10.0 KB | 88.00 % at 12.0 KB |" in out
    assert (tmp_path / "front.png").stat().st_size > 0


def test_budget_peers_summary_says_when_none_of_ours_is_as_accurate_as_the_best_peer(tmp_path, capsys):
    for r in (_budget_peer_run("sgsc", 0.03, 0, 0.85, 5_000), _budget_peer_run("torchao", 8, 0, 0.90, 400_000)):
        (tmp_path / f"{r['run']}-seed0.json").write_text(json.dumps(r))
    got = budget_peers.summarize(tmp_path)
    assert got["ratio_at_top_peer"] is None and got["all_matched"] is False
    assert "none of ours is as accurate (best: sgsc-0.03 85.00 %" in capsys.readouterr().out


def test_budget_peers_per_seed_table_marks_a_seed_a_point_did_not_run():
    runs = [_budget_peer_run("sgsc", 0.01, 0, 0.9, 12_345), _budget_peer_run("diffq", 2.0, 1, 0.8, 100_000)]
    text = budget_peers.per_seed_table(runs)
    assert "| sgsc-0.01 | 90.00 % at 12.3 KB | — |" in text and "| diffq-2 | — | 80.00 % at 100.0 KB |" in text


def test_budget_peers_summary_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match=r"must name a folder of budget_peers\.py results"):
        budget_peers.summarize(tmp_path)


def test_budget_peers_plan_resumes_a_stopped_sweep_seed_by_seed_ours_first(tmp_path):
    (tmp_path / "sgsc-0.003-seed0.json").write_text("{}")  # ran before the sweep stopped
    jobs = budget_peers.plan(["pruning", "sgsc"], [0, 1], 7, tmp_path)
    names = [f"{method}-{setting:g}-seed{seed}" for method, setting, seed, _, _ in jobs]
    assert names == [
        "sgsc-0.01-seed0",
        "sgsc-0.03-seed0",
        "pruning-0.8-seed0",
        "pruning-0.95-seed0",
        "sgsc-0.003-seed1",
        "sgsc-0.01-seed1",
        "sgsc-0.03-seed1",
        "pruning-0.8-seed1",
        "pruning-0.95-seed1",
    ]
    assert all(steps == 7 and out == tmp_path for _, _, _, steps, out in jobs)


def test_torchao_bytes_pack_the_linear_layers_and_keep_the_convolutions_float():
    from lightning_sgsc.examples import FashionCNN

    net = FashionCNN()
    convs = 4 * sum(p.numel() for name, p in net.named_parameters() if name.startswith("conv"))
    fc1 = 128 * 3136 * 4 // 8 + 4 * 128 * (3136 // 32) + 4 * 128
    fc2 = 10 * 128 * 4 // 8 + 4 * 10 * (128 // 32) + 4 * 10
    assert budget_peers.torchao_bytes(net, 4, 32) == convs + fc1 + fc2
    per_channel = 128 * 3136 + 4 * 128 + 4 * 128 + 10 * 128 + 4 * 10 + 4 * 10
    assert budget_peers.torchao_bytes(net, 8, None) == convs + per_channel


def _one_fit_run(seed: int, float_test: float, two: tuple[float, int], one: tuple[float, int]) -> dict:
    return {
        "task": "fashion_cnn",
        "seed": seed,
        "max_drop": 0.01,
        "steps": 100,
        "float32_bytes": 1000,
        "float": {"test": float_test, "bytes": 1000},
        "float_half": {"test": float_test - 0.01, "bytes": 1000},
        "two_step": {"test": two[0], "bytes": two[1]},
        "one_fit": {"test": one[0], "bytes": one[1]},
    }


def test_budget_one_fit_summary_prints_each_seed_and_the_means_against_the_float_model(tmp_path, capsys):
    for r in (_one_fit_run(0, 0.90, (0.89, 100), (0.90, 120)), _one_fit_run(1, 0.80, (0.80, 50), (0.79, 80))):
        (tmp_path / f"fashion_cnn-md0.01-seed{r['seed']}.json").write_text(json.dumps(r))
    budget_one_fit.summarize(tmp_path)
    out = capsys.readouterr().out
    assert "two-step: -1.00 at 0.1 KB, +0.00 at 0.1 KB; mean -0.50 points at 0.1 KB (7.50 % of float32)" in out
    assert "one fit: +0.00 at 0.1 KB, -1.00 at 0.1 KB; mean -0.50 points at 0.1 KB (10.00 % of float32)" in out
    with pytest.raises(SystemExit, match=r"must name a folder of budget_one_fit\.py results"):
        budget_one_fit.summarize(tmp_path / "missing")


def test_budget_peers_float_model_is_the_seeds_own_and_is_kept_in_the_cache(tmp_path, monkeypatch):
    import torch

    from lightning_sgsc.examples import ClassifierModule, FashionCNN

    task = {"data": lambda seed: peers.RandomImages(n=128), "module": lambda: ClassifierModule(FashionCNN())}
    monkeypatch.setattr(budget_peers, "TASK", task)
    first, scores = budget_peers.float_model(0, 2, tmp_path / "a")
    torch.manual_seed(123)  # whatever the generator's state, the seed decides the model
    again, _ = budget_peers.float_model(0, 2, tmp_path / "b")
    other, _ = budget_peers.float_model(1, 2, tmp_path / "c")
    cached, cached_scores = budget_peers.float_model(0, 2, tmp_path / "a")
    a, b, c, d = (m.state_dict() for m in (first, again, other, cached))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], d[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert cached_scores == scores and set(scores) == {"val", "test"}
