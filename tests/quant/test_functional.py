import pytest
import torch
from torch.testing import assert_close

from lightning_sgsc.quant.functional import init_exponent, pow2, quantize, quantize_int, required_bits


def reference_quantize(w, b, e):
    """Direct computation of the issue's formula: 2^e * clamp(round(2^-e w), -2^(b-1), 2^(b-1)-1)."""
    b = b.clamp_min(0).reshape(-1, *([1] * (w.dim() - 1)))
    e = e.reshape(-1, *([1] * (w.dim() - 1)))
    return 2.0**e * torch.clamp(torch.round(2.0**-e * w), -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1)


def ste_reference(w, b, e):
    """The paper's autograd formulation (clamp, then round through x + (round(x) - x).detach())."""
    b = b.clamp_min(0).reshape(-1, *([1] * (w.dim() - 1)))
    e = e.reshape(-1, *([1] * (w.dim() - 1)))
    x = torch.clamp(w * 2.0**-e, -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1)
    return 2.0**e * (x + (torch.round(x) - x).detach())


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3), (3, 2, 5)])
def test_matches_reference_exactly_for_integer_bits(shape):
    # For integer b >= 1 round-then-clamp (the formula as written) and clamp-then-round (ours) agree exactly.
    # At b = 0 only clamp-then-round gives the required exact zeros (round-then-clamp gives -0.5 * 2^e).
    torch.manual_seed(0)
    w = torch.randn(shape)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0])[: shape[0]]
    e = torch.tensor([-3.0, -2.0, -4.0, -1.5, -6.0])[: shape[0]]
    assert_close(quantize(w, b, e), reference_quantize(w, b, e), atol=0, rtol=0)


def test_fractional_bits_clamp_then_round_stays_integer_and_in_range():
    # With a fractional b the bounds are not integers; clamping first keeps every value an integer in the range.
    torch.manual_seed(1)
    w = 10 * torch.randn(3, 50)
    b = torch.tensor([2.5, 3.2, 0.4])
    e = torch.zeros(3)
    q = quantize(w, b, e)
    assert torch.equal(q, q.round())
    half = 2.0 ** (b - 1)
    assert bool((q >= torch.round(-half)[:, None]).all()) and bool((q <= torch.round(half - 1)[:, None]).all())


def _gradients_match_ste(w, b, e):
    """Backpropagates the same upstream gradient through ours and the paper's STE; returns ours (w, b, e grads)."""
    g = torch.randn(w.shape)
    (quantize(w, b, e) * g).sum().backward()
    ours = (w.grad.clone(), b.grad.clone(), e.grad.clone())
    for t in (w, b, e):
        t.grad = None
    (ste_reference(w, b, e) * g).sum().backward()
    for a, r in zip(ours, (w.grad, b.grad, e.grad), strict=True):
        assert_close(a, r, atol=1e-5, rtol=1e-5)
    return ours


def test_gradients_match_the_paper_ste_formulation():
    torch.manual_seed(2)
    w = (3 * torch.randn(4, 3, 3, 3)).requires_grad_()
    b = torch.tensor([2.0, 3.5, 5.0, 1.2], requires_grad=True)
    e = torch.tensor([-1.0, -0.5, -2.0, 0.3], requires_grad=True)
    ours = _gradients_match_ste(w, b, e)
    assert bool((ours[1] != 0).all()), "every channel clips here, so every b receives gradient"


def test_zero_bits_give_exact_zeros_and_pruned_channels_pass_no_gradient():
    w = torch.randn(3, 10)
    b = torch.tensor([0.0, -2.0, 4.0], requires_grad=True)
    e = torch.full((3,), -2.0)
    q = quantize(w, b, e)
    assert torch.equal(q[:2], torch.zeros(2, 10))
    assert bool((q[2] != 0).any())
    pruned = torch.tensor([False, False, True])
    q = quantize(w, b, e, pruned)
    assert torch.equal(q[2], torch.zeros(10))
    (q * torch.randn(3, 10)).sum().backward()
    assert b.grad[2] == 0 and b.grad[1] == 0  # pruned; negative b (below the floor at 0)


def test_integer_form_reproduces_quantize_bit_for_bit():
    torch.manual_seed(3)
    w = torch.randn(6, 4, 3, 3)
    b = torch.tensor([0.0, 1.0, 2.7, 4.0, 8.0, 16.0])
    e = torch.tensor([-5.0, -2.0, -3.3, -4.0, -7.1, -14.0])
    q_int = quantize_int(w, b, e)
    assert q_int.dtype == torch.int32
    assert_close(pow2(e)[:, None, None, None] * q_int, quantize(w, b, e), atol=0, rtol=0)


def test_required_bits_matches_python_bit_length():
    torch.manual_seed(4)
    q = torch.randint(-300, 300, (40, 7), dtype=torch.int32)
    q[0] = 0
    q[1] = torch.tensor([0, -1, 0, -1, 0, 0, -1])
    expected = []
    for row in q.tolist():
        need = 0
        for v in row:
            need = max(need, (v.bit_length() + 1) if v > 0 else ((-v - 1).bit_length() + 1) if v < 0 else 0)
        expected.append(need)
    assert required_bits(q).tolist() == expected
    assert expected[0] == 0 and expected[1] == 1


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_init_exponent_clips_nothing(bits):
    torch.manual_seed(5)
    w = torch.randn(8, 20) * torch.logspace(-3, 1, 8)[:, None]
    e = init_exponent(w, bits)
    q = quantize(w, torch.full((8,), float(bits)), e)
    step = torch.exp2(e)[:, None]
    assert bool(((q - w).abs() <= step / 2 + 1e-6 * w.abs()).all())  # rounding error only, nothing clipped


def test_backward_keeps_no_weight_sized_tensor_but_the_weight():
    # Memory: the forward saves the weight and per-channel vectors only; x = 2^-e w and its rounding are recomputed
    # in the backward instead of being held from the forward to the backward.
    w = torch.randn(64, 3, 5, 5, requires_grad=True)
    b = torch.full((64,), 4.0, requires_grad=True)
    e = torch.full((64,), -3.0, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q = quantize(w, b, e)
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()
    q.sum().backward()
    assert w.grad is not None and b.grad is not None and e.grad is not None


def test_gradients_of_a_one_dimensional_weight_are_per_element():
    torch.manual_seed(3)
    w = (3 * torch.randn(6)).requires_grad_()
    b = torch.tensor([2.0, 3.0, 1.5, 4.0, 2.0, 0.5], requires_grad=True)
    e = torch.tensor([-1.0, 0.0, -0.5, -2.0, 1.0, -1.0], requires_grad=True)
    _gradients_match_ste(w, b, e)


def test_a_channels_step_does_not_depend_on_the_vector_it_is_computed_in():
    # The fused quantizer computes 2^e over all layers' channels at once, a layer computes it over its own: the
    # two must agree bit for bit. torch's float32 exp2 differs between its vector and scalar (tail) kernels.
    torch.manual_seed(6)
    e = 4 * torch.randn(4099) - 3
    whole = pow2(e)
    pieces = torch.cat([pow2(part) for part in e.split(7)])  # 7: mostly tail elements
    assert torch.equal(whole, pieces)
    assert torch.equal(whole, torch.exp2(e.double()).float())


def test_learned_bit_depths_are_bounded_at_16_by_construction(tmp_path):
    from lightning_sgsc import export_compressed, load_compressed, quantize_
    from tests.helpers.models import TinyConvNet

    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=8)
    with torch.no_grad():
        net.head.bits.fill_(24.0)  # as an optimizer could move it, with a step fine enough to use them all
        net.head.exponent.fill_(-30.0)
    export_compressed(net, tmp_path / "net.sgsc")
    loaded = load_compressed(tmp_path / "net.sgsc", TinyConvNet())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), net.eval()(x))
