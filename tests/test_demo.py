import json

import pytest

from lightning_sgsc import model_size, quantize_
from lightning_sgsc.size import size_report
from tests.helpers.models import TinyConvNet


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_the_json(tmp_path, capsys):
    from lightning_sgsc.demo import main

    out = tmp_path / "demo.json"
    result = main(
        ["--epochs", "2", "--compress-epochs", "2", "--json", str(out), "--onnx", str(tmp_path / "demo.onnx")]
    )
    written = json.loads(out.read_text())
    keys = ("float_acc", "compressed_acc", "float_bytes", "compressed_bytes", "bits_per_weight", "float_val_acc")
    for key in keys:
        assert key in written
    assert written["float_bytes"] == 24_360  # 6,090 float32 parameters
    assert 0 < written["compressed_bytes"] < written["float_bytes"]
    assert written["compressed_bytes"] >= written["compressed_estimate_bytes"]  # the file: estimate plus header
    assert result["float_acc"] == written["float_acc"]
    # the budget's reference is the float model's validation accuracy, measured on the validation split
    assert written["settings"]["budget"]["reference_value"] == written["float_val_acc"]
    assert written["settings"]["budget"]["max_drop"] == 0.0075 and written["settings"]["budget"]["monitor"] == "val/acc"
    printed = capsys.readouterr().out
    assert "float32" in printed and "sgsc" in printed and "kept/total" in printed
    assert written["onnx_bytes"] == (tmp_path / "demo.onnx").stat().st_size  # the ONNX file, its size printed
    assert f"{written['onnx_bytes']:,} bytes" in printed and f"{written['compressed_bytes']:,} bytes" in printed


def test_the_demo_in_one_fit_has_no_reference_value_and_reports_the_one_it_found(tmp_path, capsys):
    from lightning_sgsc.demo import main

    out = tmp_path / "one_fit.json"
    result = main(["--one-fit", "--epochs", "2", "--compress-epochs", "2", "--json", str(out)])
    written = json.loads(out.read_text())
    assert "reference_value" not in written["settings"]["budget"]  # the callback's budget arguments only
    assert written["epochs"] == 4 and written["compress_epochs"] == 0  # one fit, as long as both steps
    assert written["reference"] is not None and written["reference_step"] is not None
    assert result["reference"] == written["reference"]
    assert f"fixed at step {written['reference_step']}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "`--epochs` must be >= 1, got 0."),
        (["--compress-epochs", "0"], "`--compress-epochs` must be >= 1, got 0."),
        (["--max-drop", "5"], "`--max-drop` must be in (0, 1) (accuracy, absolute), got 5.0."),
    ],
)
def test_demo_rejects_bad_arguments(capsys, argv, message):
    from lightning_sgsc.demo import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_size_report_prints_and_returns_the_figures(capsys):
    net = TinyConvNet()
    quantize_(net, init_bits=4)
    size = size_report(net)
    assert size == model_size(net)
    table = capsys.readouterr().out
    assert "features.0" in table and "head" in table and "4/4" in table and "compression:" in table
    assert size.float32_bytes == 4 * sum(
        p.numel() for n, p in net.named_parameters() if not n.endswith(("bits", "exponent"))
    )
