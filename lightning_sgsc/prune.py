"""Physical pruning: remove output channels that compute exactly zero, and the inputs that consumed them.

A channel computes exactly zero when its weights and its bias are all zero (what the callback's pruning leaves, and
what an exported zero-bit channel reloads as). Removing it, and the matching inputs of the layers that read it, leaves
the model's function unchanged up to floating-point summation order, as long as everything in between maps 0 to 0
(ReLU, GELU, pooling, flatten, reshapes), and a BatchNorm after it has ``gamma = beta = 0`` on those channels (what
the callback's pruning leaves). Whole attention heads whose value rows are zero go first
(:func:`prune_attention_heads`).

The dependency graph comes from Torch-Pruning (``torch-pruning`` on PyPI; it follows Conv → activation/pool → Conv,
Conv → flatten → Linear, Linear → Linear and the q/k/v splits of attention). A group is removed only if every layer
whose *outputs* it would cut holds zeros there, every BatchNorm in it has zero ``gamma``/``beta`` there, and no other
normalisation or embedding layer is in it (those would turn a zero into a constant), and only if the pruned copy's
outputs still match the original's; otherwise the channels
stay (they still cost no payload bits in the exported file).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_sgsc.errors import SGSCTypeError, describe_rule
from lightning_sgsc.outputs import OutputFn, main_output
from lightning_sgsc.quant.modules import quantized_layers

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_BLOCKERS = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)


@dataclass
class PruneReport:
    """What :func:`prune_zero_channels` removed."""

    removed: dict[str, int] = field(default_factory=dict)
    heads_removed: dict[str, int] = field(default_factory=dict)
    kept_zero: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    max_abs_diff: float = 0.0


def _zero_rows(layer: nn.Module) -> Tensor:
    weight, bias = cast(Tensor, layer.weight), cast("Tensor | None", layer.bias)
    w = weight.detach().reshape(weight.shape[0], -1)
    zero = (w == 0).all(dim=1)
    if bias is not None:
        zero &= bias.detach() == 0
    return zero


def _run(model: nn.Module, example_inputs: Any, output_fn: OutputFn | None) -> Tensor:
    """The model's main output on ``example_inputs`` (a tensor, or a tuple of positional inputs)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return main_output(model(*args), output_fn)


def _output_layers(model: nn.Module, example_inputs: Any) -> set[nn.Module]:
    """Layers whose output tensor is (part of) the model's output: their channels are never removed."""
    produced: dict[int, nn.Module] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o: produced.__setitem__(id(o), mod))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            out = model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        for h in hooks:
            h.remove()
    outs: list[Any] = []

    def collect(value: Any) -> None:  # every tensor of the output, whatever holds it
        if isinstance(value, Tensor):
            outs.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                collect(v)
        elif hasattr(value, "values") and callable(value.values):  # transformers' ModelOutput
            for v in value.values():
                collect(v)

    collect(out)
    return {produced[id(o)] for o in outs if id(o) in produced}


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def prune_zero_channels(
    model: nn.Module, example_inputs: Any, atol: float = 1e-5, output_fn: OutputFn | None = None
) -> PruneReport:
    """Removes every exactly-zero output channel that can be removed without changing the outputs, in place.

    Args:
        model: a float model (e.g. from :func:`~lightning_sgsc.export.load_compressed` or after
            :func:`~lightning_sgsc.dequantize_`), in eval mode.
        example_inputs: inputs to trace the model with (and to check the outputs on).
        atol: largest absolute output change accepted (summation order differs once channels are gone).
        output_fn: which tensor of the model's output to compare (default: ``logits`` when present, else the first
            tensor; :mod:`lightning_sgsc.outputs`).

    Returns:
        A :class:`PruneReport`: channels removed and kept per layer, parameters and MACs before and after.

    Raises:
        SGSCTypeError: the model still holds quantized twins.
    """
    if quantized_layers(model):
        raise SGSCTypeError(
            describe_rule("model", "a float model", "a model with quantized layers")
            + " Call `dequantize_(model)` or load the exported file with `load_compressed` first."
        )
    model.eval()
    with torch.no_grad():
        reference = _run(model, example_inputs, output_fn)
    report = PruneReport()
    report.macs_before, report.params_before = _count(model, example_inputs)
    report.heads_removed = prune_attention_heads(model)
    keep_outputs = {n for n, m in model.named_modules() if m in _output_layers(model, example_inputs)}
    candidates = [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and bool(_zero_rows(m).any())]
    removable = [n for n in candidates if n not in keep_outputs]
    for name in candidates:
        if name in keep_outputs:
            report.kept_zero[name] = int(_zero_rows(model.get_submodule(name)).sum())
    # Every group on one copy with one dependency graph; kept only if the outputs still match. Otherwise layer by
    # layer, each on a copy of its own: a graph Torch-Pruning mis-reads (a custom head reshape, say) leaves those
    # channels in place instead of breaking the model.
    current = copy.deepcopy(model)
    zero_before = {n: int(_zero_rows(current.get_submodule(n)).sum()) for n in removable}
    removed = _prune_layers(current, removable, example_inputs)
    if not removed:
        current = model
    elif not _matches(current, example_inputs, reference, atol, output_fn):
        current, removed = model, {}
        for name in removable:
            trial = copy.deepcopy(current)
            count = _prune_layers(trial, [name], example_inputs).get(name, 0)
            if count and _matches(trial, example_inputs, reference, atol, output_fn):
                current, removed[name] = trial, count
    for name in removable:
        report.removed.update({name: removed[name]} if removed.get(name) else {})
        if zero_before[name] > removed.get(name, 0):
            report.kept_zero[name] = zero_before[name] - removed.get(name, 0)
    if current is not model:  # the caller's object takes over the pruned copy's state (in place)
        model.__dict__.update(current.__dict__)
    with torch.no_grad():
        out = _run(model, example_inputs, output_fn)
    report.max_abs_diff = float((out - reference).abs().max())
    report.macs_after, report.params_after = _count(model, example_inputs)
    return report


def _prune_layers(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    """Removes the zero output channels of each layer in ``names`` whose whole dependency group is exact (one graph
    for all); returns the channels removed per layer."""
    import torch_pruning as tp

    if not names:
        return {}
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    removed: dict[str, int] = {}
    for name in names:
        layer = model.get_submodule(name)
        zero = _zero_rows(layer)
        idxs = zero.nonzero().flatten().tolist()
        if len(idxs) == zero.numel():
            idxs = idxs[1:]  # a layer keeps at least one channel
        if not idxs:
            continue
        conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        handler = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        try:
            group = graph.get_pruning_group(layer, handler, idxs=idxs)
        except ValueError:  # not in the traced graph (a weight its parent reads directly, as attention's out_proj)
            continue
        if _group_is_exact(group, layer):
            group.prune()
            removed[name] = len(idxs)
    return removed


def _matches(
    model: nn.Module, example_inputs: Any, reference: Tensor, atol: float, output_fn: OutputFn | None = None
) -> bool:
    try:
        with torch.no_grad():
            out = _run(model, example_inputs, output_fn)
    except Exception:  # e.g. a reshape or split that no longer fits the pruned widths
        return False
    return out.shape == reference.shape and float((out - reference).abs().max()) <= atol


@torch.no_grad()
def prune_attention_heads(model: nn.Module) -> dict[str, int]:
    """Removes attention heads whose value rows are all zero (weights and bias), in place.

    Such a head outputs exactly zero whatever its queries and keys, so its q, k and v rows and the matching input
    columns of the output projection go. Works on modules that follow this protocol (the example
    ``CharTransformer`` blocks do): ``qkv``, an ``nn.Linear`` producing ``[q | k | v]`` of ``n_head`` heads each;
    ``proj``, an ``nn.Linear`` reading the concatenated heads; ``n_head``, an int; and a forward pass that derives
    the per-head width from ``qkv.out_features // 3 // n_head``. At least one head is kept.

    Returns:
        Heads removed per module name.
    """
    removed: dict[str, int] = {}
    for name, module in model.named_modules():
        qkv, proj, n_head = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "n_head", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(n_head, int)):
            continue
        inner = qkv.out_features // 3
        head_dim = inner // n_head
        v_zero = _zero_rows(qkv)[2 * inner :].reshape(n_head, head_dim).all(dim=1)
        dead = v_zero.nonzero().flatten().tolist()[: n_head - 1]
        if not dead:
            continue
        keep_heads = [h for h in range(n_head) if h not in dead]
        cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_heads])
        rows = torch.cat([cols, cols + inner, cols + 2 * inner])
        new_qkv = nn.Linear(qkv.in_features, rows.numel(), bias=qkv.bias is not None).to(qkv.weight)
        new_qkv.weight.copy_(qkv.weight[rows])
        if qkv.bias is not None:
            new_qkv.bias.copy_(qkv.bias[rows])
        new_proj = nn.Linear(cols.numel(), proj.out_features, bias=proj.bias is not None).to(proj.weight)
        new_proj.weight.copy_(proj.weight[:, cols])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
        module.qkv, module.proj, module.n_head = new_qkv, new_proj, len(keep_heads)
        removed[name] = len(dead)
    return removed


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups == module.in_channels


def _group_is_exact(group: Any, start: nn.Module) -> bool:
    """Whether removing ``group`` keeps the outputs: every layer whose outputs it cuts is zero there, every
    BatchNorm has zero ``gamma``/``beta`` there, and no other normalisation or embedding is in it. One exception: the
    zero channels of a depthwise (grouped) convolution read only their own input channel, so the layers and norms
    *before* it whose channels feed nothing else are dead, zero or not; :func:`prune_zero_channels` checks the
    outputs after every removal in any case."""
    cut_before = _is_depthwise(start)
    for dep, idxs in group:
        module = dep.target.module
        handler = getattr(dep.handler, "__name__", "")
        if isinstance(module, _BLOCKERS):
            return False
        rows = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        if isinstance(module, _BATCH_NORM) and not cut_before:  # exact only where gamma = beta = 0
            if not module.affine or bool(module.weight[rows].any()) or bool(module.bias[rows].any()):
                return False
        if isinstance(module, _PRUNABLE) and handler == "prune_out_channels" and module is not start:
            if not cut_before and not bool(_zero_rows(module)[rows].all()):
                return False
        if module is start and not bool(_zero_rows(module)[rows].all()):
            return False
    return True


def pruned_copy(model: nn.Module, example_inputs: Any, atol: float = 1e-5) -> tuple[nn.Module, PruneReport]:
    """:func:`prune_zero_channels` on a deep copy; the original stays as it is."""
    clone = copy.deepcopy(model)
    return clone, prune_zero_channels(clone, example_inputs, atol)
