"""A good Lightning citizen: checkpoints that load anywhere, every optimizer and scheduler, other callbacks, non-finite
values stopped at the step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning, StochasticWeightAveraging

from lightning_sgsc import Budget, Quantization, SafetyGuidedQuantization, SGSCError
from lightning_sgsc.quant import quantized_layers
from tests.helpers.models import TinyClassifier, TinyConvNet, aggressive_callback, cpu_trainer

ROOT = Path(__file__).resolve().parents[1]


def _fit_and_save(tmp_path: Path, **callback: Any) -> tuple[TinyClassifier, Path]:
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.05)
    trainer = cpu_trainer(tmp_path, [aggressive_callback(**callback)], max_epochs=3)
    trainer.fit(model)
    ckpt = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, ckpt


# ------------------------------------------------------------------------------------------------ checkpoints


def test_a_checkpoint_loads_without_the_callback(tmp_path):
    model, ckpt = _fit_and_save(tmp_path)
    loaded = TinyClassifier.load_from_checkpoint(ckpt)  # how every Lightning user loads a model for inference
    x = torch.randn(5, 1, 8, 8)
    assert [n for n, _ in quantized_layers(loaded)] == ["net.features.0", "net.head"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    fresh = TinyClassifier()
    fresh.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])  # plain load_state_dict too
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_resuming_with_another_include_names_the_layers_that_differ(tmp_path):
    _, ckpt = _fit_and_save(tmp_path)
    cb = SafetyGuidedQuantization(include=["net.head"], preservation_size=0)
    with pytest.raises(SGSCError, match=r"The checkpoint quantizes \['net.features.0'\] that this model keeps float"):
        cpu_trainer(tmp_path, [cb], max_epochs=4).fit(TinyClassifier(lr=0.05), ckpt_path=ckpt)


def test_the_export_command_writes_the_file_and_the_onnx_file_from_a_checkpoint(tmp_path):
    _, ckpt = _fit_and_save(tmp_path)
    args = [sys.executable, "-m", "lightning_sgsc.cli", "export", str(ckpt), "--model"]
    args += ["tests.helpers.models.TinyClassifier", "--submodule", "net", "--out", str(tmp_path / "net.sgsc")]
    args += ["--onnx", str(tmp_path / "net.onnx"), "--input_shape", "2,1,8,8"]
    env = {"PYTHONPATH": str(ROOT), "PATH": ""}
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept/total" in run.stdout and "net.sgsc" in run.stdout  # the size table, and where the file went
    from lightning_sgsc import load_compressed

    loaded = load_compressed(tmp_path / "net.sgsc", TinyConvNet()).eval()
    trained = TinyClassifier.load_from_checkpoint(ckpt).net.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), trained(x)) and (tmp_path / "net.onnx").stat().st_size > 0


def test_a_size_table_is_printed_at_fit_end(tmp_path, capsys):
    cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_size=0)], max_epochs=1).fit(TinyClassifier())
    out = capsys.readouterr().out
    assert "kept/total" in out and "net.head" in out and "compression:" in out


# -------------------------------------------------------------------------------------- optimizers and schedulers


class GAN(TinyClassifier):
    """Two optimizers under manual optimisation: a "generator" (the conv features) and a "discriminator" (the head,
    AdamW with weight decay)."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        x, y = batch
        for opt in (g_opt, d_opt):
            loss = F.cross_entropy(self(x), y) + self.compression_loss()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        g = torch.optim.Adam(self.net.features.parameters(), lr=0.01)
        d = torch.optim.AdamW(self.net.head.parameters(), lr=0.002, weight_decay=0.01)
        return [g, d]


def test_with_two_optimizers_each_quantizer_lives_in_the_optimizer_of_its_layer_only(tmp_path):
    model = GAN()
    trainer = cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_size=0)], max_epochs=1)
    trainer.fit(model)
    g_opt, d_opt = trainer.optimizers
    conv, head = model.net.features[0], model.net.head

    def groups_of(opt: torch.optim.Optimizer, param: torch.Tensor) -> list[dict]:
        return [g for g in opt.param_groups if any(p is param for p in g["params"])]

    for layer, own, other in ((conv, g_opt, d_opt), (head, d_opt, g_opt)):
        for param in (layer.bits, layer.exponent):
            (group,) = groups_of(own, param)
            assert group["weight_decay"] == 0.0 and group["lr"] == 0.01 and group.get("sgsc_quantizer")
            assert not groups_of(other, param)  # stepped by one optimizer, decayed by none


def test_one_cycle_lr_scales_the_quantizer_group_like_the_users(tmp_path):
    lrs: list[tuple[float, float]] = []

    class OneCycle(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            user, quant = trainer.optimizers[0].param_groups
            lrs.append((user["lr"], quant["lr"]))

    cb = SafetyGuidedQuantization(quantization=Quantization(lr=0.01), preservation_size=0)
    cpu_trainer(tmp_path, [cb, Record()], max_epochs=2, limit_train_batches=6).fit(OneCycle())
    peak_user = max(u for u, _ in lrs)
    assert peak_user == pytest.approx(0.05, rel=0.05)
    for user, quant in lrs:  # the same schedule, peaking at quantizer_lr
        assert quant == pytest.approx(user * 0.01 / 0.05, rel=1e-6)


def test_reduce_lr_on_plateau_and_gradient_accumulation_work(tmp_path):
    class Plateau(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/acc"}}

    cb = SafetyGuidedQuantization(quantization=Quantization(lr=0.02), preservation_size=0)
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=4, accumulate_grad_batches=2, limit_train_batches=4)
    trainer.fit(Plateau())
    user, quant = trainer.optimizers[0].param_groups
    assert quant["lr"] / 0.02 == pytest.approx(user["lr"] / 0.1)  # reduced together


# ----------------------------------------------------------------------------------------- other callbacks


def test_model_pruning_beside_it_is_refused_at_setup_with_the_reason(tmp_path):
    trainer = cpu_trainer(tmp_path, [SafetyGuidedQuantization(), ModelPruning("l1_unstructured", amount=0.5)])
    with pytest.raises(SGSCError, match=r"ModelPruning.*both rewrite the weights"):
        trainer.fit(TinyClassifier())


def test_swa_checkpoint_and_early_stopping_on_sgsc_metrics_compose(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="sgsc/model_bytes", mode="min", save_top_k=1)
    stop = EarlyStopping(monitor="sgsc/model_bytes", mode="min", patience=1)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    cb = SafetyGuidedQuantization(bit_weight=0.5, preservation_size=0)
    trainer = cpu_trainer(tmp_path, [cb, saver, stop, swa], max_epochs=4, enable_checkpointing=True)
    model = TinyClassifier()
    trainer.fit(model)
    assert saver.best_model_path and Path(saver.best_model_path).exists()
    reloaded = TinyClassifier.load_from_checkpoint(saver.best_model_path)
    assert len(quantized_layers(reloaded)) == 2


# ---------------------------------------------------------------------------------------------- non-finite


class NaNAtStep(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step.__wrapped__(self, batch, batch_idx)  # the user's own loss
        return loss * float("nan") if self.global_step == 5 else loss


def test_a_nan_loss_at_step_5_ends_the_fit_with_an_error_naming_step_and_cause(tmp_path):
    cb = SafetyGuidedQuantization(preservation_size=0)
    with pytest.raises(SGSCError, match=r"step 5.*loss.*not finite|not finite.*loss.*step 5"):
        cpu_trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=4).fit(NaNAtStep())


def test_a_non_finite_weight_at_the_start_is_named_before_training(tmp_path):
    model = TinyClassifier()
    with torch.no_grad():
        model.net.head.weight[0, 0] = float("inf")
    with pytest.raises(SGSCError, match=r"net.head.weight.*not finite"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization()], max_epochs=1).fit(model)


def test_a_nan_bit_depth_during_training_is_named(tmp_path):
    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.head.bits[1] = float("nan")

    with pytest.raises(SGSCError, match=r"net.head.bits.*not finite"):
        cpu_trainer(tmp_path, [SafetyGuidedQuantization(preservation_size=0), Poison()], max_epochs=2).fit(
            TinyClassifier()
        )


# -------------------------------------------------------------------------------------------------- budgets


def test_a_misspelt_monitor_is_named_at_the_sanity_check_before_any_training(tmp_path):
    trained = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            trained.append(1)

    cb = SafetyGuidedQuantization(max_drop=0.01, monitor="val/accuracy", mode="max", preservation_size=0)
    trainer = cpu_trainer(tmp_path, [cb, Count()], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(SGSCError, match=r"`budget.monitor` must be a metric the validation loop logs"):
        trainer.fit(TinyClassifier())
    assert not trained


def test_a_budget_added_when_resuming_an_unbudgeted_checkpoint_starts_cleanly(tmp_path):
    _, ckpt = _fit_and_save(tmp_path)  # no budget
    budget = Budget(max_drop=0.5, monitor="val/acc", mode="max", reference_value=0.0, warmup_checks=0)
    cb = aggressive_callback(budget=budget)
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=6)
    trainer.fit(TinyClassifier(lr=0.05), ckpt_path=ckpt)
    assert cb.tracker is not None and len(cb.budget_history) == 3 and cb.tracker.best is not None


def _quantized_tiny() -> tuple[TinyClassifier, list]:
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(preservation_size=0)
    cb.setup(cpu_trainer(Path("."), [cb]), model, "fit")  # swaps the layers, as at the start of a fit
    return model, [layer for _, layer in quantized_layers(model)]


def test_the_per_step_check_names_a_non_finite_bit_gradient():
    from lightning_sgsc.callback import _check_finite_step

    model, layers = _quantized_tiny()
    for layer in layers:
        layer.bits.grad = torch.zeros_like(layer.bits)
    layers[-1].bits.grad[0] = float("inf")
    with pytest.raises(SGSCError, match=r"step 7 .*bits gradient is not finite"):
        _check_finite_step(model, layers, 7)


def test_the_per_step_check_does_not_stop_on_finite_values_whose_sum_overflows():
    from lightning_sgsc.callback import _check_finite_step

    model, layers = _quantized_tiny()
    for layer in layers:
        layer.bits.grad = torch.full_like(layer.bits, 3e38)  # finite, but their float32 sum is inf
    _check_finite_step(model, layers, 7)  # no culprit: no stop
