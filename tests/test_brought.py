"""The models users bring from Hugging Face and timm, and shapes the zoo lacks, compressed whole with the callback's
defaults: fit → export → identical reload → physical pruning → ONNX Runtime."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sgsc import (
    Feedback,
    Preservation,
    Quantization,
    SafetyGuidedQuantization,
    export_compressed,
    load_compressed,
    prune_zero_channels,
)
from lightning_sgsc.outputs import main_output
from lightning_sgsc.quant import quantized_layers, swap_report
from lightning_sgsc.quant.modules import all_twins
from tests.helpers.brought import BROUGHT, UserModule

pytest.importorskip("transformers")
pytest.importorskip("timm")


def _fit(name: str, tmp_path, callback: SafetyGuidedQuantization, epochs: int = 2):
    torch.manual_seed(0)
    net, x, y = BROUGHT[name]()
    module = UserModule(net, x, y)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
        num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(module)
    return module, x, [str(w.message) for w in seen if "[sgsc]" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROUGHT))
def test_a_fit_with_the_defaults_exports_reloads_prunes_and_runs_in_onnx_runtime(name, tmp_path):
    from lightning_sgsc import export_onnx

    cb = SafetyGuidedQuantization()  # the defaults, as a new user adds it
    module, x, _ = _fit(name, tmp_path, cb)
    assert cb.preservation_set is not None and len(cb.history) == 1  # built after the first epoch, measured once
    report = swap_report(module)
    assert report.float_share < 0.1, report.summary()  # every weight the model computes with is quantized
    net = module.net.eval()
    sample = x[:4]
    with torch.no_grad():
        expected = main_output(net(sample))
    path = tmp_path / f"{name}.sgsc"
    export_compressed(net, path)
    loaded = load_compressed(path, BROUGHT[name]()[0]).eval()
    with torch.no_grad():
        assert torch.equal(main_output(loaded(sample)), expected)
    assert prune_zero_channels(loaded, sample).max_abs_diff <= 1e-5
    onnx = export_onnx(net, sample, tmp_path / f"{name}.onnx")
    assert onnx.max_abs_diff <= 1e-4 and onnx.weight_types


def test_gpt2_quantizes_every_conv1d_projection_and_the_tied_embedding_once(tmp_path):
    from transformers.pytorch_utils import Conv1D

    cb = SafetyGuidedQuantization(preservation_size=0)
    module, x, _ = _fit("gpt2", tmp_path, cb, epochs=1)
    gpt = module.net
    conv1d = [n for n, m in gpt.named_modules() if isinstance(m, Conv1D)]
    twins = dict(all_twins(gpt))
    assert conv1d and all(n in twins for n in conv1d)  # every projection, its channels the weight's columns
    assert all(twins[n].channel_axis == 1 for n in conv1d)
    assert gpt.lm_head.bits is gpt.transformer.wte.bits  # one quantizer for the tied head and embedding
    names = [n for n, _ in quantized_layers(gpt)]
    assert "transformer.wte" in names and "lm_head" not in names  # counted and stored once
    path = tmp_path / "gpt2.sgsc"
    export_compressed(gpt.eval(), path)
    fresh = BROUGHT["gpt2"]()[0].eval()
    load_compressed(path, fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # reloaded tied
    with torch.no_grad():
        assert torch.equal(fresh(x[:3]).logits, gpt(x[:3]).logits)


def test_an_mlp_with_the_defaults_drops_grad_cam_at_setup_with_one_warning(tmp_path):
    cb = SafetyGuidedQuantization()
    _, _, messages = _fit("mlp", tmp_path, cb)
    dropped = [m for m in messages if "preservation strategies dropped" in m]
    assert len(dropped) == 1 and "'gradcam': the model has no Conv2d layer" in dropped[0]
    assert set(cb.preservation_set.chosen_by) == {"uncertainty", "kmeans"}


def test_a_bert_classifier_gets_the_built_in_set_as_text(tmp_path):
    cb = SafetyGuidedQuantization()
    _fit("bert", tmp_path, cb)
    assert cb.preservation.modality == "text"
    assert set(cb.preservation_set.chosen_by) == {"gradcam", "uncertainty", "kmeans"}  # saliency on the embeddings


def test_a_u_net_is_dense_and_gets_the_set_without_grad_cam(tmp_path):
    cb = SafetyGuidedQuantization()
    module, _, messages = _fit("unet", tmp_path, cb)
    assert cb.preservation.modality == "dense"
    assert any("Grad-CAM has no class score on dense outputs" in m for m in messages)
    assert isinstance(module.net.up, nn.ConvTranspose2d) and module.net.up in dict(all_twins(module)).values()


AGGRESSIVE = dict(
    bit_weight=5.0,
    quantization=Quantization(init_bits=2, lr=2.0),
    preservation=Preservation(size=8, fractions={"random": 1.0}, warmup_epochs=0),
    feedback=Feedback(threshold=10.0),
)


def test_zero_channels_of_depthwise_convolutions_are_removed(tmp_path):
    cb = SafetyGuidedQuantization(**AGGRESSIVE)
    module, x, _ = _fit("mobilenetv3_small_050", tmp_path, cb, epochs=3)
    path = tmp_path / "mnv3.sgsc"
    export_compressed(module.net.eval(), path)
    loaded = load_compressed(path, BROUGHT["mobilenetv3_small_050"]()[0]).eval()
    depthwise = {n for n, m in loaded.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    report = prune_zero_channels(loaded, x[:4])
    assert report.max_abs_diff <= 1e-5
    assert sum(c for n, c in report.removed.items() if n in depthwise) > 0, report.removed


def test_a_weight_normed_linear_is_quantized_and_loads_as_a_plain_linear(tmp_path):
    from torch.nn.utils.parametrizations import weight_norm

    from lightning_sgsc import quantize_

    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 3))
    assert quantize_(net, init_bits=4) == ["0", "2"]
    x = torch.randn(5, 6)
    out = net(x)
    out.sum().backward()  # gradients reach the weight-norm's own parameters through the quantizer
    assert net[0].parametrizations.weight.original1.grad is not None
    path = tmp_path / "wn.sgsc"
    export_compressed(net.eval(), path)
    skeleton = nn.Sequential(weight_norm(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 3))
    loaded = load_compressed(path, skeleton).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
