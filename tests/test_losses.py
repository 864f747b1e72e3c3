import torch
from torch.testing import assert_close

from lightning_sgsc import quantize_
from lightning_sgsc.losses import bits_per_weight, l1_term, weighted_sum
from tests.helpers.models import TinyConvNet


def test_bits_per_weight_is_the_weight_count_weighted_mean_and_reaches_every_b():
    net = TinyConvNet()
    quantize_(net, init_bits=8)
    conv, head = net.features[0], net.head
    with torch.no_grad():
        conv.bits[:] = torch.tensor([2.0, 4.0, -1.0, 6.0])  # a negative b counts as 0
    expected = ((2 + 4 + 0 + 6) * 9 + 8 * head.weight.numel()) / (conv.weight.numel() + head.weight.numel())
    value = bits_per_weight(net)
    assert_close(value, torch.tensor(expected))
    value.backward()
    assert_close(conv.bits.grad, torch.tensor([9.0, 9.0, 0.0, 9.0]) / 228)
    assert bool((head.bits.grad > 0).all())


def test_l1_is_the_mean_absolute_weight_over_kept_channels():
    net = TinyConvNet()
    quantize_(net)
    conv, head = net.features[0], net.head
    conv.pruned[1] = True
    kept = conv.weight.abs().sum() - conv.weight[1].abs().sum() + head.weight.abs().sum()
    assert_close(l1_term(net), kept / (conv.weight.numel() + head.weight.numel()))


def test_weighted_sum_skips_zero_weights():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(float("nan"))}
    assert_close(weighted_sum(terms, {"a": 0.5, "b": 0.0}), torch.tensor(1.0))


def test_weighted_sum_adds_onto_a_base_in_its_dtype():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}
    base = torch.tensor(1.0, dtype=torch.bfloat16)
    out = weighted_sum(terms, {"a": 0.5, "b": 0.25}, base)
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.tensor(3.0, dtype=torch.bfloat16))
