import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_sgsc import SGSCTypeError, dequantize_, quantize_
from lightning_sgsc.examples import FashionCNN
from lightning_sgsc.export import export_compressed, load_compressed
from lightning_sgsc.feedback import prune_channels_
from lightning_sgsc.prune import prune_zero_channels, pruned_copy
from tests.helpers.models import TinyMLP, TinyTransformer


def _zero(layer: nn.Module, rows: list[int], bias: bool = True) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if bias and layer.bias is not None:
            layer.bias[rows] = 0


def test_conv_to_conv_and_conv_to_flatten_to_linear():
    torch.manual_seed(0)
    model = FashionCNN().eval()
    _zero(model.conv1, [3, 5])
    _zero(model.conv2, [0, 10, 11])  # consumed through flatten by fc1 (49 inputs each)
    _zero(model.fc1, [7])
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    report = prune_zero_channels(model, x)
    assert report.removed == {"conv1": 2, "conv2": 3, "fc1": 1}
    assert (model.conv1.out_channels, model.conv2.in_channels, model.conv2.out_channels) == (30, 30, 61)
    assert model.fc1.in_features == 61 * 49 and model.fc2.in_features == 127
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_channels_with_a_bias_or_feeding_the_output_stay():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    _zero(model.body[0], [1], bias=False)  # weights zero, bias not: outputs a constant, not removable exactly
    _zero(model.body[0], [2])
    _zero(model.body[4], [0])  # an output logit
    x = torch.randn(5, 10)
    expected = model(x)
    report = prune_zero_channels(model, x)
    assert report.removed == {"body.0": 1}  # channel 2 only; channel 1 computes its bias, not zero
    assert report.kept_zero == {"body.4": 1}
    assert model.body[0].out_features == 15 and model.body[4].out_features == 3
    assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_transformer_mlp_units_go_and_the_residual_stream_stays():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    _zero(model.mlp[0], [0, 5, 9])
    _zero(model.proj, [2])  # a residual dimension: the embeddings write it too, so it must stay
    x = torch.randint(0, 11, (3, 8))
    expected = model(x)
    report = prune_zero_channels(model, x)
    assert report.removed == {"mlp.0": 3}
    assert model.mlp[0].out_features == 61 and model.mlp[2].in_features == 61
    assert report.kept_zero["proj"] == 1
    assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_end_to_end_trained_zeros_export_load_prune(tmp_path):
    torch.manual_seed(1)
    model = FashionCNN().eval()
    quantize_(model, init_bits=4)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:20] = True
    prune_channels_(model, {"conv2": mask})
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    export_compressed(model, tmp_path / "m.sgsc")
    small, report = pruned_copy(load_compressed(tmp_path / "m.sgsc", FashionCNN()), x)
    assert report.removed == {"conv2": 20} and small.conv2.out_channels == 44
    assert_close(small(x), expected, atol=1e-5, rtol=0)


def test_quantized_models_must_be_converted_first():
    model = TinyMLP()
    quantize_(model)
    with pytest.raises(SGSCTypeError, match=r"`model` must be a float model.*dequantize_\(model\)"):
        prune_zero_channels(model, torch.randn(2, 10))
    dequantize_(model)
    assert prune_zero_channels(model, torch.randn(2, 10)).removed == {}


def test_zero_qkv_rows_under_a_custom_head_reshape_stay_instead_of_breaking_the_model():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    _zero(model.qkv, [0, 16, 32])  # the same dimension of q, k and v in head 0: a reshape Torch-Pruning cannot fix
    _zero(model.mlp[0], [3])
    x = torch.randint(0, 11, (3, 8))
    expected = model(x)
    report = prune_zero_channels(model, x)
    assert report.removed == {"mlp.0": 1} and report.kept_zero["qkv"] == 3
    assert model.qkv.out_features == 48
    assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_attention_heads_with_zero_values_are_removed_whole():
    from lightning_sgsc.examples import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab_size=11, block_size=8, n_embd=16, n_head=4, n_layer=2).eval()
    block = model.blocks[0]
    _zero(block.qkv, list(range(32 + 4, 32 + 8)))  # the value rows of head 1 (head_dim 4, v starts at 2 * 16)
    _zero(block.qkv, list(range(32 + 12, 32 + 16)))  # and of head 3
    _zero(block.qkv, [0, 1])  # a couple of query rows of head 0: not a dead head, stays
    x = torch.randint(0, 11, (3, 8))
    expected = model(x)
    report = prune_zero_channels(model, x)
    assert report.heads_removed == {"blocks.0": 2}
    assert block.n_head == 2 and block.qkv.out_features == 24 and block.proj.in_features == 8
    assert model.blocks[1].n_head == 4
    assert report.params_after < report.params_before
    assert_close(model(x), expected, atol=1e-5, rtol=0)
