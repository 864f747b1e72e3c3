import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_sgsc import AlreadyQuantizedError, SGSCTypeError, SGSCValueError, dequantize_, quantize_
from lightning_sgsc.quant import QuantConv1d, QuantConv2d, QuantLinear, quantized_layers
from tests.helpers.models import TinyConv1dNet, TinyConvNet


def test_default_swaps_every_conv_and_linear_including_the_head():
    net = TinyConvNet()
    names = quantize_(net)
    assert names == ["features.0", "head"]
    assert isinstance(net.features[0], QuantConv2d) and isinstance(net.head, QuantLinear)
    net1d = TinyConv1dNet()
    quantize_(net1d)
    assert isinstance(net1d.conv, QuantConv1d)


def test_swap_keeps_the_parameters_an_optimizer_already_holds():
    net = TinyConvNet()
    before = {n: p for n, p in net.named_parameters()}
    quantize_(net)
    after = dict(net.named_parameters())
    for name, p in before.items():
        assert after[name] is p
    assert {"head.bits", "head.exponent", "features.0.bits", "features.0.exponent"} <= set(after)


def test_include_exclude_and_filter_fn():
    net = TinyConvNet()
    assert quantize_(net, include=["features.*"]) == ["features.0"]
    net = TinyConvNet()
    assert quantize_(net, exclude=["head"]) == ["features.0"]
    net = TinyConvNet()
    assert quantize_(net, filter_fn=lambda m, fqn: isinstance(m, nn.Linear)) == ["head"]


def test_unknown_pattern_names_the_pattern_and_lists_layers():
    with pytest.raises(
        SGSCValueError, match=r"`exclude` must be patterns .* got 'classifier'\. Layers: features.0, head"
    ):
        quantize_(TinyConvNet(), exclude=["classifier"])


def test_pattern_given_as_a_string_is_a_type_error():
    with pytest.raises(SGSCTypeError, match=r"`include` must be a list of fnmatch patterns"):
        quantize_(TinyConvNet(), include="head")


def test_no_quantizable_layer_is_an_error():
    with pytest.raises(SGSCValueError, match=r"`model` must be a model with at least one layer to quantize.*Supported"):
        quantize_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(SGSCValueError, match=r"Quantizable layers before include/exclude/filter_fn"):
        quantize_(TinyConvNet(), filter_fn=lambda m, fqn: False)


def test_swapping_twice_is_an_error():
    net = TinyConvNet()
    quantize_(net)
    with pytest.raises(AlreadyQuantizedError, match=r"`model` must be a float model with no quantized layers, got '2"):
        quantize_(net)


def test_dequantize_bakes_exactly_the_quantized_function():
    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=3)
    x = torch.randn(4, 1, 8, 8)
    expected = net(x)
    assert dequantize_(net) == ["features.0", "head"]
    assert quantized_layers(net) == []
    assert_close(net(x), expected, atol=0, rtol=0)


def test_a_transformer_encoder_layer_computes_with_the_quantized_weights_in_eval_mode_too():
    # its fused inference path reads linear1/linear2.weight directly; the twins switch it off
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    quantize_(layer, init_bits=3)
    layer.eval()
    baked = copy.deepcopy(layer)
    dequantize_(baked)  # plain Linear layers holding the quantized weights
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), baked(x))


def test_tied_weights_get_one_quantizer_shared_by_both_holders():
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    net[2].weight = net[0].weight  # a head tied to the embedding: one row per vocabulary entry in both
    assert quantize_(net) == ["0", "1", "2"]
    assert net[2].weight is net[0].weight and net[2].bits is net[0].bits and net[2].pruned is net[0].pruned
    assert [name for name, _ in quantized_layers(net)] == ["0", "1"]  # the tied weight once
    x = torch.randint(0, 10, (3, 4))
    with torch.no_grad():
        net[0].bits[3] = 0.0  # one vocabulary row at zero bits: gone from the embedding and the head alike
        out = net(x)
        assert torch.equal(net[0].quantized_weight()[3], torch.zeros(8))
        assert torch.equal(net[2].quantized_weight(), net[0].quantized_weight())
    assert out.shape == (3, 4, 10)


def test_holders_that_hold_a_tie_differently_stay_float_with_a_warning():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    net[1].weight = net[0].weight
    with pytest.warns(UserWarning, match=r"'0' shares its weight with \['1'\], which hold it differently or are not"):
        assert quantize_(net, exclude=["1"]) == ["2"]
    assert type(net[0]) is nn.Linear and net[1].weight is net[0].weight
