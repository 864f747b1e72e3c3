"""Bad input across the public surface, one `pytest.raises(match=...)` each.

Constructor arguments of the callback are in test_config.py; quantizer, swap, export and preservation-builder
arguments next to their modules. Here: the ways a whole setup can be wrong.
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_sgsc import (
    AlreadyQuantizedError,
    Feedback,
    Preservation,
    SafetyGuidedQuantization,
    SGSCRuntimeError,
    SGSCTypeError,
    SGSCValueError,
    quantize_,
)
from lightning_sgsc.export import CompressedFormatError, export_compressed, load_compressed
from tests.helpers.models import TinyClassifier, TinyConvNet, cpu_trainer


class NoMixin(pl.LightningModule):  # complete for Lightning, but without SafetyGuidedMixin
    def __init__(self):
        super().__init__()
        self.net = TinyConvNet()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return TinyClassifier().train_dataloader()


def test_callback_without_the_mixin(tmp_path):
    with pytest.raises(SGSCTypeError, match=r"`model` must be a LightningModule that inherits SafetyGuidedMixin"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization()]).fit(NoMixin())


def test_mixin_without_the_callback_is_documented_as_a_float_run(tmp_path):
    model = TinyClassifier()  # documented: the mixin does nothing without the callback
    cpu_trainer(tmp_path, [], max_epochs=1).fit(model)
    with pytest.raises(SGSCRuntimeError, match=r"`compression_loss\(\)` needs the SafetyGuidedQuantization callback"):
        model.compression_loss()


class ManualForgets(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimisation_without_the_explicit_call(tmp_path):
    with pytest.raises(SGSCRuntimeError, match=r"Manual optimization: the compression terms were not added"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization()], max_epochs=1).fit(ManualForgets())


def test_unknown_strategy_name():
    with pytest.raises(SGSCValueError, match=r"`preservation.fractions` must be keys among .* got 'entropy'"):
        SafetyGuidedQuantization(preservation=Preservation(fractions={"entropy": 1.0}))


def test_preservation_set_that_does_not_fit_the_model(tmp_path):
    wrong = torch.utils.data.TensorDataset(torch.randn(6, 3, 5, 5), torch.zeros(6).long())
    with pytest.raises(SGSCValueError, match=r"`preservation.data` must be examples the model's preservation_outputs"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_data=wrong)], max_epochs=1).fit(TinyClassifier())


def test_model_already_swapped():
    net = TinyConvNet()
    quantize_(net)
    with pytest.raises(AlreadyQuantizedError, match=r"`model` must be a float model with no quantized layers"):
        quantize_(net)


def test_export_of_an_unswapped_model(tmp_path):
    with pytest.raises(SGSCRuntimeError, match=r"`model` must be a model with quantized layers, got 'a float model'"):
        export_compressed(TinyConvNet(), tmp_path / "x.sgsc")


def test_loader_given_a_corrupt_file(tmp_path):
    net = TinyConvNet()
    quantize_(net)
    path = tmp_path / "m.sgsc"
    export_compressed(net, path)
    data = bytearray(path.read_bytes())
    data[10:30] = b"\xff" * 20  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedFormatError, match=r"`path` must be a readable safetensors file"):
        load_compressed(path, TinyConvNet())


def test_max_history_must_be_positive():
    with pytest.raises(SGSCValueError, match=r"`feedback.max_history` must be an integer >= 1, got 0\."):
        SafetyGuidedQuantization(feedback=Feedback(max_history=0))
