"""The compressed artifact: one safetensors file, bit-packed at each channel's learned depth, no pickle.

Layout (format version 3): two ``uint8`` tensors, ``payload`` and ``header`` = a zlib-compressed JSON header::

    {"format": "lightning-sgsc", "version": 3, "entries": [
        {"n": "net.conv1.weight", "k": "q", "s": [16, 1, 3, 3], "o": 0, "kept": 16},  # quantized weight
        {"n": "h.0.attn.c_attn.weight", "k": "q", "s": [192, 64], "o": 221, "kept": 190, "ax": 1},  # on axis 1
        {"n": "net.conv1.bias", "k": "t", "d": "float32", "s": [16], "o": 980},       # any other tensor
        {"n": "lm_head.weight", "k": "a", "of": "wte.weight"},                        # a second name of a tensor
        ...]}

and, in the safetensors metadata, ``sgsc_sha256``: the SHA-256 of the whole file with those 64 hex digits written as
zeros. Any changed byte anywhere (a flipped bit, a truncation) makes the file fail its check, so corruption is always
a :class:`CompressedFormatError`, never a model that computes something else.

A quantized weight's region holds: one uint8 bit depth per channel, one float32 scale (``2^e``) per channel with at
least one nonzero integer, then the packed integers (:mod:`lightning_sgsc.packing`), channels first (``"s"`` is the
channels-first shape; ``"ax"`` the axis the channels go back to, 0 when absent). Every other parameter and buffer is
stored raw at its own dtype. :func:`load_compressed` rebuilds ``scale * integer`` in float32, which is the same IEEE
product the quantized layer computes, so the loaded model's outputs equal the trained model's exactly.

Every entry of the model's ``state_dict`` is written, whatever its dtype and shape, except the twins' own quantizer
state (``bits``, ``exponent``, ``pruned``) and the originals of a parametrized quantized weight (``weight_norm``: the
quantized weight stands for them, and loads into the skeleton as a plain Parameter). A tensor that appears under
several names (tied weights) is stored once; its other names are aliases.

Reading checks before it allocates: every declared shape against the skeleton's, every region against the payload's
length. Writing checks what reading checks (finite weights, bit depths and scales), writes a temporary file next to
the target and renames it, and refuses targets that are not regular files. Versions 1 and 2 (no checksum) still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sgsc import __version__
from lightning_sgsc.errors import SGSCError, SGSCRuntimeError, SGSCValueError, describe_rule
from lightning_sgsc.packing import pack, packed_nbytes, unpack
from lightning_sgsc.quant.functional import pow2, required_bits
from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers, stored_tensors

FORMAT = "lightning-sgsc"
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
_CHECKSUM_KEY = "sgsc_sha256"
_PLACEHOLDER = "0" * 64
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


# ---------------------------------------------------------------------------------------------------------- writing


def _tensor_bytes(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous().reshape(-1)  # 1-D first: numpy cannot re-view a 0-d array's dtype
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().view(np.uint8)


def _weight_name(name: str, layer: QuantizedLayer) -> str:
    return f"{name}.{layer.quant_param}" if name else layer.quant_param


def _check_finite(name: str, what: str, t: Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SGSCValueError(
            describe_rule(f"{what} of {name!r}", "finite", f"{bad} non-finite value(s)")
            + " The model diverged (NaN/Inf): nothing was written. Export a state from before it diverged."
        )


@torch.no_grad()
def _encode_layer(name: str, layer: QuantizedLayer, offset: int) -> tuple[dict[str, Any], np.ndarray]:
    """The entry and the payload region of one quantized weight (refusing what the reader would refuse)."""
    weight_name = _weight_name(name, layer)
    _check_finite(weight_name, "the weight", layer.channel_weight)
    _check_finite(weight_name, "the bit depths", layer.bits)
    kept_mask = layer.effective_bits() > 0
    _check_finite(weight_name, "the exponents", layer.exponent[kept_mask])
    q = layer.integer_weight()
    bits = required_bits(q)
    kept = bits > 0
    scale = pow2(layer.exponent.detach().float())[kept]
    _check_finite(weight_name, "the scales (2^exponent)", scale)
    region = np.concatenate([bits.to(torch.uint8).numpy(), _tensor_bytes(scale), pack(q, bits)])
    entry: dict[str, Any] = {"n": weight_name, "k": "q", "s": list(q.shape), "o": offset, "kept": int(kept.sum())}
    if layer.channel_axis:
        entry["ax"] = layer.channel_axis
    return entry, region


def _encode(model: nn.Module) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every entry of the layer map, and the payload."""
    chunks: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    offset = 0
    written: dict[int, str] = {}  # id of each tensor written -> the name it was written under
    for name, layer in quantized_layers(model):
        entry, region = _encode_layer(name, layer, offset)
        entries.append(entry)
        chunks.append(region)
        offset += region.nbytes
        if not parametrize.is_parametrized(layer, layer.quant_param):  # type: ignore[arg-type]
            written[id(layer.leaf_tensors()[0])] = entry["n"]
    params = {id(p) for p in model.parameters()}
    stored = {id(t) for _, t in stored_tensors(model)}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in written:  # tied: the same tensor under another name
            if written[id(t)] != name:
                entries.append({"n": name, "k": "a", "of": written[id(t)]})
            continue
        if id(t) not in stored:  # quantizer state, or the originals of a parametrized quantized weight
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise SGSCValueError(describe_rule(f"dtype of {name!r}", f"one of {sorted(_DTYPES)}", dtype))
        if id(t) in params:
            _check_finite(name, "the parameter", t.detach())
        data = _tensor_bytes(t)
        entries.append({"n": name, "k": "t", "d": dtype, "s": list(t.shape), "o": offset})
        chunks.append(data)
        offset += data.nbytes
        written[id(t)] = name
    return entries, np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)


def _writable(path: Path) -> Path:
    """``path`` as a target the writer may replace: a regular file, or nothing yet."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise SGSCValueError(describe_rule("path", "a regular file (or a new name)", f"{str(path)!r} ({kind})"))
    if not path.parent.is_dir():
        raise SGSCValueError(describe_rule("path", "a file in an existing folder", str(path)))
    return path


def _sealed(blob: bytes) -> bytes:
    """The file with its checksum written in place of the placeholder."""
    at = blob.find(_PLACEHOLDER.encode())
    digest = hashlib.sha256(blob).hexdigest().encode()
    return blob[:at] + digest + blob[at + len(digest) :]


@torch.no_grad()
def export_compressed(model: nn.Module, path: str | Path) -> int:
    """Writes ``model`` (holding quantized twins) as a bit-packed artifact.

    Args:
        model: a model swapped by :func:`~lightning_sgsc.quantize_` or trained with the callback.
        path: file to write (a regular file or a new name; written whole, then renamed into place).

    Returns:
        The file's size in bytes.

    Raises:
        SGSCRuntimeError: the model holds no quantized layer.
        SGSCValueError: a weight, bit depth, exponent or parameter is not finite (nothing is written), a dtype the
            format does not store, or ``path`` is not a regular file.
    """
    from safetensors.torch import save

    if not quantized_layers(model):
        raise SGSCRuntimeError(
            describe_rule("model", "a model with quantized layers", "a float model")
            + " Train it with SafetyGuidedQuantization or call `quantize_(model)` first; a float model is saved with"
            " `torch.save(model.state_dict())` or safetensors."
        )
    target = _writable(Path(path))
    entries, payload = _encode(model)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "writer": __version__, "entries": entries}
    _validate_entries(header, payload.nbytes)  # the reader's own checks, on what is about to be written
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    tensors = {"header": torch.frombuffer(bytearray(packed), dtype=torch.uint8), "payload": torch.from_numpy(payload)}
    blob = _sealed(save(tensors, metadata={_CHECKSUM_KEY: _PLACEHOLDER}))
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(blob)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return len(blob)


# -------------------------------------------------------------------------------------------------------- reading


def _corrupt(path: str | Path, why: str) -> CompressedFormatError:
    return CompressedFormatError(describe_rule("path", "an intact lightning-sgsc artifact", str(path)) + f" {why}")


def _verify_checksum(path: str | Path, blob: bytes, metadata: dict[str, str]) -> None:
    digest = metadata.get(_CHECKSUM_KEY)
    if not isinstance(digest, str) or len(digest) != 64:
        raise _corrupt(path, "Its checksum is missing: the file is corrupted or was not written by lightning-sgsc.")
    at = blob.find(digest.encode())
    if at < 0 or hashlib.sha256(blob[:at] + _PLACEHOLDER.encode() + blob[at + 64 :]).hexdigest() != digest:
        raise _corrupt(path, "Its checksum does not match its contents: the file is corrupted (or truncated).")


def _read(path: str | Path) -> tuple[dict[str, Any], np.ndarray]:
    """The header and the payload of an artifact, its checksum verified (version 3)."""
    from safetensors.torch import load

    blob = Path(path).read_bytes()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        metadata = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(blob)
    except Exception as err:  # truncated, corrupted or not safetensors at all
        raise CompressedFormatError(
            describe_rule("path", "a readable safetensors file", str(path)) + f" Reading failed: {err}"
        ) from err
    keys = sorted(tensors)
    if keys not in (["header", "payload"], ["payload"]):  # versions 2-3; version 1 (header in the metadata)
        raise CompressedFormatError(
            describe_rule("path", "a lightning-sgsc artifact (a 'header' and a 'payload' tensor)", str(path))
            + f" It holds tensors {keys[:5]}."
        )
    if _CHECKSUM_KEY in metadata or "header" in keys:
        packed = tensors.get("header")
        header = _parse_header(path, packed, metadata)
        if header.get("version") == FORMAT_VERSION or _CHECKSUM_KEY in metadata:
            _verify_checksum(path, blob, metadata)
    else:
        header = _parse_header(path, None, metadata)
    payload = tensors["payload"]
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CompressedFormatError(describe_rule("payload", "a 1-D uint8 tensor", f"{payload.dtype} {payload.shape}"))
    return header, payload.numpy()


def _parse_header(path: str | Path, packed: Tensor | None, metadata: dict[str, str]) -> dict[str, Any]:
    try:
        header = json.loads(metadata["sgsc"] if packed is None else _inflate(packed))
    except (KeyError, ValueError, TypeError, zlib.error) as err:
        raise CompressedFormatError(
            describe_rule("path", "a lightning-sgsc artifact with a JSON header", str(path)) + f" Reading it: {err}"
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CompressedFormatError(
            describe_rule("format", repr(FORMAT), header.get("format") if isinstance(header, dict) else header)
        )
    version = header.get("version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise CompressedFormatError(
            describe_rule("version", ", ".join(map(str, _READABLE_VERSIONS[:-1])) + f" or {FORMAT_VERSION}", version)
            + f" This file was written by lightning-sgsc {header.get('writer')!r}; this is {__version__}."
        )
    return header


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


def _region(payload_bytes: int, start: int, nbytes: int, name: str) -> None:
    if start < 0 or nbytes < 0 or start + nbytes > payload_bytes:
        raise CompressedFormatError(
            describe_rule(
                f"the data of {name!r}",
                f"inside the payload ({payload_bytes} bytes)",
                f"bytes {start}..{start + nbytes}",
            )
            + " The file is truncated or corrupted."
        )


def _validate_entries(header: dict[str, Any], payload_bytes: int) -> list[dict[str, Any]]:
    """The layer map, each entry's kind, name, shape and region checked against the payload's length (no tensor is
    made here). Run by the writer on what it writes and by the reader on what it reads."""
    entries = header.get("entries")
    if not isinstance(entries, list):
        raise CompressedFormatError(describe_rule("entries", "a list", type(entries).__name__))
    names: set[str] = set()
    for entry in entries:
        name = _entry_field(entry, "n", str)
        kind = _entry_field(entry, "k", str)
        if name in names:
            raise CompressedFormatError(describe_rule("entries", "one entry per name", name))
        if kind == "a":
            if _entry_field(entry, "of", str) not in names:
                raise CompressedFormatError(
                    describe_rule(f"alias {name!r}", "of a tensor stored before it", entry["of"])
                )
        elif kind == "q":
            shape = _shape(entry)
            if len(shape) < 2:
                raise CompressedFormatError(describe_rule(f"shape of {name!r}", "at least 2-D", shape))
            axis = entry.get("ax", 0)
            if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape):
                raise CompressedFormatError(describe_rule(f"channel axis of {name!r}", f"0 to {len(shape) - 1}", axis))
            _region(payload_bytes, _entry_field(entry, "o", int), shape[0], name)
        elif kind == "t":
            dtype = _entry_field(entry, "d", str)
            if dtype not in _DTYPES:
                raise CompressedFormatError(describe_rule(f"dtype of {name!r}", f"one of {sorted(_DTYPES)}", dtype))
            itemsize = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
            _region(payload_bytes, _entry_field(entry, "o", int), math.prod(_shape(entry)) * itemsize, name)
        else:
            raise CompressedFormatError(describe_rule(f"kind of {name!r}", "'q', 't' or 'a'", kind))
        names.add(name)
    return entries


def _decode_quantized(entry: dict[str, Any], payload: np.ndarray) -> Tensor:
    name, shape, start = entry["n"], entry["s"], entry["o"]
    channels, fan_in = shape[0], math.prod(shape[1:])
    bits = torch.from_numpy(payload[start : start + channels].astype(np.int64))
    if bool((bits > 16).any()):
        raise CompressedFormatError(describe_rule(f"bit depths of {name!r}", "0 to 16", int(bits.max())))
    kept = bits > 0
    n_kept = int(kept.sum())
    if entry.get("kept") != n_kept:
        raise CompressedFormatError(describe_rule(f"kept channels of {name!r}", str(n_kept), entry.get("kept")))
    nbytes = packed_nbytes(bits, fan_in)
    _region(payload.nbytes, start + channels, 4 * n_kept + nbytes, name)
    scale = torch.from_numpy(payload[start + channels : start + channels + 4 * n_kept].copy().view(np.float32))
    if not bool(torch.isfinite(scale).all()):
        raise CompressedFormatError(describe_rule(f"scales of {name!r}", "finite", "non-finite values"))
    q = unpack(payload[start + channels + 4 * n_kept : start + channels + 4 * n_kept + nbytes], bits, fan_in)
    weight = torch.zeros(channels, fan_in, dtype=torch.float32)
    weight[kept] = scale[:, None] * q[kept].to(torch.float32)
    weight = weight.reshape(shape)
    axis = entry.get("ax", 0)
    return weight.movedim(0, axis).contiguous() if axis else weight


def _decode_tensor(entry: dict[str, Any], payload: np.ndarray) -> Tensor:
    dtype = _DTYPES[entry["d"]]
    shape = entry["s"]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = payload[entry["o"] : entry["o"] + math.prod(shape) * itemsize].copy()
    if raw.size == 0:  # numpy gives an empty array stride 0, which torch cannot reinterpret
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _stored_shape(entry: dict[str, Any]) -> tuple[int, ...]:
    """The shape of the tensor an entry becomes (a quantized weight back in its own layout)."""
    shape = list(entry["s"])
    axis = entry.get("ax", 0) if entry["k"] == "q" else 0
    return tuple(shape[1 : axis + 1] + shape[:1] + shape[axis + 1 :])


def _plain_skeleton(model: nn.Module, entries: list[dict[str, Any]]) -> None:
    """Removes the parametrizations of ``model``'s weights that the file stores as quantized weights (a
    ``weight_norm``-ed layer loads as a plain layer holding its quantized weight)."""
    for entry in entries:
        if entry["k"] != "q":
            continue
        owner, _, param = entry["n"].rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if parametrize.is_parametrized(module, param):
            parametrize.remove_parametrizations(module, param, leave_parametrized=True)  # overwritten by the load


def _check_skeleton(model: nn.Module, entries: list[dict[str, Any]]) -> None:
    """Every entry's name and shape against the skeleton's state dict, before anything is decoded."""
    if quantized_layers(model):
        raise SkeletonMismatchError(
            describe_rule("model", "a float skeleton (not swapped)", "a model with quantized layers")
            + " Load into a fresh instance of your model class."
        )
    expected = dict(model.state_dict())
    names = set()
    for entry in entries:
        name = entry["n"]
        names.add(name)
        if name not in expected:
            raise SkeletonMismatchError(
                describe_rule("model", f"a skeleton with the layer {name!r}", type(model).__name__)
                + " The artifact was exported from a different architecture."
            )
        shape = tuple(expected[name].shape) if entry["k"] != "a" else None
        if shape is not None and _stored_shape(entry) != shape:
            raise SkeletonMismatchError(describe_rule(f"shape of {name!r}", str(_stored_shape(entry)), shape))
    missing = sorted(set(expected) - names)
    if missing:
        raise SkeletonMismatchError(
            describe_rule("model", "a skeleton with only the artifact's tensors", f"extra tensors {missing[:5]}")
        )


@torch.no_grad()
def load_compressed(path: str | Path, model: nn.Module) -> nn.Module:
    """Fills a float ``model`` skeleton (the user's own class, not swapped) from an artifact, in place.

    Returns:
        ``model``, a plain ``nn.Module`` whose eval outputs equal the exported model's exactly on CPU.

    Raises:
        CompressedFormatError: the file is truncated, corrupted (its checksum fails), foreign or of another format
            version.
        SkeletonMismatchError: a layer of the file is missing from ``model`` or has another shape.
    """
    try:
        header, payload = _read(path)
        entries = _validate_entries(header, payload.nbytes)
    except SGSCError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # anything else a damaged file provokes is a damaged file
        raise _corrupt(path, f"Reading it failed: {type(err).__name__}: {err}") from err
    _plain_skeleton(model, entries)
    _check_skeleton(model, entries)  # sizes are the skeleton's from here on: nothing larger is allocated
    state: dict[str, Tensor] = {}
    for entry in entries:
        if entry["k"] == "q":
            state[entry["n"]] = _decode_quantized(entry, payload)
        elif entry["k"] == "t":
            state[entry["n"]] = _decode_tensor(entry, payload)
        else:
            state[entry["n"]] = state[entry["of"]]
    model.load_state_dict(state, strict=True)
    return model
