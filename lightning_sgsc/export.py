"""The compressed artifact: one safetensors file, bit-packed at each channel's learned depth, no pickle.

Layout (format version 2): two ``uint8`` tensors, ``payload`` and ``header`` = a zlib-compressed JSON header::

    {"format": "lightning-sgsc", "version": 2, "entries": [
        {"n": "net.conv1", "k": "q", "s": [16, 1, 3, 3], "o": 0, "kept": 16},      # quantized weight
        {"n": "net.conv1.bias", "k": "t", "d": "float32", "s": [16], "o": 221},   # any other tensor
        {"n": "lm_head.weight", "k": "a", "of": "emb.weight"},                    # a second name of a tensor
        ...]}

A quantized weight's region holds: one uint8 bit depth per channel, one float32 scale (``2^e``) per channel with
at least one nonzero integer, then the packed integers (:mod:`lightning_sgsc.packing`). Every other parameter and
buffer is stored raw at its own dtype. :func:`load_compressed` rebuilds ``scale * integer`` in float32, which is the
same IEEE product the quantized layer computes, so the loaded model's outputs equal the trained model's exactly.

Every entry of the model's ``state_dict`` is written, whatever its dtype and shape (0-d buffers such as BatchNorm's
``num_batches_tracked`` included), except the twins' own quantizer state (``bits``, ``exponent``, ``pruned``, found
by the module that owns them, so a user's parameter named ``bits`` survives). A tensor that appears under several
names (tied weights) is stored once; its other names are aliases.

Version 1 kept the same JSON uncompressed in the safetensors metadata (string ``sgsc``), where JSON-in-JSON escaping
made it about 1.5 times its own size: 632 bytes of file overhead for the 3-layer DigitsCNN, 4,648 for the 4-layer
CharTransformer; compressed in a tensor of its own, 329 and 737. :func:`load_compressed` reads both versions.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sgsc import __version__
from lightning_sgsc.errors import SGSCError, SGSCRuntimeError, SGSCValueError, describe_rule
from lightning_sgsc.packing import pack, packed_nbytes, unpack
from lightning_sgsc.quant.functional import pow2, required_bits
from lightning_sgsc.quant.modules import quantized_layers, quantizer_state_ids

FORMAT = "lightning-sgsc"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_MAX_HEADER_BYTES = 64 * 2**20  # a decompressed header larger than this is refused (a zlib bomb, not a model)
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class CompressedFormatError(SGSCValueError):
    """The file is not a valid lightning-sgsc artifact (truncated, corrupted, foreign, or another version)."""


class SkeletonMismatchError(SGSCValueError):
    """The model given to :func:`load_compressed` does not match the artifact (missing layer, wrong shape)."""


def _tensor_bytes(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous().reshape(-1)  # 1-D first: numpy cannot re-view a 0-d array's dtype
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().view(np.uint8)


@torch.no_grad()
def export_compressed(model: nn.Module, path: str | Path) -> int:
    """Writes ``model`` (holding quantized twins) as a bit-packed artifact.

    Args:
        model: a model swapped by :func:`~lightning_sgsc.quantize_` or trained with the callback.
        path: file to write.

    Returns:
        The file's size in bytes.

    Raises:
        SGSCRuntimeError: the model holds no quantized layer.
    """
    layers = quantized_layers(model)
    if not layers:
        raise SGSCRuntimeError(
            describe_rule("model", "a model with quantized layers", "a float model")
            + " Train it with SafetyGuidedQuantization or call `quantize_(model)` first; a float model is saved with"
            " `torch.save(model.state_dict())` or safetensors."
        )
    chunks: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    offset = 0
    stored: dict[int, str] = {}  # id of each tensor written -> the name it was written under
    for name, layer in layers:
        q = layer.integer_weight()
        bits = required_bits(q)
        kept = bits > 0
        scale = pow2(layer.exponent.detach().float())[kept]
        region = np.concatenate([bits.to(torch.uint8).numpy(), _tensor_bytes(scale), pack(q, bits)])
        entries.append(
            {
                "n": f"{name}.weight" if name else "weight",
                "k": "q",
                "s": list(q.shape),
                "o": offset,
                "kept": int(kept.sum()),
            }
        )
        chunks.append(region)
        offset += region.nbytes
        stored[id(layer.weight)] = entries[-1]["n"]
    skip = quantizer_state_ids(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in skip:
            continue
        if id(t) in stored:  # tied: the same tensor under another name
            if stored[id(t)] != name:
                entries.append({"n": name, "k": "a", "of": stored[id(t)]})
            continue
        data = _tensor_bytes(t)
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise SGSCValueError(describe_rule(f"dtype of {name!r}", f"one of {sorted(_DTYPES)}", dtype))
        entries.append({"n": name, "k": "t", "d": dtype, "s": list(t.shape), "o": offset})
        chunks.append(data)
        offset += data.nbytes
        stored[id(t)] = name
    header = {"format": FORMAT, "version": FORMAT_VERSION, "writer": __version__, "entries": entries}
    payload = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
    from safetensors.torch import save_file

    packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    save_file({"header": torch.frombuffer(bytearray(packed_header), dtype=torch.uint8), "payload": payload}, str(path))
    return Path(path).stat().st_size


# -------------------------------------------------------------------------------------------------------- loading


def _read(path: str | Path) -> tuple[dict[str, Any], np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = sorted(f.keys())
            if keys not in (["header", "payload"], ["payload"]):  # version 2; version 1 (header in the metadata)
                raise CompressedFormatError(
                    describe_rule("path", "a lightning-sgsc artifact (a 'header' and a 'payload' tensor)", str(path))
                    + f" It holds tensors {keys[:5]}."
                )
            payload = f.get_tensor("payload")
            packed_header = f.get_tensor("header") if "header" in keys else None
    except SGSCError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors' own errors: truncated, corrupted or not safetensors at all
        raise CompressedFormatError(
            describe_rule("path", "a readable safetensors file", str(path)) + f" Reading failed: {err}"
        ) from err
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CompressedFormatError(describe_rule("payload", "a 1-D uint8 tensor", f"{payload.dtype} {payload.shape}"))
    try:
        header = json.loads(metadata["sgsc"] if packed_header is None else _inflate(packed_header))
    except (KeyError, ValueError, TypeError, zlib.error) as err:
        raise CompressedFormatError(
            describe_rule("path", "a lightning-sgsc artifact with a JSON header", str(path)) + f" Reading it: {err}"
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CompressedFormatError(
            describe_rule("format", repr(FORMAT), header.get("format") if isinstance(header, dict) else header)
        )
    if header.get("version") not in _READABLE_VERSIONS or isinstance(header.get("version"), bool):
        raise CompressedFormatError(
            describe_rule("version", " or ".join(map(str, _READABLE_VERSIONS)), header.get("version"))
            + f" This file was written by lightning-sgsc {header.get('writer')!r}; this is {__version__}."
        )
    return header, payload.numpy()


def _inflate(packed: Tensor) -> bytes:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"the header tensor must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    inflater = zlib.decompressobj()
    raw = inflater.decompress(packed.numpy().tobytes(), _MAX_HEADER_BYTES)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"the header is truncated or inflates beyond {_MAX_HEADER_BYTES} bytes")
    return raw


def _entry_field(entry: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
        raise CompressedFormatError(describe_rule(f"entries[].{key}", f"of type {kind}", entry))
    return entry[key]


def _shape(entry: Any) -> list[int]:
    shape = _entry_field(entry, "s", list)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise CompressedFormatError(describe_rule(f"shape of {entry.get('n')!r}", "a list of sizes", shape))
    return shape


def _slice(payload: np.ndarray, start: int, nbytes: int, name: str) -> np.ndarray:
    if start < 0 or nbytes < 0 or start + nbytes > payload.nbytes:
        raise CompressedFormatError(
            describe_rule(
                f"the data of {name!r}",
                f"inside the payload ({payload.nbytes} bytes)",
                f"bytes {start}..{start + nbytes}",
            )
            + " The file is truncated or corrupted."
        )
    return payload[start : start + nbytes]


def _decode_quantized(entry: dict[str, Any], payload: np.ndarray) -> Tensor:
    name = entry["n"]
    shape = _shape(entry)
    if len(shape) < 2:
        raise CompressedFormatError(describe_rule(f"shape of {name!r}", "at least 2-D", shape))
    channels, fan_in = shape[0], math.prod(shape[1:])
    start = _entry_field(entry, "o", int)
    bits = torch.from_numpy(_slice(payload, start, channels, name).astype(np.int64))
    if bool((bits > 16).any()):
        raise CompressedFormatError(describe_rule(f"bit depths of {name!r}", "0 to 16", int(bits.max())))
    kept = bits > 0
    n_kept = int(kept.sum())
    if entry.get("kept") != n_kept:
        raise CompressedFormatError(describe_rule(f"kept channels of {name!r}", str(n_kept), entry.get("kept")))
    scale_bytes = _slice(payload, start + channels, 4 * n_kept, name)
    scale = torch.from_numpy(scale_bytes.copy().view(np.float32))
    packed = _slice(payload, start + channels + 4 * n_kept, packed_nbytes(bits, fan_in), name)
    q = unpack(packed, bits, fan_in)
    weight = torch.zeros(channels, fan_in, dtype=torch.float32)
    weight[kept] = scale[:, None] * q[kept].to(torch.float32)
    return weight.reshape(shape)


def _decode_tensor(entry: dict[str, Any], payload: np.ndarray) -> Tensor:
    name = entry["n"]
    dtype_name = _entry_field(entry, "d", str)
    if dtype_name not in _DTYPES:
        raise CompressedFormatError(describe_rule(f"dtype of {name!r}", f"one of {sorted(_DTYPES)}", dtype_name))
    dtype = _DTYPES[dtype_name]
    shape = _shape(entry)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = _slice(payload, _entry_field(entry, "o", int), math.prod(shape) * itemsize, name).copy()
    if raw.size == 0:  # numpy gives an empty array stride 0, which torch cannot reinterpret
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@torch.no_grad()
def load_compressed(path: str | Path, model: nn.Module) -> nn.Module:
    """Fills a float ``model`` skeleton (the user's own class, not swapped) from an artifact, in place.

    Returns:
        ``model``, a plain ``nn.Module`` whose eval outputs equal the exported model's exactly on CPU.

    Raises:
        CompressedFormatError: the file is truncated, corrupted, foreign or of another format version.
        SkeletonMismatchError: a layer of the file is missing from ``model`` or has another shape.
    """
    header, payload = _read(path)
    entries = header.get("entries")
    if not isinstance(entries, list):
        raise CompressedFormatError(describe_rule("entries", "a list", type(entries).__name__))
    state: dict[str, Tensor] = {}
    for entry in entries:
        name = _entry_field(entry, "n", str)
        kind = _entry_field(entry, "k", str)
        if kind == "q":
            state[name] = _decode_quantized(entry, payload)
        elif kind == "t":
            state[name] = _decode_tensor(entry, payload)
        elif kind == "a":
            source = _entry_field(entry, "of", str)
            if source not in state:
                raise CompressedFormatError(describe_rule(f"alias {name!r}", "of a tensor stored before it", source))
            state[name] = state[source]
        else:
            raise CompressedFormatError(describe_rule(f"kind of {name!r}", "'q', 't' or 'a'", kind))
    if quantized_layers(model):
        raise SkeletonMismatchError(
            describe_rule("model", "a float skeleton (not swapped)", "a model with quantized layers")
            + " Load into a fresh instance of your model class."
        )
    expected = dict(model.state_dict())
    for name, tensor in state.items():
        if name not in expected:
            raise SkeletonMismatchError(
                describe_rule("model", f"a skeleton with the layer {name!r}", type(model).__name__)
                + " The artifact was exported from a different architecture."
            )
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise SkeletonMismatchError(
                describe_rule(f"shape of {name!r}", str(tuple(tensor.shape)), tuple(expected[name].shape))
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SkeletonMismatchError(
            describe_rule("model", "a skeleton with only the artifact's tensors", f"extra tensors {missing[:5]}")
        )
    model.load_state_dict(state, strict=True)
    return model
