import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_sgsc import SGSCTypeError, SGSCValueError
from lightning_sgsc.quant import QuantConv1d, QuantConv2d, QuantLinear

LAYERS = [
    (lambda: nn.Linear(12, 5), QuantLinear, (7, 12)),
    (lambda: nn.Conv1d(3, 5, 3, padding=1), QuantConv1d, (2, 3, 9)),
    (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), QuantConv2d, (2, 3, 9, 9)),
]


@pytest.mark.parametrize(("make", "twin_cls", "shape"), LAYERS)
def test_from_float_shares_parameters_and_starts_close(make, twin_cls, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    ref = layer(x)
    twin = twin_cls.from_float(layer, init_bits=8, init_headroom=0)
    assert isinstance(twin, type(layer)) and isinstance(twin, twin_cls)
    assert twin.weight is layer.weight and twin.bias is layer.bias  # shared, not copied
    assert twin.bits.shape == twin.exponent.shape == twin.pruned.shape == (5,)
    # Stated tolerance: at 8 bits every weight is within half a step (max|w|/254) of its float value, so the
    # output moves by well under 1 % of its scale.
    assert (twin(x) - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.parametrize(("make", "twin_cls", "shape"), LAYERS)
def test_to_float_round_trips(make, twin_cls, shape):
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(shape)
    ref = layer(x)
    twin = twin_cls.from_float(layer, init_bits=3)
    undone = twin.to_float(bake=False)
    assert type(undone) is type(layer) and undone.weight is layer.weight
    assert_close(undone(x), ref, atol=0, rtol=0)
    baked = twin.to_float(bake=True)
    assert type(baked) is type(layer) and not hasattr(baked, "bits")
    assert_close(baked(x), twin(x), atol=0, rtol=0)  # exactly what the twin computes


def test_twin_hooks_do_not_leak_into_the_replaced_layer():
    layer = nn.Linear(3, 2)
    twin = QuantLinear.from_float(layer)
    twin.register_forward_hook(lambda *a: None)
    assert len(layer._forward_hooks) == 0


def test_gradients_reach_weight_bits_and_exponent():
    torch.manual_seed(2)
    twin = QuantConv2d.from_float(nn.Conv2d(2, 4, 3), init_bits=2)
    with torch.no_grad():
        twin.exponent -= 1.0  # a finer step: the largest weights now clip, so the task loss reaches b
    twin(torch.randn(3, 2, 6, 6)).pow(2).sum().backward()
    for p in (twin.weight, twin.bits, twin.exponent):
        assert p.grad is not None and bool((p.grad != 0).any())


@pytest.mark.parametrize("bad", [1, 1.99, 17, -3, "8", None])
def test_init_bits_outside_2_to_16_is_an_error(bad):
    with pytest.raises(SGSCValueError, match=r"`init_bits` must be a number from 2 to 16, got"):
        QuantLinear.from_float(nn.Linear(2, 2), init_bits=bad)


@pytest.mark.parametrize(
    ("bits", "headroom", "top"), [(8, None, 32), (8, 0, 127), (8, 3, 16), (4, None, 2), (2, None, 1)]
)
def test_headroom_leaves_room_above_the_largest_weight(bits, headroom, top):
    # The largest |w| of each channel lands on (2^(b-1) - 1) / 2^headroom; the default headroom is 2 bits, or
    # init_bits - 2 when that is less, so a 2-bit start still maps its largest weights onto a nonzero integer.
    torch.manual_seed(4)
    twin = QuantLinear.from_float(nn.Linear(16, 6), init_bits=bits, init_headroom=headroom)
    largest = twin.integer_weight().abs().amax(dim=1)
    assert largest.tolist() == [top] * 6
    with torch.no_grad():
        twin.weight.mul_(3.0)  # weights that grew threefold: clipped without room, still exact with 2 bits of it
    clipped = bool((twin.integer_weight().abs() >= 2 ** (bits - 1) - 1).any())
    assert clipped == (top * 3 > 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bad", [-1, 6.5, "2", True])
def test_headroom_outside_0_to_init_bits_minus_2_is_an_error(bad):
    with pytest.raises(
        SGSCValueError, match=r"`init_headroom` must be a number from 0 to init_bits - 2 = 6 \(or None\), got"
    ):
        QuantLinear.from_float(nn.Linear(2, 2), init_bits=8, init_headroom=bad)


def test_from_float_refuses_other_types():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(SGSCTypeError, match=r"`module` must be an instance of Linear, got .*MyLinear"):
        QuantLinear.from_float(MyLinear(2, 2))
