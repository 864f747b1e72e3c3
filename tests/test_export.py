import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from lightning_sgsc import SGSCError, SGSCRuntimeError, model_size, quantize_
from lightning_sgsc.export import CompressedFormatError, SkeletonMismatchError, export_compressed, load_compressed
from lightning_sgsc.feedback import prune_channels_, zero_bit_channels
from tests.helpers.models import TinyConvNet, TinyMLP, TinyTransformer

MODELS = [
    (TinyConvNet, lambda: torch.randn(6, 1, 8, 8)),
    (TinyMLP, lambda: torch.randn(6, 10)),
    (TinyTransformer, lambda: torch.randint(0, 11, (3, 8))),
]


def _compressed(factory, seed=0):
    torch.manual_seed(seed)
    model = factory()
    quantize_(model, init_bits=4)
    layers = [m for n, m in model.named_modules() if hasattr(m, "bits")]
    with torch.no_grad():  # a realistic mix: fractional, low, zero and pruned channels, moved exponents
        for i, layer in enumerate(layers):
            c = layer.bits.numel()
            layer.bits.copy_(torch.linspace(-0.5, 7.3, c)[torch.randperm(c)])
            layer.exponent.add_(torch.randn(c) * 0.5)
            if i == 0:
                layer.bits[0] = 0
    prune_channels_(model, {n: m[: len(m)] & (torch.arange(len(m)) == 0) for n, m in zero_bit_channels(model).items()})
    return model.eval()


@pytest.mark.parametrize(("factory", "inputs"), MODELS)
def test_export_then_load_gives_identical_outputs(tmp_path, factory, inputs):
    model = _compressed(factory)
    x = inputs()
    expected = model(x)
    path = tmp_path / "model.sgsc"
    nbytes = export_compressed(model, path)
    assert nbytes == path.stat().st_size
    loaded = load_compressed(path, factory()).eval()
    assert_close(loaded(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize(("factory", "inputs"), MODELS)
def test_file_size_is_the_estimate_plus_an_honest_header(tmp_path, factory, inputs):
    model = _compressed(factory, seed=1)
    path = tmp_path / "m.sgsc"
    nbytes = export_compressed(model, path)
    estimate = model_size(model).total_bytes
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert nbytes == estimate + header  # every payload byte is accounted for by size.py
    if factory is not TinyTransformer:  # the bound, for CNN-sized tensor counts (~100 header bytes/tensor)
        assert nbytes <= 1.05 * estimate + 1024


def test_exporting_a_float_model_is_an_error_with_a_hint(tmp_path):
    with pytest.raises(SGSCRuntimeError, match=r"`model` must be a model with quantized layers.*quantize_\(model\)"):
        export_compressed(TinyMLP(), tmp_path / "x")


def test_skeleton_mismatch_names_the_layer(tmp_path):
    path = tmp_path / "m.sgsc"
    export_compressed(_compressed(TinyMLP), path)

    class Wider(TinyMLP):
        def __init__(self):
            super().__init__()
            self.body[2] = torch.nn.Linear(16, 9)

    with pytest.raises(SkeletonMismatchError, match=r"`shape of 'body.2.weight'` must be \(8, 16\), got \(9, 16\)"):
        load_compressed(path, Wider())
    with pytest.raises(SkeletonMismatchError, match=r"a skeleton with the layer 'body.0.weight'"):
        load_compressed(path, TinyConvNet())
    swapped = TinyMLP()
    quantize_(swapped)
    with pytest.raises(SkeletonMismatchError, match=r"`model` must be a float skeleton"):
        load_compressed(path, swapped)


def test_truncated_foreign_and_wrong_version_files(tmp_path):
    path = tmp_path / "m.sgsc"
    export_compressed(_compressed(TinyConvNet), path)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) - 40])
    with pytest.raises(CompressedFormatError, match=r"readable safetensors file"):
        load_compressed(tmp_path / "cut", TinyConvNet())
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign"))
    with pytest.raises(CompressedFormatError, match=r"one 'payload' tensor"):
        load_compressed(tmp_path / "foreign", TinyConvNet())
    header = _header(data)
    header["version"] = 99
    (tmp_path / "v99").write_bytes(_with_header(data, header))
    with pytest.raises(CompressedFormatError, match=r"`version` must be 1, got 99"):
        load_compressed(tmp_path / "v99", TinyConvNet())


def _header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["sgsc"])


def _with_header(data: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    outer = json.loads(data[8 : 8 + n])
    outer["__metadata__"]["sgsc"] = json.dumps(header)
    raw = json.dumps(outer).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "m.sgsc"
    export_compressed(_compressed(TinyConvNet), path)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_our_errors(tmp_path, blob):
    path = tmp_path / "random.sgsc"
    path.write_bytes(blob)
    with pytest.raises(SGSCError):
        load_compressed(path, TinyConvNet())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_only_raise_our_errors_or_load_consistently(tmp_path, artifact, data):
    header = _header(artifact)
    entries = header["entries"]
    i = data.draw(st.integers(0, len(entries) - 1))
    key = data.draw(st.sampled_from(["n", "k", "s", "o", "d", "kept", "version", "entries"]))
    value = data.draw(JSON_VALUES)
    if key in ("version", "entries"):
        header[key] = value
    else:
        entries[i][key] = value
    path = tmp_path / "mutated.sgsc"
    path.write_bytes(_with_header(artifact, header))
    try:
        load_compressed(path, TinyConvNet())
    except SGSCError:
        pass  # the only acceptable failure
