"""The fused per-step quantizer computes exactly what the per-layer quantizers compute, once per step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.losses import bits_per_weight
from lightning_sgsc.quant import functional, fused
from lightning_sgsc.quant.fused import FusedQuantizer
from lightning_sgsc.quant.modules import quantized_layers
from lightning_sgsc.quant.swap import quantize_
from tests.helpers.models import TinyClassifier, TinyConvNet, TinyMLP, TinyTransformer, cpu_trainer


def _randomised(model: nn.Module) -> nn.Module:
    """Bits spread over -1..5 (some channels below zero, one exactly at zero), shifted exponents, one pruned
    channel."""
    torch.manual_seed(1)
    quantize_(model, init_bits=4)
    layers = [m for _, m in quantized_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.bits.uniform_(-1.0, 5.0)
            layer.exponent.add_(0.5 * torch.randn_like(layer.exponent))
    layers[0].pruned[0] = True
    with torch.no_grad():
        layers[-1].bits[0] = 0.0  # max(b, 0) passes no gradient at exactly 0 (as clamp_min's backward)
    return model


class TwoSameFanIn(nn.Module):
    """Two Linear layers with the same fan-in (one stacked group) and one with another fan-in."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 5)
        self.c = nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=-1))


INPUTS = {
    TwoSameFanIn: lambda: torch.randn(7, 8),
    TinyConvNet: lambda: torch.randn(5, 1, 8, 8),
    TinyMLP: lambda: torch.randn(6, 10),
    TinyTransformer: lambda: torch.randint(0, 11, (3, 8)),  # qkv and mlp[0] share fan-in 16 with head
}


@pytest.mark.parametrize("make", list(INPUTS), ids=lambda c: c.__name__)
def test_fused_step_matches_per_layer_quantizers(make):
    per_layer = _randomised(make())
    fused = copy.deepcopy(per_layer)
    torch.manual_seed(2)
    x, x2 = INPUTS[make](), INPUTS[make]()

    def loss(model: nn.Module, bits: torch.Tensor) -> torch.Tensor:  # two forwards, like task + preservation
        return model(x).square().mean() + model(x2).mean() + 0.1 * bits

    expected = loss(per_layer, bits_per_weight(per_layer))
    expected.backward()
    fq = FusedQuantizer([m for _, m in quantized_layers(fused)])
    with fq.step():
        layer_weights = [m.quantized_weight() for _, m in quantized_layers(fused)]
        got = loss(fused, fq.bits_per_weight())
    got.backward()
    for (_, a), q in zip(quantized_layers(per_layer), layer_weights, strict=True):
        assert torch.equal(a.quantized_weight(), q)  # bit for bit
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, r in zip(per_layer.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(r.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_the_step_quantizes_once_for_every_forward(monkeypatch):
    model = _randomised(TwoSameFanIn())
    per_layer, fused_calls = [], []
    original = functional._Quantize.apply
    monkeypatch.setattr(functional._Quantize, "apply", lambda *a: per_layer.append(1) or original(*a))
    original_fused = fused._FusedQuantize.apply
    monkeypatch.setattr(fused._FusedQuantize, "apply", lambda *a: fused_calls.append(1) or original_fused(*a))
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    with fq.step():
        for _ in range(3):
            model(torch.randn(2, 8))
    assert (len(fused_calls), len(per_layer)) == (1, 0)  # one call for all layers, not 3 layers x 3 forwards
    model(torch.randn(2, 8))  # outside the step: each layer quantizes itself again
    assert (len(fused_calls), len(per_layer)) == (1, 3)


def test_a_tensor_changed_inside_the_step_falls_back_to_its_own_quantizer():
    model = _randomised(TwoSameFanIn())
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    with fq.step():
        stale = model.a.quantized_weight()
        with torch.no_grad():
            model.a.weight.mul_(3.0)
        fresh = model.a.quantized_weight()
        assert not torch.equal(fresh, stale)
        assert torch.equal(fresh, functional.quantize(model.a.weight, model.a.bits, model.a.exponent, model.a.pruned))
    assert all(m.modes.fused is None for _, m in quantized_layers(model))  # nothing held after the step


def test_no_grad_forwards_inside_the_step_do_not_reuse_the_graph():
    model = _randomised(TwoSameFanIn())
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    with torch.no_grad(), fq.step():
        assert model.a.modes.fused is None  # nothing to share without autograd
    with fq.step(), torch.no_grad():
        assert not model.a.quantized_weight().requires_grad


def test_the_mixin_runs_each_training_step_inside_one_fused_pass(tmp_path):
    seen: list[bool] = []

    class Probe(TinyClassifier):
        def training_step(self, batch, batch_idx):
            seen.append(all(m.modes.fused is not None for _, m in quantized_layers(self)))
            return super().training_step(batch, batch_idx)

    model = Probe()
    cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_size=0)], max_epochs=1).fit(model)
    assert seen and all(seen)
    assert all(m.modes.fused is None for _, m in quantized_layers(model))


def test_the_backward_reuses_the_stacked_weights_unless_something_stacked_since(monkeypatch):
    model = _randomised(TinyConvNet())  # padded layers: stacked into a workspace matrix
    reference = copy.deepcopy(model)
    layers = [m for _, m in quantized_layers(model)]
    fq = FusedQuantizer(layers)
    stacked = []
    original = fused._Group.stack
    monkeypatch.setattr(
        fused._Group, "stack", lambda self, t, slot, *a: stacked.append(slot) or original(self, t, slot, *a)
    )
    bpw, q = fq.quantize_all()
    torch.autograd.backward([bpw, *q], [torch.ones(()), *[torch.ones_like(t) for t in q]])
    assert stacked.count(0) == len(fq._groups)  # weights stacked once per step, by the forward

    # a second pass over other weights before the first one's backward: the first backward must re-stack its own
    bpw, q = fq.quantize_all()
    saved = [m.weight for m in layers]
    for m in layers:
        m.weight = nn.Parameter(m.weight.detach() * 10.0)  # other clipping, other gradients
    fq.quantize_all()
    for m in saved:
        m.grad = None
    upstream = [torch.randn_like(t) for t in q]
    torch.autograd.backward([bpw, *q], [torch.ones(()), *upstream])
    ref_layers = [m for _, m in quantized_layers(reference)]
    expected = [functional.quantize(m.weight, m.bits, m.exponent, m.pruned) for m in ref_layers]
    torch.autograd.backward(expected, upstream)
    for got, ref in zip(saved, ref_layers, strict=True):
        torch.testing.assert_close(got.grad, ref.weight.grad, rtol=1e-5, atol=1e-7)


def test_pruning_between_steps_reaches_the_cached_plan():
    model = _randomised(TwoSameFanIn())
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    with torch.no_grad():
        model.b.bits.fill_(4.0)
    _, before = fq.quantize_all()
    assert before[1][2].abs().sum() > 0
    model.b.pruned[2] = True  # in place
    _, after = fq.quantize_all()
    assert torch.equal(after[1][2], torch.zeros_like(after[1][2])) and after[1][3].abs().sum() > 0
    model.b.pruned = torch.ones_like(model.b.pruned)  # a new mask object
    _, after = fq.quantize_all()
    assert torch.equal(after[1], torch.zeros_like(after[1]))


@pytest.mark.slow
def test_the_compiled_arithmetic_gives_the_same_quantized_weights():
    # opt-in torch.compile of the fused pass (compiles once for this shape: seconds): the forward is bit for bit
    model = _randomised(TinyConvNet())
    layers = [m for _, m in quantized_layers(model)]
    eager_bpw, eager = FusedQuantizer(layers).quantize_all()
    compiled_bpw, compiled = FusedQuantizer(layers, compile=True).quantize_all()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    assert torch.equal(eager_bpw, compiled_bpw)
