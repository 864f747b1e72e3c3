"""The native kernel of the fused quantizer: built once and cached, the same numbers as the torch path, and the
torch path wherever it cannot run."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
import torch

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.errors import SGSCValueError
from lightning_sgsc.quant import native
from lightning_sgsc.quant.functional import _quantize_backward, _quantize_forward, _Steps
from lightning_sgsc.quant.fused import FusedQuantizer
from lightning_sgsc.quant.modules import quantized_layers
from lightning_sgsc.quant.swap import quantize_
from tests.helpers.models import TinyClassifier, TinyConvNet, cpu_trainer

HAS_CC = sys.platform in ("linux", "darwin") and native._compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the torch path runs")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A native module that has not tried to build yet, with its cache in ``tmp_path``."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "enabled", True)
    return tmp_path / "cache"


@needs_cc
def test_the_kernel_builds_once_into_the_cache_and_is_reused(fresh, monkeypatch):
    compiles = []
    run = subprocess.run
    monkeypatch.setattr(
        native.subprocess,
        "run",
        lambda cmd, **kw: (compiles.append(cmd) if "-shared" in cmd else None) or run(cmd, **kw),
    )
    assert native.status() == "native"
    assert native.library() is not None
    built = list(fresh.glob("kernel-*.so"))
    assert len(built) == 1 and len(compiles) == 1
    assert list(fresh.iterdir()) == built  # no temporary file left beside it
    monkeypatch.setattr(native, "_status", None)  # a new process: the cached build is loaded, not compiled again
    monkeypatch.setattr(native, "_library", None)
    assert native.status() == "native" and len(compiles) == 1


def test_the_switch_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.library() is None
    assert native.status() == f"off ({native.ENV_SWITCH}=0)"
    assert not fresh.exists()  # nothing compiled


def test_a_switch_value_that_means_nothing_is_refused(fresh, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "maybe")
    with pytest.raises(SGSCValueError, match=r"`\$LIGHTNING_SGSC_NATIVE` must be one of 1/0, on/off.*got 'maybe'"):
        native.library()
    monkeypatch.setenv(native.ENV_SWITCH, "On")  # any case
    assert not native.status().startswith("off")


def test_a_pickled_layout_comes_back_with_its_sizes():
    layout = pickle.loads(pickle.dumps(native.Layout([2, 3], [4, 5])))
    assert list(layout.rows) == [2, 3] and list(layout.cols) == [4, 5] and layout.numel == (8, 15)


def test_a_cc_that_names_nothing_is_reported_not_replaced(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.library() is None
    assert native.status() == "unavailable ($CC='no-such-compiler-here' is not a program on the PATH)"


def test_without_a_compiler_the_torch_path_runs_and_says_why(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert native.status() == "unavailable (no C compiler found (set $CC))"


@needs_cc
def test_a_failed_compile_is_reported_and_leaves_nothing_behind(fresh, monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    assert native.library() is None
    assert native.status().startswith("unavailable (") and "failed" in native.status()
    assert list(fresh.iterdir()) == []


def test_the_layout_refuses_tensors_of_another_size():
    layout = native.Layout([2, 3], [4, 5])
    with pytest.raises(RuntimeError, match="a tensor of 7 elements where 15 were planned"):
        layout.check([torch.zeros(2, 4), torch.zeros(7)])
    with pytest.raises(RuntimeError, match="a tensor of 4 elements where 3 were planned"):
        layout.check([torch.zeros(2), torch.zeros(4)], per_channel=True)


def test_usable_takes_contiguous_float32_cpu_tensors_only():
    assert native.usable([torch.zeros(3, 4), torch.zeros(2, 2, 3, 3)])
    assert not native.usable([torch.zeros(3, 4).t()])
    assert not native.usable([torch.zeros(3, 4, dtype=torch.float64)])
    assert not native.usable([torch.zeros(3, 4, dtype=torch.bfloat16)])


def _torch_table(bits: torch.Tensor, exponent: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, _Steps]:
    effective = torch.relu(bits) * keep
    return effective, _Steps.of(effective, exponent)


@needs_cc
def test_the_kernel_computes_the_torch_paths_numbers(fresh):
    lib = native.library()
    assert lib is not None
    torch.manual_seed(0)
    shapes = [(5, 3, 3, 3), (7, 11), (4, 2, 5)]  # conv, linear, conv1d: channels are rows, the rest one row each
    weights = [torch.randn(s) * 0.05 for s in shapes]
    weights[1][0, :4] = torch.tensor([0.0, -0.0, 1e30, -1e30])  # zeros of both signs, far-clipped values
    rows = [s[0] for s in shapes]
    cols = [w[0].numel() for w in weights]
    c = sum(rows)
    bits = torch.rand(c) * 6.0 - 1.0  # some below zero
    bits[[0, 6, 13]] = torch.tensor([0.0, 1.0, 2.5])  # zero bits, one bit, fractional
    exponent = torch.randn(c) - 6.0
    exponent[1] = -5.0  # exact halves after scaling: the rounding is half-to-even
    weights[0][1].view(-1)[:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) * 2.0**-5
    keep = torch.ones(c)
    keep[[2, 9]] = 0.0  # pruned channels
    share = torch.rand(c)
    offsets = [0, *torch.tensor(rows).cumsum(0).tolist()]
    per_layer = [slice(offsets[i], offsets[i + 1]) for i in range(len(shapes))]
    layout = native.Layout(rows, cols)
    got, table, bpw = native.forward(
        lib, layout, [bits[s] for s in per_layer], [exponent[s] for s in per_layer], keep, share, weights
    )
    effective, steps = _torch_table(bits, exponent, keep)
    expected_table = torch.stack([*(v.reshape(-1) for v in steps), effective])
    assert torch.equal(table, expected_table)  # every per-channel factor bit for bit
    assert bpw.item() == pytest.approx(torch.dot(effective, share).item(), rel=1e-6)
    grads = [torch.randn(s) for s in shapes]
    needs = [True, False, True]
    grad_w, gb, ge = native.backward(lib, layout, weights, grads, needs, table, share, 0.25)
    for i, w in enumerate(weights):
        rows_i = steps.rows(offsets[i], offsets[i + 1])
        flat = w.reshape(w.shape[0], -1)
        expected = _quantize_forward(flat, rows_i).view(w.shape)
        assert torch.equal(got[i].view(torch.int32), expected.view(torch.int32))  # bit for bit, signs of 0 too
        ew, eb, ee = _quantize_backward(flat, grads[i].reshape(flat.shape), rows_i, (True, True, True))
        if needs[i]:
            assert torch.equal(grad_w[i], ew.view(w.shape))
        else:
            assert grad_w[i] is None
        eb = (eb + share[per_layer[i]] * 0.25) * effective[per_layer[i]].sign()
        torch.testing.assert_close(gb[per_layer[i]], eb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ge[per_layer[i]], ee, rtol=1e-5, atol=1e-6)


@needs_cc
def test_the_kernels_powers_of_two_are_the_torch_paths_for_many_exponents(fresh):
    """2^e comes from glibc's double exp2 in the kernel and from torch's float64 exp2 (vectorised) on the torch
    path, each rounded to float32 once: the same float32 for every one of 200,000 random bits and exponents."""
    lib = native.library()
    assert lib is not None
    torch.manual_seed(5)
    c = 200_000
    bits, exponent = torch.rand(c) * 18.0 - 1.0, torch.randn(c) * 8.0
    keep, share = torch.ones(c), torch.zeros(c)
    _, table, _ = native.forward(lib, native.Layout([c], [1]), [bits], [exponent], keep, share, [torch.zeros(c, 1)])
    effective, steps = _torch_table(bits, exponent, keep)
    assert torch.equal(table, torch.stack([*(v.reshape(-1) for v in steps), effective]))


def _run_fused(model: torch.nn.Module, upstream_t: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    bpw, q = fq.quantize_all()

    # transposed-then-back gradients are not contiguous: the native path must make them so, not misread them
    def grad_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape[::-1]).permute(*reversed(range(t.dim()))) if upstream_t else torch.randn_like(t)

    upstream = [grad_like(t) for t in q]
    torch.autograd.backward([bpw, *q], [torch.tensor(0.5), *upstream])
    return q, [p.grad for p in model.parameters() if p.grad is not None]


@needs_cc
@pytest.mark.parametrize("upstream_t", [False, True], ids=["contiguous", "strided_grads"])
def test_the_fused_quantizer_gives_the_same_results_on_either_path(fresh, monkeypatch, upstream_t):
    torch.manual_seed(3)
    model = TinyConvNet()
    quantize_(model, init_bits=4)
    with torch.no_grad():
        for _, m in quantized_layers(model):
            m.bits.uniform_(-1.0, 5.0)
    twin = copy.deepcopy(model)
    calls = []
    forward = native.forward
    monkeypatch.setattr(native, "forward", lambda *a: calls.append(1) or forward(*a))
    torch.manual_seed(4)
    q_native, g_native = _run_fused(model, upstream_t)
    assert calls == [1]
    native.enabled = False
    torch.manual_seed(4)
    q_torch, g_torch = _run_fused(twin, upstream_t)
    assert calls == [1]  # the second run took the torch path
    for a, b in zip(q_native, q_torch, strict=True):
        assert torch.equal(a, b)
    assert len(g_native) == len(g_torch)
    for a, b in zip(g_native, g_torch, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cc
def test_switched_off_between_forward_and_backward_the_torch_path_finishes_the_step(fresh, monkeypatch):
    torch.manual_seed(3)
    model = TinyConvNet()
    quantize_(model, init_bits=4)
    twin = copy.deepcopy(model)
    torch.manual_seed(4)
    _, expected = _run_fused(twin, upstream_t=False)  # on the kernel throughout
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    bpw, q = fq.quantize_all()  # forward on the kernel
    monkeypatch.setattr(native, "enabled", False)
    backward = native.backward
    monkeypatch.setattr(native, "backward", lambda *a: pytest.fail("the kernel ran after it was switched off"))
    torch.manual_seed(4)
    upstream = [torch.randn_like(t) for t in q]
    torch.autograd.backward([bpw, *q], [torch.tensor(0.5), *upstream])
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert backward is not native.backward and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cc
def test_a_weight_the_kernel_cannot_take_sends_the_step_down_the_torch_path(fresh, monkeypatch):
    model = TinyConvNet()
    quantize_(model, init_bits=4)
    layers = [m for _, m in quantized_layers(model)]
    layers[-1].weight = torch.nn.Parameter(torch.randn(layers[-1].weight.shape[::-1]).t())  # not contiguous
    monkeypatch.setattr(native, "forward", lambda *a: pytest.fail("the kernel was given a strided weight"))
    _, q = FusedQuantizer(layers).quantize_all()
    expected = layers[-1].quantized_weight()
    assert torch.equal(q[-1], expected)


def test_the_callback_says_which_kernel_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "status", lambda: "unavailable (for this test)")
    with caplog.at_level("INFO"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_size=0)], max_epochs=1).fit(TinyClassifier())
    assert "[sgsc] quantizer kernel: unavailable (for this test)" in caplog.text


def test_the_kernel_source_ships_with_the_package():
    assert native.SOURCE.is_file()
    assert "sgsc_forward" in native.SOURCE.read_text() and "sgsc_backward" in native.SOURCE.read_text()


def test_fused_module_uses_the_native_layout():
    torch.manual_seed(0)
    model = TinyConvNet()
    quantize_(model, init_bits=4)
    fq = FusedQuantizer([m for _, m in quantized_layers(model)])
    plan = fq._plan_on(torch.device("cpu"))
    assert isinstance(plan.layout, native.Layout)
    assert list(plan.layout.rows) == plan.channels
    assert list(plan.layout.cols) == [m.fan_in for m in fq._ordered]
