"""The callback and the mixin in a real CPU Trainer."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_sgsc import Feedback, Losses, Preservation, Quantization, SafetyGuidedQuantization, quantize_
from lightning_sgsc.losses import distillation_loss
from lightning_sgsc.quant import QuantConv2d, QuantLinear, quantized_layers
from lightning_sgsc.quant.modes import float_weights
from tests.helpers.models import TinyClassifier, blob_data, cpu_trainer


class Snapshot(Callback):
    """Records b and e of the conv twin before and after the first optimizer step."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and not self.before:
            conv = pl_module.net.features[0]
            self.before = {"bits": conv.bits.detach().clone(), "exponent": conv.exponent.detach().clone()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and not self.after:
            conv = pl_module.net.features[0]
            self.after = {"bits": conv.bits.detach().clone(), "exponent": conv.exponent.detach().clone()}


def test_layers_are_swapped_in_setup_and_b_e_get_their_own_param_group(tmp_path):
    model = TinyClassifier(weight_decay=0.3)
    snap = Snapshot()
    cb = SafetyGuidedQuantization(init_bits=4, bit_weight=0.5, quantization=Quantization(lr=0.05))
    trainer = cpu_trainer(tmp_path, [cb, snap], max_epochs=1, limit_train_batches=1)
    trainer.fit(model)
    assert isinstance(model.net.features[0], QuantConv2d) and isinstance(model.net.head, QuantLinear)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    qgroup = groups[1]
    assert qgroup["sgsc_quantizer"] and qgroup["weight_decay"] == 0.0 and qgroup["lr"] == 0.05
    assert qgroup["fused"] is True and not groups[0]["fused"]  # one kernel for all b/e; the user's group untouched
    qids = {id(p) for p in qgroup["params"]}
    assert qids == {id(p) for n, p in model.named_parameters() if n.endswith(("bits", "exponent"))}
    assert not qids & {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.3
    # b falls under the size penalty after one step (Adam moves it by ~lr), e moves too
    assert bool((snap.after["bits"] < snap.before["bits"]).all())
    assert not torch.equal(snap.after["exponent"], snap.before["exponent"])


@pytest.mark.parametrize(("headroom", "top"), [(None, 32), (0, 127), (3, 16)])
def test_the_swap_leaves_the_chosen_headroom(headroom, top):
    # The largest weight of every channel lands at (2^7 - 1) / 2^headroom: 2 bits of room by default at 8 bits.
    model = TinyClassifier()
    SafetyGuidedQuantization(init_bits=8, quantization=Quantization(init_headroom=headroom)).setup(None, model, "fit")  # type: ignore[arg-type]
    for _, layer in quantized_layers(model):
        assert layer.integer_weight().flatten(1).abs().amax(1).tolist() == [top] * layer.out_channels_


def test_adamw_weight_decay_does_not_touch_b_and_e(tmp_path):
    # No gradient reaches b or e (no size penalty, nothing clips at init, lr tiny): any change would be decay.
    model = TinyClassifier(lr=1e-9, weight_decay=1.0)
    snap = Snapshot()
    cb = SafetyGuidedQuantization(
        init_bits=8, bit_weight=0.0, losses=Losses(preservation_weight=0.0), quantization=Quantization(lr=1.0)
    )
    trainer = cpu_trainer(tmp_path, [cb, snap], max_epochs=1, limit_train_batches=1)
    trainer.fit(model)
    assert torch.equal(snap.after["bits"], snap.before["bits"])
    # the exponent gets (tiny) rounding-error gradient, but Adam's step is ~lr * sign, never a decay of e itself
    decayed = snap.before["exponent"] * (1 - 1.0 * 1.0)
    assert not torch.allclose(snap.after["exponent"], decayed)


@pytest.mark.parametrize("every_n", [1, 3])
def test_each_loss_term_is_logged_and_added(tmp_path, every_n):
    model = TinyClassifier()
    seen: list[dict[str, float]] = []

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            seen.append({**step, "total": float(outputs["loss"])})

    cb = SafetyGuidedQuantization(
        losses=Losses(l1_weight=0.1, preservation_weight=2.0),
        preservation=Preservation(warmup_epochs=0, every_n_steps=every_n),
        bit_weight=0.01,
    )
    trainer = cpu_trainer(tmp_path, [cb, Grab()], max_epochs=1, limit_train_batches=2, log_every_n_steps=1)
    trainer.fit(model)
    first, second = seen
    for key in ("train/loss_task", "train/loss_l1", "train/bits_per_weight", "train/loss_preservation"):
        assert key in first
    # On a due step the preservation term is added at its weight; on the others it is absent.
    expected = (
        first["train/loss_task"]
        + 0.1 * first["train/loss_l1"]
        + 0.01 * first["train/bits_per_weight"]
        + 2.0 * first["train/loss_preservation"]
    )
    assert first["total"] == pytest.approx(expected, rel=1e-5)
    assert first["train/bits_per_weight"] == pytest.approx(8.0, abs=0.05)
    without = second["train/loss_task"] + 0.1 * second["train/loss_l1"] + 0.01 * second["train/bits_per_weight"]
    if every_n == 1:
        assert second["total"] == pytest.approx(without + 2.0 * second["train/loss_preservation"], rel=1e-5)
    else:
        assert second["total"] == pytest.approx(without, rel=1e-5)


def test_loss_weights_follow_their_schedule_and_changes_made_during_the_fit(tmp_path):
    seen: list[tuple[int, float, float, float]] = []  # (epoch, task, bits, total)

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append(
                (
                    trainer.current_epoch,
                    float(m["train/loss_task"]),
                    float(m["train/bits_per_weight"]),
                    float(outputs["loss"]),
                )
            )
            if trainer.current_epoch == 1 and batch_idx == 0:  # new settings take effect on the next step
                cb.settings = dataclasses.replace(cb.settings, losses=Losses(bit_weight=0.5))

    cb = SafetyGuidedQuantization(bit_weight=lambda epoch: 0.01 * (epoch + 1), preservation_size=0)
    trainer = cpu_trainer(tmp_path, [cb, Grab()], max_epochs=2, limit_train_batches=2, log_every_n_steps=1)
    trainer.fit(TinyClassifier())
    weights = [0.01, 0.01, 0.02, 0.5]
    assert [epoch for epoch, *_ in seen] == [0, 0, 1, 1]
    for (_, task, bits, total), w in zip(seen, weights, strict=True):
        assert total == pytest.approx(task + w * bits, rel=1e-5)


def test_size_metrics_and_feedback_decisions_are_logged_every_validation(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(init_bits=4, preservation=Preservation(warmup_epochs=0))
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model)
    metrics = trainer.callback_metrics
    for key in (
        "sgsc/bits_per_weight",
        "sgsc/model_bytes",
        "sgsc/compression_ratio",
        "sgsc/zero_bit_channels",
        "sgsc/restored_channels",
        "sgsc/pruned_channels",
        "sgsc/kept_alive_channels",
        "sgsc/preservation_metric",
        "sgsc/bits/net.features.0",
        "sgsc/bits/net.head",
    ):
        assert key in metrics, key
    assert float(metrics["sgsc/compression_ratio"]) > 4  # 4-bit weights against float32
    assert [e["epoch"] for e in cb.history] == [0, 1]
    assert cb.history[0]["action"] == "skip"  # the first measurement only sets the reference
    assert cb.history[1]["action"] in ("prune", "restore")


def test_feedback_restores_when_the_preservation_metric_drops(tmp_path):
    model = TinyClassifier()

    class Sabotage(Callback):
        """Zeroes the head's bits after the first validation (validation runs before on_train_epoch_end)."""

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                with torch.no_grad():
                    pl_module.net.head.bits[:] = -1.0

    cb = SafetyGuidedQuantization(
        init_bits=8,
        bit_weight=0.0,
        feedback=Feedback(restore_fraction=1.0, restore_bits=4, threshold=0.05),
        preservation=Preservation(warmup_epochs=0),
    )
    trainer = cpu_trainer(tmp_path, [Sabotage(), cb], max_epochs=2, limit_train_batches=6)
    trainer.fit(model)
    first, second = cb.history
    assert first["action"] == "skip" and second["action"] == "restore"
    assert second["restored"] == 3 and second["zero_bit"] == 3
    assert model.net.head.bits.tolist() == [4.0, 4.0, 4.0]


def test_feedback_runs_at_train_epoch_end_without_a_validation_loop(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(preservation=Preservation(warmup_epochs=0))
    cpu_trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=0).fit(model)
    assert [e["epoch"] for e in cb.history] == [0, 1]


def test_callback_state_round_trips():
    cb = SafetyGuidedQuantization()
    cb.policy.reference.value = 0.8
    cb.history.append({"action": "prune", "epoch": 0})
    cb.preservation.indices = [3, 1]
    other = SafetyGuidedQuantization()
    other.load_state_dict(cb.state_dict())
    assert other.policy.reference.value == 0.8 and other.history == cb.history
    assert other.preservation.indices == [3, 1]


def test_fit_twice_reuses_the_swapped_model(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization()
    cpu_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    bits = model.net.head.bits.detach().clone()
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model)  # a second fit must neither re-swap nor fail
    assert len(quantized_layers(model)) == 2
    assert not torch.equal(model.net.head.bits, bits)
    assert sum(1 for g in trainer.optimizers[0].param_groups if g.get("sgsc_quantizer")) == 1


def test_checkpoint_resume_restores_quantizer_state(tmp_path):
    model = TinyClassifier()
    cb = SafetyGuidedQuantization(init_bits=6, bit_weight=0.5, preservation=Preservation(warmup_epochs=0))
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model)
    ckpt = tmp_path / "sgsc.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = TinyClassifier()  # float, not swapped: the callback swaps in setup, before the weights load
    cb2 = SafetyGuidedQuantization(init_bits=6, bit_weight=0.5)

    class Check(Callback):
        def on_train_start(self, trainer, pl_module):  # weights and callback state loaded, the set rebuilt
            self.bits = pl_module.net.head.bits.detach().clone()
            self.history, self.reference = [dict(e) for e in cb2.history], cb2.policy.reference.value
            self.indices, self.chosen_by = cb2.preservation_set.indices.tolist(), list(cb2.preservation_set.chosen_by)

    check = Check()
    cpu_trainer(tmp_path, [cb2, check], max_epochs=2, limit_train_batches=1).fit(fresh, ckpt_path=ckpt)
    assert torch.equal(check.bits, model.net.head.bits.detach())
    assert check.history == cb.history and check.reference == cb.policy.reference.value
    assert check.indices == cb.preservation_set.indices.tolist()  # same set, not re-scored
    assert check.chosen_by == cb.preservation_set.chosen_by


def test_mixin_without_callback_trains_a_plain_float_model(tmp_path):
    model = TinyClassifier()
    cpu_trainer(tmp_path, [], max_epochs=1).fit(model)
    assert quantized_layers(model) == []


class Manual(TinyClassifier):
    def __init__(self, call: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.call = call

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.call:
            loss = loss + self.compression_loss()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimisation_with_the_explicit_call(tmp_path):
    model = Manual(call=True)
    cb = SafetyGuidedQuantization(bit_weight=1.0)
    cpu_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    assert float(model.net.head.bits.max()) < 8.0


def test_a_model_swapped_by_the_user_is_reused_not_swapped_again(tmp_path):
    model = TinyClassifier()
    quantize_(model.net, init_bits=5)
    cb = SafetyGuidedQuantization(init_bits=8)
    cpu_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(model)
    assert [name for name, _ in quantized_layers(model)] == ["net.features.0", "net.head"]
    assert 4.0 < float(model.net.head.bits.mean()) <= 5.0  # the user's 5 bits, not re-swapped at 8


def test_user_preservation_dataset_is_used(tmp_path):
    data = blob_data(10, seed=7)
    cb = SafetyGuidedQuantization(preservation_data=data, preservation=Preservation(batch_size=4))
    cpu_trainer(tmp_path, [cb], max_epochs=1).fit(TinyClassifier())
    assert len(cb.preservation_set) == 10 and cb.preservation_set.indices.tolist() == list(range(10))


@pytest.mark.parametrize("kind", ["labels", "distill"])
def test_preservation_weight_lowers_the_preservation_loss(tmp_path, kind):
    # labels: the set's cross entropy; distill: how far the compressed outputs are from the float weights' outputs
    pset = blob_data(24, seed=5)  # examples the training data only approximates

    def final_loss(weight: float) -> float:
        torch.manual_seed(0)
        model = TinyClassifier()
        cb = SafetyGuidedQuantization(
            init_bits=3 if kind == "distill" else 8,  # coarse enough for the compressed outputs to differ
            preservation_data=pset,
            losses=Losses(preservation_weight=weight),
            preservation=Preservation(loss=kind, every_n_steps=1),
            feedback=Feedback(prune=False),
            bit_weight=0.0,
        )
        cpu_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=4).fit(model)
        x, y = pset.tensors
        with torch.no_grad():
            logits = model.eval()(x)
            if kind == "labels":
                return F.cross_entropy(logits, y).item()
            with float_weights(model):
                return distillation_loss(logits, model(x)).item()

    assert final_loss(5.0) < final_loss(0.0)


def test_the_set_is_scored_from_a_named_source_after_warm_up(tmp_path):
    source = blob_data(40, seed=9)
    cb = SafetyGuidedQuantization(
        preservation=Preservation(source=source, fractions={"uncertainty": 0.5, "kmeans": 0.5}, warmup_epochs=1),
        preservation_size=12,
    )
    trainer = cpu_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(TinyClassifier())
    assert len(cb.preservation_set) == 12 and max(cb.preservation.indices) < 40
    assert sorted(set(cb.preservation_set.chosen_by)) == ["kmeans", "uncertainty"]
    assert [e["epoch"] for e in cb.history] == [1]  # no set, no feedback during the warm-up epoch
    x, _ = cb.preservation_set.data
    assert torch.equal(x, source.tensors[0][cb.preservation_set.indices])


def test_preservation_every_n_steps(tmp_path):
    calls = []

    class Counting(TinyClassifier):
        def preservation_step(self, batch):
            calls.append(self.global_step)
            return super().preservation_step(batch)

    cb = SafetyGuidedQuantization(
        preservation=Preservation(warmup_epochs=0, every_n_steps=2, loss="labels"),
        feedback=Feedback(prune=False),
    )
    cpu_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=6, limit_val_batches=0).fit(Counting())
    training_calls = [s for s in calls if s is not None]
    assert training_calls[1:4] == [0, 2, 4]  # the first call is the set's shape check at set-up


@pytest.mark.parametrize(
    ("optimizer", "kwargs", "expected"),
    [
        (torch.optim.Adam, {}, {"fused": True, "foreach": None}),
        (torch.optim.SGD, {}, {"fused": True, "foreach": None}),
        (torch.optim.RMSprop, {}, {"foreach": True}),  # no fused kernel: the multi-tensor path
        (torch.optim.Adam, {"foreach": False}, {"fused": None, "foreach": False}),  # the user's choice is kept
        (torch.optim.Adam, {"fused": False}, {"fused": False, "foreach": True}),  # fused declined: multi-tensor
    ],
)
def test_the_b_e_group_gets_a_batched_update_unless_the_user_chose_one(optimizer, kwargs, expected):
    from lightning_sgsc.optim import _batched_update

    group = {k: v for k, v in optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs).defaults.items()}
    _batched_update(group, torch.device("cpu"))
    assert {k: group.get(k) for k in expected} == expected


class BatchedAt(TinyClassifier):
    """TinyClassifier whose training loader batches ``batch`` examples; records the size of each preservation batch
    of a training step (not the callback's 2-example check of the set, made in eval mode)."""

    def __init__(self, batch: int) -> None:
        super().__init__(n=160)  # three batches of 48
        self.batch = batch
        self.preservation_sizes: list[int] = []

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch, shuffle=True)

    def preservation_step(self, batch):
        if self.training:
            self.preservation_sizes.append(len(batch[0]))
        return super().preservation_step(batch)


@pytest.mark.parametrize(("train_batch", "given", "expected"), [(8, None, 8), (48, None, 32), (8, 5, 5), (48, 40, 40)])
def test_preservation_batches_follow_the_training_batch_up_to_32_unless_given(tmp_path, train_batch, given, expected):
    model = BatchedAt(train_batch)
    cb = SafetyGuidedQuantization(
        preservation=Preservation(
            loss="labels", batch_size=given, every_n_steps=1
        ),  # the batches preservation_step sees
        preservation_data=blob_data(120, seed=3),
    )
    cpu_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(model)
    assert model.preservation_sizes == [expected] * 3
    assert cb.preservation.effective_batch_size == expected


def test_a_second_fit_reads_its_own_training_batch(tmp_path):
    model = BatchedAt(8)
    cb = SafetyGuidedQuantization(
        preservation_data=blob_data(64, seed=3),
        preservation=Preservation(every_n_steps=1, loss="labels"),
    )
    cpu_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model)
    model.batch = 12
    cpu_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model)
    assert model.preservation_sizes == [8, 8, 12, 12]


def test_the_loaders_batch_size_wins_over_a_smaller_first_batch():
    # A fit resumed at an epoch's last batch starts on a partial batch; the loader says what the batches are.
    cb = SafetyGuidedQuantization(preservation_size=0, preservation_data=blob_data(8))
    trainer = SimpleNamespace(train_dataloader=torch.utils.data.DataLoader(blob_data(30), batch_size=24))
    cb.on_train_batch_start(trainer, None, (torch.zeros(6, 1, 8, 8), torch.zeros(6)), 0)  # type: ignore[arg-type]
    assert cb.preservation.effective_batch_size == 24


def test_a_training_batch_without_a_size_falls_back_to_32_with_a_warning():
    cb = SafetyGuidedQuantization(preservation_size=0, preservation_data=blob_data(8))
    trainer = SimpleNamespace(train_dataloader=None)
    with pytest.warns(UserWarning, match=r"no batch size found in the training batch; preservation batches of 32"):
        cb.on_train_batch_start(trainer, None, {"text": ["a", "b"]}, 0)  # type: ignore[arg-type]
    assert cb.preservation.effective_batch_size == 32


def test_a_checkpoint_written_by_0_2_resumes(tmp_path):
    # tests/data/sgsc-0.2.0-tiny.ckpt: TinyClassifier under the 0.2 callback (flat arguments, a budget with a
    # cool-down), 3 epochs; written by that release
    from lightning_sgsc import Budget
    from tests.helpers.models import aggressive_callback

    ckpt = Path(__file__).parent / "data" / "sgsc-0.2.0-tiny.ckpt"
    old = torch.load(ckpt, weights_only=False)["callbacks"]["SafetyGuidedQuantization"]
    assert "swapped_layers" in old  # the 0.2 layout
    budget = Budget(
        max_drop=0.5, monitor="val/acc", mode="max", reference_value=0.0, warmup_checks=0, cooldown_fraction=0.3
    )
    cb = aggressive_callback(budget=budget)
    module = TinyClassifier(lr=0.05)
    cpu_trainer(tmp_path, [cb], max_epochs=4).fit(module, ckpt_path=ckpt)
    assert cb.history[: len(old["history"])] == old["history"] and len(cb.history) == len(old["history"]) + 1
    assert cb.cooldown.active and cb.tracker is not None
    assert cb.tracker.controller.checks == old["budget"]["tracker"]["controller"]["checks"] + 1
