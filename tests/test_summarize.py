import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import summarize


def _run(name, variant, acc, nbytes, seed=0):
    return {
        "run": f"{name}-{variant}-seed{seed}",
        "variant": variant,
        "test_metric_name": "test/acc",
        "test_metric": acc,
        "file_bytes": nbytes,
        "float32_bytes": 1000,
        "bits_per_weight": 32 * nbytes / 1000,
        "train_seconds": 1.0,
        "hardware": "cpu",
    }


def test_pareto_front_keeps_only_undominated_runs():
    runs = [
        _run("a", "float", 0.90, 1000),
        _run("b", "safe", 0.91, 100),
        _run("c", "unsafe", 0.85, 90),
        _run("d", "safe", 0.80, 95),
    ]
    assert [r["run"] for r in summarize.pareto_front(runs)] == ["c-unsafe-seed0", "b-safe-seed0"]


def test_folder_to_table_and_plot(tmp_path):
    for i, (variant, acc, nbytes) in enumerate([("float", 0.9, 1000), ("safe", 0.91, 100), ("safe", 0.89, 120)]):
        (tmp_path / f"r{i}.json").write_text(json.dumps(_run("m", variant, acc, nbytes, seed=i)))
    summarize.main([str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "| m-safe-seed1 | safe | 0.9100 | 100 | 10.0 % |" in text
    assert "| safe | 2 | 0.9000 ± 0.0141 | 110 |" in text
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
