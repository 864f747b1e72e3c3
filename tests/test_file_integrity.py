"""The file proves itself: corruption is always an error, no file makes the loader allocate beyond the skeleton, and
the writer writes only what its reader accepts, to regular files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_sgsc import SGSCError, quantize_
from lightning_sgsc.export import export_compressed, load_compressed
from tests.helpers.models import TinyConvNet

ROOT = Path(__file__).resolve().parents[1]


def _small_artifact(tmp_path: Path) -> tuple[Path, TinyConvNet]:
    torch.manual_seed(0)
    model = TinyConvNet()
    quantize_(model, init_bits=3)
    with torch.no_grad():
        model.features[0].bits[:2] = 0.0
    path = tmp_path / "small.sgsc"
    export_compressed(model.eval(), path)
    return path, model


@pytest.mark.slow
def test_every_single_bit_flip_of_a_small_file_is_an_error(tmp_path):
    path, model = _small_artifact(tmp_path)
    data = path.read_bytes()
    x = torch.randn(4, 1, 8, 8)
    silent = []
    flipped = tmp_path / "flipped.sgsc"
    for byte in range(len(data)):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[byte] ^= 1 << bit
            flipped.write_bytes(corrupt)
            try:
                load_compressed(flipped, TinyConvNet())
            except SGSCError:
                continue
            silent.append((byte, bit))
    assert len(data) < 4096 and not silent, f"{len(silent)} of {8 * len(data)} flips loaded: {silent[:10]}"
    assert torch.equal(load_compressed(path, TinyConvNet()).eval()(x), model(x))  # the intact file still loads


def _forge(path: Path, shape: list[int]) -> bytes:
    """A valid-looking file whose first layer map entry declares ``shape`` (and a tiny payload)."""
    import zlib

    from safetensors.torch import load, save

    tensors = load(path.read_bytes())
    header = json.loads(zlib.decompress(tensors["header"].numpy().tobytes()))
    entry = next(e for e in header["entries"] if e["k"] == "q")
    entry["s"], entry["kept"] = shape, 0
    tensors["payload"][entry["o"] : entry["o"] + shape[0]] = 0  # zero-bit channels: no packed data needed
    packed = zlib.compress(json.dumps(header).encode())
    tensors["header"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    return save(tensors)


@pytest.mark.parametrize("shape", [[1, 268_435_456], [1, 2**31], [4, 2**40 - 1]])
def test_a_forged_huge_shape_is_refused_before_anything_is_allocated(tmp_path, shape):
    path, _ = _small_artifact(tmp_path)
    forged = tmp_path / "forged.sgsc"
    forged.write_bytes(_forge(path, shape))
    script = textwrap.dedent(
        f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from lightning_sgsc.export import load_compressed
        from lightning_sgsc.errors import SGSCError
        from tests.helpers.models import TinyConvNet
        skeleton = TinyConvNet()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_compressed({str(forged)!r}, skeleton)
            print("LOADED")
        except SGSCError as err:
            print("ERROR", type(err).__name__)
        print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "ERROR" in run.stdout, run.stdout + run.stderr[-2000:]
    peak_kb = int(run.stdout.split("PEAK_KB")[1])
    assert peak_kb < 64 * 1024, peak_kb  # below 64 MB of extra memory


def test_the_writer_refuses_a_path_that_is_not_a_regular_file(tmp_path):
    _, model = _small_artifact(tmp_path)
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a /dev/null of our own
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(SGSCError, match=r"`path` must be a regular file .* got .*null"):
        export_compressed(model, device)
    assert stat.S_ISCHR(device.stat().st_mode)  # still the device, not replaced by a file
    with pytest.raises(SGSCError, match=r"`path` must be a regular file"):
        export_compressed(model, tmp_path)  # a directory


@pytest.mark.parametrize("where", ["weight", "bits", "exponent", "bias"])
def test_non_finite_values_are_refused_by_the_writer_naming_the_tensor(tmp_path, where):
    _, model = _small_artifact(tmp_path)
    with torch.no_grad():
        getattr(model.head, where)[1] = float("nan")
    out = tmp_path / "nan.sgsc"
    with pytest.raises(SGSCError, match=r"head.*non-finite|non-finite.*head"):
        export_compressed(model, out)
    assert not out.exists()  # nothing written


def test_an_interrupted_write_leaves_no_file_under_the_users_name(tmp_path, monkeypatch):
    _, model = _small_artifact(tmp_path)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_compressed(model, tmp_path / "m.sgsc")
    assert not list(tmp_path.glob("m.sgsc*"))
