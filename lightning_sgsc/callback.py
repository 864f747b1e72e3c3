"""``SafetyGuidedQuantization``: the Lightning glue. Pure modules decide, this one applies and logs.

Hook by hook: ``setup`` swaps the layers for quantized twins (before the optimizer exists and before checkpoint weights
load) and attaches to the module's mixin; ``on_fit_start`` gives ``bits``/``exponent`` a param group of their own
(:mod:`.optim`); ``on_train_start``/``on_train_epoch_start``/``on_train_batch_start`` drive the preservation set
(:mod:`.preservation.lifecycle`) and the cool-down (:class:`.budget.CoolDown`); each training step, the mixin asks
:meth:`compression_terms`; ``on_validation_epoch_end`` (``on_train_epoch_end`` without validation) measures the
preservation set, asks :class:`.feedback.FeedbackPolicy` for a decision and carries it out; ``on_validation_end`` (the
epoch's metrics are logged by then) asks :class:`.budget.BudgetTracker` for a verdict on the budget and applies it.
The settings are the dataclasses of :mod:`.config`; :mod:`.settings` turns arguments into them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_sgsc.budget import PHASES, BudgetTracker, CoolDown, Verdict
from lightning_sgsc.config import Budget, Feedback, Losses, Preservation, Quantization, Schedule
from lightning_sgsc.errors import SGSCRuntimeError, SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.feedback import Action, FeedbackPolicy, apply_decision, mask_pruned_grads_, repair_
from lightning_sgsc.losses import l1_term, weighted_sum
from lightning_sgsc.mixin import SafetyGuidedMixin
from lightning_sgsc.norms import eval_mode
from lightning_sgsc.optim import assign_quantizer_groups
from lightning_sgsc.preservation.lifecycle import PreservationData, PreservationManager
from lightning_sgsc.preservation.set import PreservationSet
from lightning_sgsc.quant.fused import FusedQuantizer
from lightning_sgsc.quant.modules import QuantizedLayer, followers, quantized_layers, quantizer_parameters
from lightning_sgsc.quant.swap import quantize_, swap_report
from lightning_sgsc.settings import Settings, resolve_settings
from lightning_sgsc.signal import Direction
from lightning_sgsc.size import ModelSize, model_size, size_metrics


class SafetyGuidedQuantization(Callback):
    """Learns a bit depth and an exponent per output channel of every weight while the model trains.

    Settings come grouped, one dataclass per concern (each documents its fields: ``help(Budget)``), or a mapping of a
    group's fields (``budget={"max_drop": 0.01}``, as a config file gives it); the most used fields also as keyword
    shortcuts. A shortcut sets its field; setting a field both ways, to two values, is an error.

    Args:
        quantization: which weights get a quantizer and how it starts (:class:`~lightning_sgsc.Quantization`).
        losses: weights of the L1, size and preservation terms (:class:`~lightning_sgsc.Losses`).
        preservation: the preservation set and its term (:class:`~lightning_sgsc.Preservation`).
        feedback: the restore-and-prune loop (:class:`~lightning_sgsc.Feedback`).
        budget: a budget instead of a fixed size penalty, and the cool-down (:class:`~lightning_sgsc.Budget`).
        init_bits: shortcut for ``quantization.init_bits``.
        include: shortcut for ``quantization.include``.
        exclude: shortcut for ``quantization.exclude``.
        bit_weight: shortcut for ``losses.bit_weight``.
        preservation_size: shortcut for ``preservation.size``.
        preservation_data: shortcut for ``preservation.data``.
        max_drop: shortcut for ``budget.max_drop``.
        monitor: shortcut for ``budget.monitor``.
        mode: shortcut for ``budget.mode``.
        cooldown_fraction: shortcut for ``budget.cooldown_fraction``.
        seed: seed of every random choice the callback makes.

    Example::

        trainer = L.Trainer(callbacks=[SafetyGuidedQuantization(init_bits=8, bit_weight=0.02)])
        trainer = L.Trainer(callbacks=[SafetyGuidedQuantization(budget=Budget(max_drop=0.01, monitor="val/acc",
                                                                              mode="max"))])
        trainer.fit(model)   # model: class Net(SafetyGuidedMixin, L.LightningModule)
    """

    def __init__(
        self,
        quantization: Quantization = Quantization(),
        losses: Losses = Losses(),
        preservation: Preservation = Preservation(),
        feedback: Feedback = Feedback(),
        budget: Budget = Budget(),
        *,
        init_bits: float | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        bit_weight: Schedule | None = None,
        preservation_size: int | None = None,
        preservation_data: PreservationData | None = None,
        max_drop: float | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        cooldown_fraction: float | None = None,
        seed: int = 0,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        groups: dict[str, Any] = {"quantization": quantization, "losses": losses, "preservation": preservation}
        groups.update(feedback=feedback, budget=budget)
        shortcuts: dict[str, Any] = {"init_bits": init_bits, "include": include, "exclude": exclude}
        shortcuts.update(
            bit_weight=bit_weight, preservation_size=preservation_size, preservation_data=preservation_data
        )
        shortcuts.update(max_drop=max_drop, monitor=monitor, mode=mode, cooldown_fraction=cooldown_fraction)
        self.settings: Settings = resolve_settings(groups, shortcuts, deprecated)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SGSCTypeError(describe_rule("seed", "an integer", seed))
        self.preservation = PreservationManager(self.settings.preservation, seed)
        self.policy = FeedbackPolicy(self.settings.feedback)
        self.cooldown = CoolDown(self.settings.budget.cooldown_fraction)
        self.tracker: BudgetTracker | None = None  # made in `setup`, where the metric's direction is known
        self.history: list[dict[str, Any]] = []  # feedback events, newest last
        self.budget_history: list[dict[str, Any]] = []  # budget checks, newest last
        self.last_verdict: Verdict | None = None
        self.repaired = 0
        # the module's state and size as validation measured them, taken before the feedback changes the module (in
        # on_validation_epoch_end); the budget check reads the metric later (on_validation_end) and judges this state
        self._measured: tuple[dict[str, Tensor], ModelSize] | None = None
        self._pending_budget: dict[str, Any] | None = None  # a checkpoint's budget state read before `setup`
        self._layers: list[QuantizedLayer] = []
        self._fused = FusedQuantizer([])
        self._frozen = False  # the quantizer parameters are frozen for the cool-down
        self._feedback_epoch, self._any_pruned = -1, False
        self._checked_epoch: int | None = -1  # the last epoch whose feedback check ran (checkpointed)

    @property
    @override
    def state_key(self) -> str:
        """The class name: one such callback per Trainer, so the key needs no arguments (and survives changing one)."""
        return type(self).__qualname__

    @property
    def preservation_set(self) -> PreservationSet | None:
        """The preservation set in use (``None`` before it is built, or without one)."""
        return self.preservation.set

    # ------------------------------------------------------------------------------------------------ set up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SafetyGuidedMixin):
            raise SGSCTypeError(
                describe_rule("model", "a LightningModule that inherits SafetyGuidedMixin", type(pl_module).__name__)
                + " Declare it as `class Net(SafetyGuidedMixin, L.LightningModule)` so the loss terms are added."
            )
        callbacks = getattr(trainer, "callbacks", None) or []
        n = sum(isinstance(cb, SafetyGuidedQuantization) for cb in callbacks)
        if n > 1:
            raise SGSCRuntimeError(describe_rule("Trainer(callbacks=...)", "one SafetyGuidedQuantization", f"{n}"))
        from lightning.pytorch.callbacks import ModelPruning

        if any(isinstance(cb, ModelPruning) for cb in callbacks):
            raise SGSCRuntimeError(
                describe_rule("Trainer(callbacks=...)", "without ModelPruning beside SafetyGuidedQuantization", "both")
                + " ModelPruning and SafetyGuidedQuantization both rewrite the weights a layer computes with"
                " (a pruning mask and a quantizer on the same Parameter); SafetyGuidedQuantization prunes by itself:"
                " channels at zero bits, removed for good by the feedback loop and physically at export."
            )
        if not quantized_layers(pl_module):  # a second fit, or a model the user swapped: re-use, never swap twice
            q = self.settings.quantization
            quantize_(pl_module, q.init_bits, q.include, q.exclude, init_headroom=q.init_headroom)
            rank_zero_info(f"[sgsc] at {q.init_bits:g} bits, {swap_report(pl_module).summary()}")
        self._layers = [m for _, m in quantized_layers(pl_module)]
        self._fused = FusedQuantizer(
            self._layers, compile=self.settings.quantization.compile, followers=followers(pl_module)
        )
        self.policy.direction = self.preservation.direction(pl_module)
        self._make_tracker(pl_module)
        pl_module.attach_compression(self)

    def _make_tracker(self, pl_module: pl.LightningModule) -> None:
        budget = self.settings.budget
        if not budget.active or self.tracker is not None:
            return
        # the direction of the budget's metric: the user's `mode`, or the preservation metric's own
        direction = Direction(budget.mode) if budget.monitor is not None else self.preservation.direction(pl_module)
        self.tracker = BudgetTracker(budget, direction, float(self.settings.losses.bit_weight))  # type: ignore[arg-type]
        if self._pending_budget is not None:
            self.tracker.load_state_dict(self._pending_budget)
            self._pending_budget = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, SafetyGuidedMixin):
            pl_module.attach_compression(None)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Pruned masks are buffers: a checkpoint's load after `setup`, so read them here, not in `setup`.
        self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
        _check_finite_weights(pl_module)
        if trainer.optimizers:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            lr = self.settings.quantization.lr
            untrained = assign_quantizer_groups(trainer.optimizers, self._layers, lr, schedulers)
            if untrained:
                names = [n for n, m in quantized_layers(pl_module) if m in untrained]
                rank_zero_warn(f"[sgsc] no optimizer holds the weights of {names[:5]}: their bit depths do not train.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preservation.start(trainer, pl_module)
        self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit resumed from a checkpoint taken on an epoch's last batch skips that epoch's validation (Lightning
        does not run it again): the feedback check it would have made is made now, on the same weights. A budget on a
        logged metric cannot be caught up (there is no validation to read); one on the preservation metric is."""
        missed = trainer.current_epoch - 1
        every = trainer.check_val_every_n_epoch
        expected = every is None or (missed + 1) % every == 0 or not trainer.enable_validation
        done = self._checked_epoch  # from the checkpoint: the last epoch whose check ran (None: a 0.2 checkpoint)
        if self.preservation.set is None or done is None or missed < 0 or done >= missed or not expected:
            return
        rank_zero_info(f"[sgsc] resumed after epoch {missed}'s last batch: its feedback check runs now")
        self._feedback(trainer, pl_module, epoch=missed, log=False)
        if self.settings.budget.monitor is None:
            self._budget_check(trainer, pl_module, epoch=missed)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preservation.maybe_build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.preservation.note_batch(trainer, batch)
        if self.preservation.set is None:  # a fit resumed on an epoch's last batch starts the next without its hook
            self.preservation.maybe_build(trainer, pl_module)
        if self.cooldown.fraction and self.cooldown.starts_now(trainer.global_step, trainer.estimated_stepping_batches):
            if self.tracker is not None:
                self.tracker.start_over()  # only the cool-down's states, at their final precision, compete now
            rank_zero_info(f"[sgsc] cool-down from step {trainer.global_step}: size term off, bit depths frozen")
        if self.cooldown.active and not self._frozen:  # once per fit, also after a resume into the cool-down
            self._freeze_quantizers(pl_module, True)

    def _freeze_quantizers(self, pl_module: pl.LightningModule, frozen: bool) -> None:
        for param in quantizer_parameters(pl_module):
            param.requires_grad_(not frozen)
        self._frozen = frozen

    # ---------------------------------------------------------------------------------------------- loss terms

    def training_step_context(self) -> AbstractContextManager[Any]:
        """Entered by the mixin around one automatic-optimisation ``training_step`` and its compression terms: all
        layers are quantized once, in one fused pass, for every forward of the step."""
        return self._fused.step()

    def loss_weights(self, epoch: int) -> dict[str, float]:
        """The weights of the terms at ``epoch``: the settings' schedules, with the size term's weight the budget
        controller's while there is a budget (0 in its warm-up) and 0 in the cool-down."""
        weights = self.settings.losses.at(epoch, has_preservation=self.settings.preservation.enabled)
        if self.cooldown.active:
            return {**weights, "bits": 0.0}
        if self.tracker is not None:
            return {**weights, "bits": self.tracker.controller.weight}
        return weights

    def compression_terms(
        self, pl_module: SafetyGuidedMixin, base: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weighted sum, raw terms)`` for one training step, the sum added to ``base`` (the task loss) when given;
        called by the mixin."""
        weights = self.loss_weights(pl_module.current_epoch)  # type: ignore[attr-defined]
        terms: dict[str, Tensor] = {"bits": self._fused.bits_per_weight()}
        used = {"bits": weights["bits"]}
        if weights["l1"]:
            terms["l1"] = l1_term(self._layers)
            used["l1"] = weights["l1"]
        if weights["preservation"] and self.preservation.due(pl_module.global_step):  # type: ignore[attr-defined]
            terms["preservation"] = self.preservation.term(pl_module)
            used["preservation"] = weights["preservation"]
        return weighted_sum(terms, used, base), terms

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        _check_finite_step(pl_module, self._layers, trainer.global_step)
        if self._any_pruned:
            mask_pruned_grads_(self._layers)

    # ------------------------------------------------------------------------------------------------ feedback

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._feedback(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        if trainer.sanity_checking:  # a misspelt monitor fails here, before any training
            if self.tracker is not None:
                self._budget_signal(trainer)
            return
        self._budget_check(trainer, pl_module)  # the epoch's metrics are in callback_metrics

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation (when there is one) ran before this hook; without a validation loop, or with one that has no
        # batches, the feedback (and the budget) run here instead, once per epoch.
        no_validation = not trainer.enable_validation or sum(trainer.num_val_batches) == 0
        if no_validation and self._feedback_epoch != trainer.current_epoch:
            self._feedback(trainer, pl_module)
            self._budget_check(trainer, pl_module)

    def measure_preservation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The preservation metric of the model as it is now (:meth:`PreservationManager.metric`)."""
        return self.preservation.metric(trainer, pl_module, self.settings.preservation.recalibrate_norms)

    def _feedback(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None, log: bool = True
    ) -> None:
        """Measures the preservation set, asks the policy, carries its decision out and records it (as of ``epoch``,
        default the current one). In the cool-down the set is still measured (a budget on it judges the cool-down's
        states), and nothing is changed."""
        epoch = trainer.current_epoch if epoch is None else epoch
        self._feedback_epoch = self._checked_epoch = epoch
        if self.preservation.set is not None:
            metric = self.measure_preservation(trainer, pl_module)
            violated = self.last_verdict is not None and self.last_verdict.violated
            decision = self.policy.decide(
                metric, self.preservation.noise, may_prune=not violated, may_act=not self.cooldown.active
            )
            if not math.isfinite(metric):
                rank_zero_warn(f"[sgsc] preservation metric is {metric}; skipping restore/prune this time.")
            config = self.settings.feedback
            # only this epoch's check may read the copy: one left by a feedback whose check never ran is dropped here
            acts = self.tracker is not None and decision.action is not Action.SKIP
            self._measured = (_state_copy(pl_module), model_size(pl_module)) if acts else None
            with eval_mode(pl_module):
                scores = lambda: self._restore_scores(trainer, pl_module, config.restore_bits)  # noqa: E731
                event = apply_decision(pl_module, decision, config, scores, list(trainer.optimizers))
                if event.restored or event.kept_alive:
                    self._recalibrate(pl_module)
            self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
            event = dataclasses.replace(event, epoch=epoch, step=trainer.global_step)
            self.history = [*self.history, event.as_dict()][-config.max_history :]
            if log:
                pl_module.log_dict({f"sgsc/{k}": float(v) for k, v in event.metrics().items()})
        if log:
            pl_module.log_dict(size_metrics(model_size(pl_module)))

    def _recalibrate(self, pl_module: pl.LightningModule) -> None:
        """New BatchNorm statistics after precision came back: a channel restored from zero bits had a variance of
        ~0 when the statistics were taken, and BatchNorm would scale its returning output by ~1/sqrt(eps)."""
        if self.settings.preservation.recalibrate_norms:
            self.preservation.recalibrate(pl_module)

    def _restore_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, bits: float) -> dict[str, Tensor]:
        """Rank 0's restore scores at ``bits`` on every rank (a last-bit difference can never split the ranks)."""
        return trainer.strategy.broadcast(self.preservation.restore_scores(pl_module, bits), src=0)

    # -------------------------------------------------------------------------------------------------- budget

    def _budget_signal(self, trainer: pl.Trainer, epoch: int | None = None) -> float | None:
        """This check's value of the budget's metric: ``monitor`` from the logged metrics, or the preservation metric
        measured at this epoch (``None`` when there is none yet)."""
        monitor = self.settings.budget.monitor
        if monitor is None:
            if not self.history or self.history[-1]["epoch"] != (trainer.current_epoch if epoch is None else epoch):
                return None
            return float(self.history[-1]["metric"])
        if monitor not in trainer.callback_metrics:
            logged = sorted(k for k in trainer.callback_metrics if not k.startswith("sgsc/"))
            raise SGSCValueError(
                describe_rule("budget.monitor", f"a metric the validation loop logs ({logged})", monitor)
            )
        return float(trainer.strategy.broadcast(float(trainer.callback_metrics[monitor]), src=0))

    def _budget_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None) -> None:
        """One budget check: ask the tracker for a verdict, then apply it (keep the state it names, repair precision
        over the budget) and log it. The state judged is the one validation measured: taken before the feedback acted,
        when it did."""
        measured, self._measured = self._measured, None
        if self.tracker is None:
            return
        value = self._budget_signal(trainer, epoch)
        if value is None:
            return
        state, size = measured if measured is not None else (None, model_size(pl_module))
        steer = not self.cooldown.active
        total = trainer.estimated_stepping_batches
        progress = trainer.global_step / total if 0 < total < float("inf") else None
        verdict = self.tracker.observe(
            value, size.total_bytes, size.bits_per_weight, trainer.global_step, steer, progress
        )
        if verdict.check.warming_up and not self.tracker.controller.warming_up:  # this check ended the warm-up
            reference = self.tracker.controller.reference.value
            rank_zero_info(f"[sgsc] budget reference {reference} fixed at step {trainer.global_step}; compressing")
        self.last_verdict = verdict
        if verdict.keep is not None:
            self.tracker.keep(verdict, state if state is not None else _state_copy(pl_module))
            if verdict.keep == "best":
                self._write_best_state(trainer)
        self.repaired = self._repair(trainer, pl_module) if verdict.violated and steer else 0
        entry = {**dataclasses.asdict(verdict.check), "step": trainer.global_step, "bytes": size.total_bytes}
        entry.update(repaired=self.repaired, cooling=self.cooldown.active)
        self.budget_history = [*self.budget_history, entry][-self.settings.feedback.max_history :]
        self._log_budget(trainer)

    def _repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Over the accuracy budget: precision back to the low-bit channels that cost the preservation set most
        (:func:`~lightning_sgsc.feedback.repair_`; needs the set)."""
        if self.preservation.set is None:
            return 0
        with eval_mode(pl_module):
            changed = repair_(
                pl_module, lambda bits: self._restore_scores(trainer, pl_module, bits), self.settings.feedback
            )
        if changed:
            self._recalibrate(pl_module)
        return changed

    def budget_metrics(self) -> dict[str, float]:
        """What the callback logs of the budget (under ``sgsc/``): the weight in force, the last check's slack, the
        channels repaired, the bytes of the best state kept, the phase (0 reference, 1 compress, 2 cool-down), the
        reference and the step it was fixed at (once it is)."""
        if self.tracker is None or self.last_verdict is None:
            return {}
        out = {
            "sgsc/bit_weight": self.loss_weights(0)["bits"] if self.cooldown.active else self.last_verdict.weight,
            "sgsc/budget_slack": self.last_verdict.check.slack,
            "sgsc/repaired_channels": float(self.repaired),
            "sgsc/phase": float(PHASES.index("cooldown" if self.cooldown.active else self.last_verdict.check.phase)),
        }
        reference = self.tracker.controller.reference.value
        if reference is not None:
            out["sgsc/reference"] = float(reference)
        if self.tracker.reference_step is not None:
            out["sgsc/reference_step"] = float(self.tracker.reference_step)
        if self.tracker.best is not None:
            out["sgsc/best_bytes"] = float(self.tracker.best["bytes"])
        return out

    def _log_budget(self, trainer: pl.Trainer) -> None:
        # `self.log` is not allowed in on_validation_end: the values go to the loggers at this step and into
        # callback_metrics (read by ModelCheckpoint/EarlyStopping, which run after)
        metrics = self.budget_metrics()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _write_best_state(self, trainer: pl.Trainer) -> None:
        """The best state within the budget to ``budget.best_state_path`` (rank zero; written whole, then renamed)."""
        path_setting = self.settings.budget.best_state_path
        if path_setting is None or not trainer.is_global_zero or self.tracker is None:
            return
        path = Path(trainer.default_root_dir) / path_setting  # an absolute path stays as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save({"state_dict": self.tracker.best_state, "sgsc_best": dict(self.tracker.best or {})}, partial)
        partial.replace(path)  # a crash mid-write never leaves a truncated file under the user's name

    def budget_summary(self) -> dict[str, Any] | None:
        """What a report needs of the budget: the reference, the state kept (or the closest seen), every check."""
        if self.tracker is None:
            return None
        ctl = self.tracker.controller
        return {
            "reference": ctl.reference.value,
            "reference_step": self.tracker.reference_step,
            "best": self.tracker.best,
            "closest": self.tracker.closest,
            "bit_weight": ctl.weight,
            "checks": list(self.budget_history),
        }

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bit depths trainable again; the best state within the budget into the module (``budget.keep_best``); the
        size table of what the module holds now (rank zero)."""
        self._freeze_quantizers(pl_module, False)
        self._hold_budget_state(pl_module)
        if trainer.is_global_zero:
            from lightning_sgsc.size import format_size_table

            print(
                f"[sgsc] the compressed model ({type(pl_module).__name__}):\n{format_size_table(model_size(pl_module))}"
            )

    def _hold_budget_state(self, pl_module: pl.LightningModule) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        keep = self.settings.budget.keep_best
        if tracker.best_state is not None:
            if keep:
                pl_module.load_state_dict(tracker.best_state)
                rank_zero_info(f"[sgsc] the module holds the smallest state within the budget: {tracker.best}")
            return
        held = keep and tracker.closest_state is not None
        if held:
            pl_module.load_state_dict(tracker.closest_state)  # type: ignore[arg-type]
        reason = tracker.why_none_met()
        rank_zero_warn(
            f"[sgsc] no state met the budget; the closest seen: {tracker.closest}"
            + ("; the module holds it." if held else "; the module keeps its last state.")
            + (f" Why: {reason}." if reason else "")
        )

    # ----------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "history": [dict(e) for e in self.history],
            "preservation": self.preservation.state_dict(),
            "checked_epoch": self._checked_epoch,
            "budget": {
                "tracker": self.tracker.state_dict() if self.tracker is not None else None,
                "cooling": self.cooldown.active,
                "last": dataclasses.asdict(self.last_verdict.check) if self.last_verdict is not None else None,
                "history": [dict(h) for h in self.budget_history],
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lightning_sgsc.budget import Check

        self.policy.load_state_dict(state_dict["policy"])
        self.history = [dict(e) for e in state_dict["history"]]
        self._checked_epoch = state_dict.get("checked_epoch")
        legacy = {k[13:]: v for k, v in state_dict.items() if k.startswith("preservation_")}  # written by 0.1
        self.preservation.load_state_dict(state_dict.get("preservation", legacy))
        budget = state_dict.get("budget") or {}
        self.cooldown.load_state_dict({"active": budget.get("cooling", False)})
        self.last_verdict = Verdict(Check(**budget["last"])) if budget.get("last") else None
        self.budget_history = [dict(h) for h in budget.get("history", [])]
        tracker_state = budget.get("tracker")
        if tracker_state is not None and self.settings.budget.active:
            if self.tracker is not None:
                self.tracker.load_state_dict(tracker_state)
            else:
                self._pending_budget = tracker_state


def _check_finite_weights(pl_module: pl.LightningModule) -> None:
    """Refuses a model whose parameters are not all finite, before training (a NaN would reach the set's k-means)."""
    for name, param in pl_module.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise SGSCRuntimeError(
                describe_rule(f"the parameter {name!r}", "finite at the start of the fit", "not finite")
                + " Check the initialisation or the checkpoint it came from."
            )


def _check_finite_step(pl_module: pl.LightningModule, layers: list[QuantizedLayer], step: int) -> None:
    """Stops the fit at the step where a bit depth, an exponent, the loss or their gradients stop being finite (the
    most specific cause named first): never fed to the feedback loop, the budget or a file.

    Every step pays one fused reduction (one device sync): the per-tensor search that names the cause runs only when
    the sum of every checked tensor is not finite (a sum of finite values that overflows finds no culprit: no stop).
    """
    loss = pl_module.__dict__.get("_sgsc_last_loss")
    checked = [t for layer in layers for p in (layer.bits, layer.exponent) for t in (p, p.grad) if t is not None]
    if isinstance(loss, Tensor):
        checked.append(loss.detach())
    if not checked:
        return
    if bool(torch.isfinite(torch.cat([t.detach().reshape(-1).float() for t in checked]).sum())):
        return
    names = {id(m): n for n, m in pl_module.named_modules()}
    advice = " Lower the learning rates (`quantization.lr` for the bit depths), clip gradients, or resume from the last"
    advice += " finite checkpoint."
    for attr in ("data", "grad"):
        for layer in layers:
            for kind in ("bits", "exponent"):
                value = getattr(getattr(layer, kind), attr)
                if value is not None and not bool(torch.isfinite(value).all()):
                    what = f"{names.get(id(layer), '?')}.{kind}" + (" gradient" if attr == "grad" else "")
                    raise SGSCRuntimeError(
                        f"At step {step} {what} is not finite: the fit stops before the optimizer step." + advice
                    )
        if attr == "data" and isinstance(loss, Tensor) and not bool(torch.isfinite(loss)):
            raise SGSCRuntimeError(
                f"At step {step} the training loss is not finite ({float(loss)}): the fit stops before the optimizer"
                " moves any weight." + advice
            )


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of the module's state on the CPU (a state the budget may keep)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
