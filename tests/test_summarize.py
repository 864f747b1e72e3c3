import json

from lightning_sgsc import summarize


def _run(name, variant, acc, nbytes, seed=0, max_drop=None):
    return {
        "run": f"{name}-{variant}-seed{seed}",
        "variant": variant,
        "val_metric_name": "val/acc",
        "val_metric": acc - 0.01,
        "test_metric_name": "test/acc",
        "test_metric": acc,
        "file_bytes": nbytes,
        "float32_bytes": 1000,
        "bits_per_weight": 32 * nbytes / 1000,
        "train_seconds": 1.0,
        "hardware": "cpu",
        "config": {"sgsc": {"max_drop": max_drop, "budget": {"max_drop": None}}},
    }


def test_pareto_front_keeps_only_undominated_runs():
    runs = [
        _run("a", "float", 0.90, 1000),
        _run("b", "safe", 0.91, 100),
        _run("c", "unsafe", 0.85, 90),
        _run("d", "safe", 0.80, 95),
    ]
    for r in runs:
        r["output_dir"] = r["run"]
    assert [r["run"] for r in summarize.pareto_front(runs)] == ["c-unsafe-seed0", "b-safe-seed0"]


def test_a_sweeps_job_folders_become_a_table_and_a_front_plot(tmp_path):
    jobs = [("float", 0.9, 1000, None), ("budget", 0.91, 100, 0.01), ("budget", 0.89, 120, 0.03)]
    for i, (variant, acc, nbytes, max_drop) in enumerate(jobs):
        job = tmp_path / f"{i}_sgsc.max_drop={max_drop}"
        job.mkdir()
        (job / "result.json").write_text(json.dumps(_run("m", variant, acc, nbytes, seed=i, max_drop=max_drop)))
    summarize.main([str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "| m-budget-seed1 | budget | 0.01 | 0.9100 | 100 | 10.0 % |" in text
    assert "| budget | 2 | 0.9000 ± 0.0141 | 110 |" in text
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
