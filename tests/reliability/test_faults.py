"""Faults and odd runs: mixed precision, NaN metrics, empty validation, interrupts, a layer pruned to nothing."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from torch.testing import assert_close
from torch.utils.data import DataLoader

from lightning_sgsc import Preservation, Quantization, SafetyGuidedQuantization, quantize_
from lightning_sgsc.export import export_compressed, load_compressed
from lightning_sgsc.feedback import prune_channels_
from lightning_sgsc.prune import prune_zero_channels
from tests.helpers.models import TinyClassifier, TinyConvNet, cpu_trainer


def test_bf16_mixed_on_cpu_trains_and_exports_with_float32_quantizer_state(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(init_bits=4, bit_weight=0.5, preservation=Preservation(warmup_epochs=0))
    cpu_trainer(tmp_path, [cb], max_epochs=2, precision="bf16-mixed").fit(model)
    for layer in (model.net.features[0], model.net.head):
        assert layer.bits.dtype == layer.exponent.dtype == torch.float32
        assert torch.isfinite(layer.bits).all() and torch.isfinite(layer.weight).all()
    assert len(cb.history) == 2
    x = model.data.tensors[0][:8]
    export_compressed(model.net, tmp_path / "m.sgsc")
    loaded = load_compressed(tmp_path / "m.sgsc", TinyConvNet()).eval()
    assert_close(loaded(x), model.net.eval()(x), atol=0, rtol=0)


class NaNMetric(TinyClassifier):
    def preservation_evaluate(self, batches):
        return math.nan if self.current_epoch == 1 else super().preservation_evaluate(batches)


def test_a_nan_preservation_metric_skips_with_a_warning(tmp_path):
    model = NaNMetric()
    cb = SafetyGuidedQuantization(
        init_bits=2,
        bit_weight=5.0,
        quantization=Quantization(lr=0.5),
        preservation=Preservation(warmup_epochs=0, loss="labels"),
    )
    pruned_before = {}

    class Snapshot(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            pruned_before[trainer.current_epoch] = pl_module.net.head.pruned.clone()

    with pytest.warns(UserWarning, match=r"preservation metric is nan; skipping restore/prune"):
        cpu_trainer(tmp_path, [Snapshot(), cb], max_epochs=3).fit(model)
    assert [e["action"] for e in cb.history][1] == "skip"
    assert cb.history[1]["restored"] == cb.history[1]["pruned"] == 0
    assert cb.history[2]["reference"] == cb.history[0]["metric"]  # the NaN never became the reference


class EmptyValidation(TinyClassifier):
    def val_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))


def test_a_validation_loader_without_batches_still_gets_feedback(tmp_path):
    cb = SafetyGuidedQuantization(preservation=Preservation(warmup_epochs=0))
    cpu_trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=None).fit(EmptyValidation())
    assert [e["epoch"] for e in cb.history] == [0, 1]


class Interrupt(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_a_checkpoint_that_resumes(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(init_bits=4, bit_weight=0.5, preservation=Preservation(warmup_epochs=0))
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="interrupted")
    trainer = cpu_trainer(tmp_path, [cb, saver, Interrupt()], max_epochs=3, enable_checkpointing=True)
    with pytest.raises(SystemExit):  # Lightning 2.6: on_exception hooks (the checkpoint), then exit(1)
        trainer.fit(model)
    ckpt = tmp_path / "interrupted.ckpt"
    assert ckpt.exists()
    resumed = TinyClassifier()
    cb2 = SafetyGuidedQuantization(init_bits=4, bit_weight=0.5, preservation=Preservation(warmup_epochs=0))
    trainer = cpu_trainer(tmp_path, [cb2], max_epochs=3, enable_checkpointing=True)
    trainer.fit(resumed, ckpt_path=ckpt)
    assert trainer.current_epoch == 3 and len(cb2.history) == 3  # the interrupted epoch ran again after resuming
    assert cb2.history[0] == cb.history[0]


def test_a_layer_pruned_to_nothing_exports_and_prunes_without_shape_errors(tmp_path):
    torch.manual_seed(0)
    net = TinyConvNet().eval()
    quantize_(net)
    prune_channels_(net, {"features.0": torch.ones(4, dtype=torch.bool)})  # min_channels=0 allows this
    x = torch.randn(3, 1, 8, 8)
    expected = net(x)
    export_compressed(net, tmp_path / "m.sgsc")
    loaded = load_compressed(tmp_path / "m.sgsc", TinyConvNet()).eval()
    assert_close(loaded(x), expected, atol=0, rtol=0)
    report = prune_zero_channels(loaded, x)
    assert report.removed == {"features.0": 3} and loaded.features[0].out_channels == 1
    assert_close(loaded(x), expected, atol=1e-5, rtol=0)
