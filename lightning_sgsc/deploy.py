"""Deployment: an ONNX file with integer weights and the pruned channels gone, checked in ONNX Runtime.

:func:`export_onnx` takes a compressed model (twins, as trained), bakes a float copy, removes its zero channels
(:func:`~lightning_sgsc.prune.prune_zero_channels`) and exports it with torch's ONNX exporter. Then each quantized
layer's float weight initializer becomes integers plus a per-output-channel power-of-two scale, joined by a
``DequantizeLinear`` (axis 0) whose output takes the weight's name, so the ``Conv``/``Gemm``/``MatMul`` that read it are
unchanged: the QDQ (weight-only) convention ONNX Runtime executes. Everything else stays float.

The integers are exact: a trained row is ``2^e · q`` (float32 products); after pruning each remaining row is matched,
in order, to its trained scale, and ``DequantizeLinear`` computes the same float32 products. The tensor type is the
smallest ONNX type holding every row of the layer: ``int4`` (opset 21), ``int8`` or ``int16``.

The exported graph is checked, not trusted: ``onnx.checker`` and ONNX Runtime's outputs against the compressed
PyTorch model on ``example_inputs``. Run it with :func:`runtime_session`, which lets ONNX Runtime dequantize the
weights once at load (CPU speed of a float model from the small file). Needs the ``onnx`` extra:
``pip install "lightning-sgsc[onnx]"``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sgsc.errors import SGSCRuntimeError, SGSCValueError, describe_rule
from lightning_sgsc.outputs import MainOutput, OutputFn, main_output
from lightning_sgsc.prune import PruneReport, prune_zero_channels
from lightning_sgsc.quant.functional import pow2, required_bits
from lightning_sgsc.quant.modules import all_twins, quantized_layers
from lightning_sgsc.quant.swap import dequantize_

OPSET = 21
"""Opset of the exported graph: the first with ``int4`` in ``DequantizeLinear``."""


@dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote and checked."""

    path: str
    file_bytes: int
    weight_types: dict[str, str] = field(default_factory=dict)  # quantized layer -> int4 / int8 / int16
    prune: PruneReport | None = None
    max_abs_diff: float = 0.0  # ONNX Runtime against the compressed PyTorch model on example_inputs


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise SGSCRuntimeError(
            f"export_onnx needs onnx, onnxruntime and onnxscript ({err.name} is missing). "
            'Install the extra: pip install "lightning-sgsc[onnx]".'
        ) from err
    return onnx, onnxruntime


def _inputs(example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise SGSCValueError(describe_rule("example_inputs", "a Tensor or a tuple of Tensors", type(example_inputs)))
    return inputs


@torch.no_grad()
def row_integers(weight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """``(integers, row scales)`` with ``weight == scale[:, None] * integers`` exactly (float32 products, as the
    quantizer computes them), for a weight whose rows are a subsequence, in order, of rows quantized at ``scales``
    (physical pruning removes rows and columns but never reorders them). Each row takes the first remaining scale that
    reproduces it; an all-zero row has integers 0 and scale 1.

    Raises:
        SGSCValueError: a row that no remaining scale reproduces (a weight that was not quantized at ``scales``).
    """
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    ints = torch.zeros(rows.shape, dtype=torch.int32)
    out = torch.ones(rows.shape[0])
    nonzero = scales != 0
    start = 0
    for r in range(rows.shape[0]):
        row = rows[r]
        if not bool(row.any()):
            continue
        while start < scales.numel():
            s, start = scales[start], start + 1
            if not bool(nonzero[start - 1]):
                continue
            q = torch.round(row / s)
            if torch.equal(q * s, row) and bool((q.abs() <= 2**15).all()):
                ints[r], out[r] = q.to(torch.int32), s
                break
        else:
            raise SGSCValueError(f"row {r} is not on the grid of any remaining scale")
    return ints.reshape(weight.shape), out


def _int_tensor(onnx: Any, name: str, q: Tensor, bits: int) -> tuple[Any, str]:
    """An ONNX initializer holding ``q`` at the smallest type for ``bits`` (raw little-endian data)."""
    flat = q.flatten().numpy()
    if bits <= 4:
        nibbles = (flat.astype(np.int64) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
        kind, dtype = "int4", onnx.TensorProto.INT4
    elif bits <= 8:
        raw, kind, dtype = flat.astype("<i1").tobytes(), "int8", onnx.TensorProto.INT8
    else:
        raw, kind, dtype = flat.astype("<i2").tobytes(), "int16", onnx.TensorProto.INT16
    return onnx.helper.make_tensor(name, dtype, list(q.shape), raw, raw=True), kind


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    path: str | Path,
    prune: bool = True,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
    output_fn: OutputFn | None = None,
) -> OnnxReport:
    """Writes ``model`` (holding quantized twins) as an ONNX file with integer weights and checks it in ONNX Runtime.

    Args:
        model: a model trained with the callback or swapped by :func:`~lightning_sgsc.quantize_` (not changed).
        example_inputs: inputs to trace and check with (a Tensor or a tuple of Tensors; the first dimension is the
            batch).
        path: the ``.onnx`` file to write.
        prune: remove zero channels first (fewer MACs at inference).
        dynamic_batch: export the batch dimension as dynamic.
        atol: largest allowed difference between ONNX Runtime's outputs and the compressed PyTorch model's.
        output_fn: which tensor of the model's output the file returns (default: ``logits`` when present, else the
            first tensor; :mod:`lightning_sgsc.outputs`).

    Returns:
        An :class:`OnnxReport`.

    Raises:
        SGSCRuntimeError: the ``onnx`` extra is missing, the model has no quantized layer, the exporter fails, a
            quantized layer's weight is not a plain initializer of the exported graph (the error names the layer),
            or ONNX Runtime's outputs differ from the model's.
    """
    onnx, ort = _require_onnx()
    inputs = _inputs(example_inputs)
    if not quantized_layers(model):
        raise SGSCRuntimeError(describe_rule("model", "a model with quantized layers", "a float model"))
    scales = _layer_scales(model)
    reference, baked, plain = _reference_and_baked(model, inputs, output_fn)
    report = OnnxReport(path=str(path), file_bytes=0)
    if prune:
        report.prune = prune_zero_channels(baked, inputs[0] if len(inputs) == 1 else inputs, output_fn=output_fn)
    exported = baked.eval() if plain else MainOutput(baked.eval(), output_fn)  # a tensor out, for the exporter
    proto = _exported(onnx, exported, inputs, path, dynamic_batch, varargs=not plain)
    _quantize_initializers(onnx, proto, baked, scales, report, prefix="" if plain else "model.")
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    Path(path).write_bytes(data)
    report.file_bytes = len(data)
    report.max_abs_diff = _check(ort, data, inputs, reference, atol)
    return report


def _layer_scales(model: nn.Module) -> dict[str, tuple[Tensor, int, str, list[str]]]:
    """Per quantized weight (by its first holder's name): each channel's scale ``2^e`` as the quantizer computes it
    (0 for channels that quantize to zero), its channel axis, the name of its quantized Parameter, and the names of
    all its holders (two for a tied weight: the exporter keeps one initializer under either name)."""
    holders: dict[int, list[str]] = {}
    for name, twin in all_twins(model):
        holders.setdefault(id(twin.bits), []).append(name)
    with torch.no_grad():
        return {
            name: (
                torch.where(m.effective_bits() > 0, pow2(m.exponent.float()), 0.0),
                m.channel_axis,
                m.quant_param,
                holders[id(m.bits)],
            )
            for name, m in quantized_layers(model)
        }


def _reference_and_baked(
    model: nn.Module, inputs: tuple[Tensor, ...], output_fn: OutputFn | None
) -> tuple[Tensor, nn.Module, bool]:
    """The compressed model's output on ``inputs`` (eval mode), a float copy holding its quantized weights, and
    whether the model returns that tensor itself (no wrapper needed)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = model(*inputs)
            reference = main_output(raw, output_fn)
        baked = copy.deepcopy(model)
    finally:
        model.train(was_training)
    dequantize_(baked)
    return reference, baked, isinstance(raw, Tensor) and output_fn is None


def _exported(
    onnx: Any, module: nn.Module, inputs: tuple[Tensor, ...], path: str | Path, dynamic_batch: bool, varargs: bool
) -> Any:
    """``module`` through torch's ONNX exporter, without the exporter's per-node stack traces (``varargs``: its
    forward takes ``*args``, as :class:`~lightning_sgsc.outputs.MainOutput` does)."""
    dims: Any = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
    dynamic = ((dims,) if varargs else dims) if dynamic_batch else None
    try:
        program = torch.onnx.export(
            module, inputs, dynamo=True, optimize=False, dynamic_shapes=dynamic, opset_version=OPSET, verbose=False
        )
        if program is None:
            raise RuntimeError("the exporter returned no program")
        program.save(str(path))
    except Exception as err:
        raise SGSCRuntimeError(
            f"torch's ONNX exporter could not express this model ({type(err).__name__}: {str(err)[:500]})."
            + (" Try dynamic_batch=False." if dynamic_batch else "")
        ) from err
    proto = onnx.load(str(path))
    for node in proto.graph.node:  # kilobytes of text the runtime never reads
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def _quantize_initializers(
    onnx: Any,
    proto: Any,
    baked: nn.Module,
    scales: dict[str, tuple[Tensor, int, str, list[str]]],
    report: OnnxReport,
    prefix: str = "",
) -> None:
    """Replaces each quantized layer's float weight initializer by integers, per-channel scales and a
    ``DequantizeLinear`` along the channel axis whose output takes the weight's name."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = {i for node in graph.node for i in node.input}
    new_nodes = []
    for name, (layer_scales, axis, param, holders) in scales.items():
        keys = [f"{prefix}{holder}.{param}" for holder in holders]  # a tied weight: one initializer, either name
        key = next((k for k in keys if k in initializers), keys[0])
        init = initializers.get(key)
        if init is None or key not in consumers:
            raise SGSCRuntimeError(
                describe_rule(f"layer {name!r}", "a weight the exported graph reads as an initializer", "none found")
                + " The exporter folded or rewrote it; export this layer in float (exclude it) or change its forward."
            )
        weight = _float(baked, key, prefix)
        try:
            q, channel_scale = row_integers(weight.movedim(axis, 0) if axis else weight, layer_scales)
        except SGSCValueError as err:
            raise SGSCRuntimeError(
                describe_rule(f"layer {name!r}", "rows on its quantization grid after pruning", str(err))
            ) from err
        bits = int(required_bits(q).max()) if q.numel() else 1
        int_init, kind = _int_tensor(onnx, f"{key}_quantized", q.movedim(0, axis) if axis else q, max(bits, 1))
        scale = onnx.numpy_helper.from_array(channel_scale.numpy().astype(np.float32), f"{key}_scale")
        graph.initializer.remove(init)
        graph.initializer.extend([int_init, scale])
        new_nodes.append(
            onnx.helper.make_node(
                "DequantizeLinear", [int_init.name, scale.name], [key], axis=axis, name=f"{key}_dequantize"
            )
        )
        report.weight_types[name] = kind
    for node in reversed(new_nodes):
        graph.node.insert(0, node)


def _float(baked: nn.Module, key: str, prefix: str) -> Tensor:
    owner, _, param = key.removeprefix(prefix).rpartition(".")
    return cast(Tensor, getattr(baked.get_submodule(owner), param)).detach()


def runtime_session(model: str | Path | bytes, fold_weights: bool = True, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session for a file :func:`export_onnx` wrote.

    Args:
        model: the ``.onnx`` path (or its bytes).
        fold_weights: dequantize the integer weights once, when the session loads (ONNX Runtime's
            ``session.disable_quant_qdq``), so the float kernels run with pre-packed weights: as fast as a float
            model, the file still small. ``False``: the ``DequantizeLinear`` nodes run at every call, with only the
            basic graph optimizations (slower, exact). ONNX Runtime's extended optimizations would fuse them with
            ``MatMul`` into ``MatMulNBits``, which quantizes the activations too (on a 4-layer transformer its logits
            moved by 0.011): build your own session if you want that trade.
        providers: execution providers (default: CPU).
    """
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the runtime's notes on folding it skipped are not ours to show
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def _check(ort: Any, data: bytes, inputs: tuple[Tensor, ...], reference: Tensor, atol: float) -> float:
    """The largest difference to ``reference`` of the graph as written (DequantizeLinear at every call) and of the
    session :func:`runtime_session` gives (weights folded at load)."""
    expected = reference if isinstance(reference, (tuple, list)) else [reference]
    diff = 0.0
    for fold in (False, True):
        session = runtime_session(data, fold_weights=fold)
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        outputs = session.run(None, feeds)
        diff = max(
            [diff]
            + [
                float(np.abs(o - e.detach().cpu().numpy()).max()) if o.size else 0.0
                for o, e in zip(outputs, expected, strict=True)
            ]
        )
    if not diff <= atol:
        raise SGSCRuntimeError(
            describe_rule("the ONNX file's outputs", f"within {atol:g} of the compressed model's", f"{diff:.3g} off")
        )
    return diff
