import json
import struct
import zlib

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
    data = path.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0] + len(_packed_header(data))
    assert nbytes == estimate + header  # every payload byte is accounted for by size.py
    assert nbytes <= 1.05 * estimate + 1024  # the bound, transformers included since the header is packed
    packed = _packed_header(data)
    assert len(packed) < len(json.dumps(_header(data), separators=(",", ":")))  # smaller than its own JSON: compressed


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
    with pytest.raises(CompressedFormatError, match=r"a 'header' and a 'payload' tensor"):
        load_compressed(tmp_path / "foreign", TinyConvNet())
    header = _header(data)
    header["version"] = 99
    (tmp_path / "v99").write_bytes(_with_header(data, header))
    with pytest.raises(CompressedFormatError, match=r"`version` must be 1, 2 or 3, got 99"):
        load_compressed(tmp_path / "v99", TinyConvNet())


def test_version_1_files_header_in_the_metadata_still_load(tmp_path):
    from safetensors.torch import load, save_file

    model = _compressed(TinyConvNet)
    export_compressed(model, tmp_path / "v2.sgsc")
    data = (tmp_path / "v2.sgsc").read_bytes()
    header = {**_header(data), "version": 1}
    save_file({"payload": load(data)["payload"]}, str(tmp_path / "v1.sgsc"), metadata={"sgsc": json.dumps(header)})
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(load_compressed(tmp_path / "v1.sgsc", TinyConvNet()).eval()(x), model.eval()(x))


def test_a_header_that_inflates_without_bound_is_refused(tmp_path, monkeypatch):
    import lightning_sgsc.export as export

    path = tmp_path / "m.sgsc"
    export_compressed(_compressed(TinyConvNet), path)
    monkeypatch.setattr(export, "_MAX_HEADER_BYTES", 64)  # the real limit is 64 MiB; this header is ~300 bytes
    with pytest.raises(CompressedFormatError, match=r"inflates beyond 64 bytes"):
        load_compressed(path, TinyConvNet())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_compressed_headers_only_raise_our_errors(tmp_path, artifact, data):
    from safetensors.torch import load, save

    packed = bytearray(_packed_header(artifact))
    cut = data.draw(st.integers(1, len(packed)))
    i = data.draw(st.integers(0, cut - 1))
    packed[i] ^= data.draw(st.integers(0, 255))
    tensors = {"header": torch.frombuffer(packed[:cut], dtype=torch.uint8), "payload": load(artifact)["payload"]}
    path = tmp_path / "corrupt.sgsc"
    path.write_bytes(save(tensors))
    try:
        load_compressed(path, TinyConvNet())
    except SGSCError:
        pass  # the only acceptable failure


def _packed_header(data: bytes) -> bytes:
    from safetensors.torch import load

    return load(data)["header"].numpy().tobytes()


def _header(data: bytes) -> dict:
    return json.loads(zlib.decompress(_packed_header(data)))


def _with_header(data: bytes, header: dict) -> bytes:
    from safetensors.torch import load, save

    packed = zlib.compress(json.dumps(header).encode())
    return save({"header": torch.frombuffer(bytearray(packed), dtype=torch.uint8), "payload": load(data)["payload"]})


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


def test_a_tensor_entry_mutated_to_zero_elements_raises_our_error(tmp_path, artifact):
    # found by the property test above: an empty slice of the payload could not be reinterpreted by torch
    header = _header(artifact)
    entry = next(e for e in header["entries"] if e["k"] == "t")
    entry["s"] = [0]
    path = tmp_path / "empty.sgsc"
    path.write_bytes(_with_header(artifact, header))
    with pytest.raises(SGSCError):
        load_compressed(path, TinyConvNet())


class _EveryKind(torch.nn.Module):
    """BatchNorm (a 0-d int64 buffer), a bool and an int64 buffer, a bf16 parameter, a 0-d parameter, and a user
    parameter named ``bits`` on a module that is not a twin."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)
        self.bits = torch.nn.Parameter(torch.randn(3))  # the user's own, not the quantizer's
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))
        self.scale16 = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("counts", torch.arange(3))

    def forward(self, x):
        z = self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
        return (z + self.bits * self.mask + self.scale16.float()) * self.temperature + self.counts


def test_every_state_dict_entry_round_trips_whatever_its_dtype_and_shape(tmp_path):
    torch.manual_seed(0)
    model = _EveryKind()
    model.train()
    model(torch.randn(8, 1, 6, 6))  # running statistics and num_batches_tracked move
    quantize_(model, init_bits=5)
    model.eval()
    path = tmp_path / "every.sgsc"
    nbytes = export_compressed(model, path)
    fresh = _EveryKind()
    loaded = load_compressed(path, fresh).eval()
    state = loaded.state_dict()
    assert state["bn.num_batches_tracked"].dim() == 0 and int(state["bn.num_batches_tracked"]) == 1
    for key in ("bits", "temperature", "scale16", "mask", "counts", "bn.running_mean", "bn.running_var", "head.bias"):
        assert torch.equal(state[key], model.state_dict()[key]), key
    x = torch.randn(4, 1, 6, 6)
    assert torch.equal(loaded(x), model(x))
    data = path.read_bytes()  # the size accounting counts every stored tensor, 0-d ones included
    assert nbytes == model_size(model).total_bytes + 8 + struct.unpack("<Q", data[:8])[0] + len(_packed_header(data))


def test_tied_weights_are_stored_once_and_reload_tied(tmp_path):
    from tests.helpers.zoo import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT()
    quantize_(model, init_bits=4)  # the head and the embedding share one quantizer, per vocabulary row
    assert model.lm_head.weight is model.wte.weight and model.lm_head.bits is model.wte.bits
    path = tmp_path / "gpt.sgsc"
    export_compressed(model.eval(), path)
    entries = _header(path.read_bytes())["entries"]
    names = [e["n"] for e in entries]
    assert names.count("wte.weight") == 1 and "lm_head.weight" in names  # an alias, not a second copy
    assert next(e for e in entries if e["n"] == "lm_head.weight")["k"] == "a"
    loaded = load_compressed(path, TinyGPT()).eval()
    assert loaded.lm_head.weight is loaded.wte.weight
    idx = torch.randint(0, 13, (2, 8))
    assert torch.equal(loaded(idx), model(idx))
