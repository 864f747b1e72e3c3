import torch
from torch.testing import assert_close

from lightning_sgsc import quantize_
from lightning_sgsc.losses import bits_per_weight, l1_term, weighted_sum
from lightning_sgsc.quant import quantized_layers
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


def test_the_distillation_term_is_zero_on_equal_outputs_and_positive_otherwise():
    from lightning_sgsc.losses import distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(6, 5, 7)  # tokens: (batch, positions, vocabulary)
    assert distillation_loss(teacher.clone(), teacher).item() == 0.0
    student = teacher + 0.3 * torch.randn_like(teacher)
    for t in (0.5, 1.0, 4.0):
        assert distillation_loss(student, teacher, temperature=t).item() > 0
    student.requires_grad_(True)
    distillation_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_a_model_whose_weights_quantize_exactly_has_a_zero_term():
    from lightning_sgsc.losses import distillation_loss
    from lightning_sgsc.quant.modes import float_weights

    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=8)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for _, layer in quantized_layers(net):  # weights on the quantization grid: quantizing changes nothing
            layer.weight.copy_(layer.quantized_weight())
        with float_weights(net):
            teacher = net(x)
        assert distillation_loss(net(x), teacher).item() == 0.0
        layer = net.head
        layer.bits.fill_(1.0)  # coarse: the compressed outputs move away from the float weights' outputs
        assert distillation_loss(net(x), teacher).item() > 0
