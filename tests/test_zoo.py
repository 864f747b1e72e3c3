"""The models users bring, end to end: fit with aggressive settings (zero-bit channels occur and are pruned) →
export → reload into a fresh instance (identical outputs) → physical pruning (outputs within 1e-5) → checkpoint
resume (bit-identical to an uninterrupted run)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_sgsc import (
    Feedback,
    Preservation,
    Quantization,
    SafetyGuidedQuantization,
    export_compressed,
    load_compressed,
    prune_zero_channels,
)
from lightning_sgsc.quant import quantized_layers
from tests.helpers.zoo import ZOO, ZooModule

AGGRESSIVE = dict(
    bit_weight=5.0,
    quantization=Quantization(init_bits=2, lr=2.0),  # one Adam step takes a 2-bit channel to 0 bits
    preservation=Preservation(size=8, fractions={"random": 1.0}, warmup_epochs=0),  # here: the model paths
    feedback=Feedback(threshold=10.0),  # never restore: zero-bit channels are pruned from the second check on
    seed=0,
)


def _fit(name: str, tmp_path, epochs: int, ckpt=None) -> tuple[ZooModule, SafetyGuidedQuantization, pl.Trainer]:
    torch.manual_seed(0)
    net, x, y, kind = ZOO[name]()
    module = ZooModule(net, x, y, kind)
    cb = SafetyGuidedQuantization(**AGGRESSIVE)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[cb],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ckpt_path=ckpt)
    return module, cb, trainer


@pytest.mark.parametrize("name", list(ZOO))
def test_fit_export_reload_prune_resume(name, tmp_path):
    module, cb, _ = _fit(name, tmp_path, epochs=2)
    pruned = sum(int(layer.pruned.sum()) for _, layer in quantized_layers(module))
    assert pruned > 0, "aggressive settings must drive channels to zero bits and prune them"
    net = module.net.eval()
    x = module.data.tensors[0][:4]
    with torch.no_grad():
        expected = net(x)

    path = tmp_path / f"{name}.sgsc"
    export_compressed(net, path)
    fresh, _, _, _ = ZOO[name]()
    loaded = load_compressed(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    report = prune_zero_channels(loaded, x)
    assert report.max_abs_diff <= 1e-5

    # resume: one epoch, a checkpoint, a fresh module and callback for the second epoch == two epochs straight
    _, _, half_trainer = _fit(name, tmp_path / "a", epochs=1)
    ckpt = tmp_path / "half.ckpt"
    half_trainer.save_checkpoint(ckpt)
    resumed, resumed_cb, _ = _fit(name, tmp_path / "b", epochs=2, ckpt=ckpt)
    straight = module.state_dict()
    again = resumed.state_dict()
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight), name
    assert resumed_cb.history == cb.history
