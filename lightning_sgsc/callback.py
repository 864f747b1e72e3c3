"""``SafetyGuidedQuantization``: Lightning glue for the quantizer, the loss terms and the feedback loop.

Hook by hook: ``setup`` swaps Conv/Linear layers for quantized twins (before the optimizer exists and before
checkpoint weights load) and attaches to the module's mixin; ``on_fit_start`` gives ``bits``/``exponent`` a param
group of their own (:mod:`.optim`); ``on_train_start``/``on_train_epoch_start``/``on_train_batch_start`` drive the
preservation set (:mod:`.preservation.lifecycle`); each training step, the mixin asks :meth:`compression_terms`;
``on_validation_epoch_end`` (``on_train_epoch_end`` without validation) measures the preservation set, restores or
prunes (:mod:`.feedback`) and logs size metrics; ``on_validation_end`` (the epoch's metrics logged by then) steers the
size penalty to a budget and keeps the best state within it (:mod:`.budget_hooks`, with a budget only).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_sgsc.budget_hooks import BudgetHooks
from lightning_sgsc.config import FeedbackConfig, LossWeights, QuantizationConfig, Schedule, check_int
from lightning_sgsc.errors import SGSCRuntimeError, SGSCTypeError, describe_rule
from lightning_sgsc.feedback import (
    Action,
    FeedbackPolicy,
    apply_decision,
    low_bit_channels,
    mask_pruned_grads_,
    raise_precision_,
    select_top,
)
from lightning_sgsc.losses import l1_term, weighted_sum
from lightning_sgsc.mixin import SafetyGuidedMixin
from lightning_sgsc.norms import eval_mode
from lightning_sgsc.optim import own_param_group
from lightning_sgsc.preservation.lifecycle import PreservationData, PreservationManager
from lightning_sgsc.preservation.set import PreservationSet
from lightning_sgsc.quant.fused import FusedQuantizer
from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers, quantizer_parameters
from lightning_sgsc.quant.swap import quantize_
from lightning_sgsc.size import model_size, size_metrics

_BUDGET_ARGS = frozenset(inspect.signature(BudgetHooks).parameters)  # callback arguments passed on by name


class SafetyGuidedQuantization(Callback):
    """Learns a bit depth and exponent per output channel of every Conv/Linear layer while the model trains.

    Args:
        init_bits: starting bit depth, 2 to 16.
        include: fnmatch patterns of layers to quantize (default: every Conv1d, Conv2d and Linear).
        exclude: fnmatch patterns of layers to leave in float.
        l1_weight: weight of the mean |w| term (a constant or a function of the epoch, as the two below).
        bit_weight: weight of the average-bits-per-weight penalty.
        preservation_weight: weight of the preservation loss (``None``: 1.0 when there is preservation data).
        quantizer_lr: learning rate of the ``bits``/``exponent`` param group (``weight_decay`` 0 there).
        preservation_data: a PreservationSet, Dataset or DataLoader of examples the compressed model must keep
            right. ``None``: chosen from the training data (``build_preservation_set``, the arguments below).
        preservation_size: size of that set (0: no set, no preservation loss, no feedback).
        preservation_batch_size: batch of the preservation loss (``None``: the training batch, at most 32).
        preservation_every_n_steps: add the preservation loss on every n-th training step only.
        preservation_source: the data the set is chosen from (default: the training set; never the test split).
        preservation_fractions: share of the set per strategy (``gradcam``, ``uncertainty``, ``kmeans``,
            ``random``; default a third each of the first three).
        preservation_warmup_epochs: training epochs before the set is scored and built (0: at the start).
        preservation_pool: candidates scored, a seeded random subset of the training data (``None``: all).
        balance_classes: cap each class at ``ceil(preservation_size / classes)`` examples of the set.
        threshold: largest allowed drop of the preservation metric before channels are restored.
        restore_fraction: fraction of zero-bit channels restored when the metric dropped, (0, 1].
        restore_bits: bit depth of a restored channel.
        min_channels: channels every quantized layer keeps at least.
        prune: make zero-bit channels permanent when the metric held.
        reference: ``"best"`` or ``"first"``: what the preservation metric is compared with.
        seed: seed of every random choice the callback makes.
        max_history: feedback events kept in :attr:`history` (and the checkpoint); the oldest go first.
        init_headroom: bits of room above each channel's largest weight at the swap, 0 to ``init_bits - 2``
            (``None``: 2, or ``init_bits - 2`` if less): weights grow early on, and a clipped one gets no gradient.
        compile_quantizer: run the quantizer's arithmetic through ``torch.compile`` (opt-in).
        recalibrate_norms: recompute BatchNorm statistics on the preservation set before each measurement and after
            each restore.
        preservation_loss: ``"distill"`` (keep the compressed model's outputs on the set those of its float weights)
            or ``"labels"`` (cross entropy on the set's labels, the paper's term); see the README.
        distill_temperature: softmax temperature of the distillation term.
        max_drop, monitor, mode, drop_type, reference_value, target_bytes, target_bits_per_weight,
            budget_warmup_checks, cooldown_fraction, keep_best, best_state_path: a budget instead of a fixed size
            penalty (``bit_weight`` is then the starting weight); see :class:`~lightning_sgsc.budget_hooks.BudgetHooks`
            and the README's "Set a budget".

    Example::

        trainer = L.Trainer(callbacks=[SafetyGuidedQuantization(init_bits=8, bit_weight=0.02)])
        trainer.fit(model)   # model: class Net(SafetyGuidedMixin, L.LightningModule)
    """

    def __init__(
        self,
        init_bits: float = 8.0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        l1_weight: Schedule = 0.0,
        bit_weight: Schedule = 0.01,
        preservation_weight: Schedule | None = None,
        quantizer_lr: float = 0.01,
        preservation_data: PreservationData | None = None,
        preservation_size: int = 256,
        preservation_batch_size: int | None = None,
        preservation_every_n_steps: int = 8,
        preservation_source: Dataset | DataLoader | None = None,
        preservation_fractions: dict[str, float] | None = None,
        preservation_warmup_epochs: int = 1,
        preservation_pool: int | None = 10_000,
        balance_classes: bool = False,
        threshold: float = 0.02,
        restore_fraction: float = 0.25,
        restore_bits: float = 2.0,
        min_channels: int = 1,
        prune: bool = True,
        reference: str = "best",
        seed: int = 0,
        max_history: int = 1000,
        init_headroom: float | None = None,
        compile_quantizer: bool = False,
        recalibrate_norms: bool = True,
        preservation_loss: str = "distill",
        distill_temperature: float = 1.0,
        max_drop: float | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        drop_type: str = "absolute",
        reference_value: float | None = None,
        target_bytes: int | None = None,
        target_bits_per_weight: float | None = None,
        budget_warmup_checks: int = 1,
        cooldown_fraction: float = 0.0,
        keep_best: bool = True,
        best_state_path: str | None = None,
    ) -> None:
        super().__init__()
        self.quant_config = QuantizationConfig(
            init_bits, include, exclude, init_headroom, lr=quantizer_lr, compile=compile_quantizer
        )
        self.loss_weights = LossWeights(
            l1_weight, bit_weight, 1.0 if preservation_weight is None else preservation_weight
        )
        check_int("max_history", max_history, 1)
        self.preservation = PreservationManager(  # the preservation_* arguments, in their order
            *(preservation_data, preservation_size, preservation_batch_size, preservation_every_n_steps),
            *(preservation_source, preservation_fractions, preservation_warmup_epochs, preservation_pool),
            *(balance_classes, seed, preservation_loss, distill_temperature),
        )
        self.preservation.check_weight(preservation_weight)
        self.feedback_config = FeedbackConfig(
            threshold, restore_fraction, restore_bits, min_channels, reference=reference, prune=prune
        )
        self.quantizer_lr, self.recalibrate_norms = float(quantizer_lr), bool(recalibrate_norms)
        self.seed, self.max_history = seed, max_history
        self.policy = FeedbackPolicy(self.feedback_config)
        self.budget = BudgetHooks(**{name: value for name, value in locals().items() if name in _BUDGET_ARGS})
        self.history: list[dict[str, Any]] = []
        self.swapped_layers: list[str] = []
        self._layers: list[QuantizedLayer] = []
        self._fused = FusedQuantizer([])
        self._feedback_epoch, self._any_pruned = -1, False

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
        n = sum(isinstance(cb, SafetyGuidedQuantization) for cb in getattr(trainer, "callbacks", None) or [])
        if n > 1:
            raise SGSCRuntimeError(describe_rule("Trainer(callbacks=...)", "one SafetyGuidedQuantization", f"{n}"))
        existing = quantized_layers(pl_module)
        if existing:  # a second fit, or a model the user swapped: re-use, never swap twice
            self.swapped_layers = [name for name, _ in existing]
        else:
            qc = self.quant_config
            self.swapped_layers = quantize_(
                pl_module, qc.init_bits, qc.include, qc.exclude, init_headroom=qc.init_headroom
            )
            rank_zero_info(f"[sgsc] quantized {len(self.swapped_layers)} layers at {qc.init_bits:g} bits")
        self._layers = [m for _, m in quantized_layers(pl_module)]
        self._fused = FusedQuantizer(self._layers, compile=self.quant_config.compile)
        self.feedback_config = dataclasses.replace(self.feedback_config, mode=self.preservation.mode(pl_module))
        self.policy.config = self.feedback_config
        pl_module.attach_compression(self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, SafetyGuidedMixin):
            pl_module.attach_compression(None)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Pruned masks are buffers: a checkpoint's load after `setup`, so read them here, not in `setup`.
        self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
        if trainer.optimizers:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            own_param_group(trainer.optimizers[0], quantizer_parameters(pl_module), self.quantizer_lr, schedulers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preservation.start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preservation.maybe_build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.preservation.note_batch(trainer, batch)
        self.budget.maybe_cool_down(trainer, pl_module, self.loss_weights)

    # ---------------------------------------------------------------------------------------------- loss terms

    def training_step_context(self) -> AbstractContextManager[Any]:
        """Entered by the mixin around one automatic-optimisation ``training_step`` and its compression terms: all
        layers are quantized once, in one fused pass, for every forward of the step."""
        return self._fused.step()

    def compression_terms(
        self, pl_module: SafetyGuidedMixin, base: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weighted sum, raw terms)`` for one training step, the sum added to ``base`` (the task loss) when given;
        called by the mixin."""
        weights = self.loss_weights.at(pl_module.current_epoch)  # type: ignore[attr-defined]
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
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # the epoch's metrics are in callback_metrics
            self._budget_check(trainer, pl_module)

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
        return self.preservation.metric(trainer, pl_module, self.recalibrate_norms)

    def _feedback(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._feedback_epoch = trainer.current_epoch
        if self.preservation.set is not None and not self.budget.cooling:
            metric = self.measure_preservation(trainer, pl_module)
            decision = self.policy.decide(metric, self.preservation.noise)
            if decision.action is Action.PRUNE and self.budget.violated:  # over the budget: nothing becomes permanent
                decision = dataclasses.replace(decision, action=Action.SKIP)
            if decision.action is Action.SKIP and not math.isfinite(metric):
                rank_zero_warn(f"[sgsc] preservation metric is {metric}; skipping restore/prune this time.")
            scores = lambda: trainer.strategy.broadcast(self._restore_scores(pl_module), src=0)  # noqa: E731
            with eval_mode(pl_module):
                event = apply_decision(pl_module, decision, self.feedback_config, scores, list(trainer.optimizers))
                if self.recalibrate_norms and (event.restored or event.kept_alive):
                    # A restored channel was at zero bits when the statistics were taken (variance ~0): without new
                    # statistics BatchNorm would scale its returning output by ~1/sqrt(eps).
                    self.preservation.recalibrate(pl_module)
            self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
            event = dataclasses.replace(event, epoch=trainer.current_epoch, step=trainer.global_step)
            self.history = [*self.history, event.as_dict()][-self.max_history :]
            pl_module.log_dict({f"sgsc/{k}": float(v) for k, v in event.metrics().items()})
        pl_module.log_dict(size_metrics(model_size(pl_module)))

    def _budget_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.check(trainer, pl_module, self.history, self.loss_weights, lambda: self._repair(trainer, pl_module))
        metrics = self.budget.metrics()
        if metrics:  # this check's values; `self.log` is not allowed in on_validation_end, so they go to the
            # loggers at this step and into callback_metrics (read by ModelCheckpoint/EarlyStopping, which run after)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _restore_scores(self, pl_module: pl.LightningModule, bits: float | None = None) -> dict[str, Tensor]:
        return self.preservation.restore_scores(pl_module, self.feedback_config.restore_bits if bits is None else bits)

    def _repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Over the accuracy budget: ``restore_fraction`` of the channels at ``restore_bits`` bits or fewer (zero-bit
        ones included) back to ``restore_bits + 2`` bits, those whose requantization lowers the preservation set's
        label loss the most (first-order estimate); needs the preservation set. Returns the channels changed."""
        if self.preservation.set is None:
            return 0
        config = self.feedback_config
        bits = config.restore_bits + 2.0
        candidates = low_bit_channels(pl_module, config.restore_bits)
        if not any(bool(m.any()) for m in candidates.values()):
            return 0
        with eval_mode(pl_module):
            scores = trainer.strategy.broadcast(self._restore_scores(pl_module, bits), src=0)
            changed = raise_precision_(pl_module, select_top(scores, candidates, config.restore_fraction), bits)
        if changed and self.recalibrate_norms:
            self.preservation.recalibrate(pl_module)
        return changed

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.on_fit_end(pl_module)

    # ----------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "history": [dict(e) for e in self.history],
            "swapped_layers": list(self.swapped_layers),
            "preservation": self.preservation.state_dict(),
            "budget": self.budget.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict["policy"])
        self.history = [dict(e) for e in state_dict["history"]]
        legacy = {k[13:]: v for k, v in state_dict.items() if k.startswith("preservation_")}  # written by 0.1
        self.preservation.load_state_dict(state_dict.get("preservation", legacy))
        self.budget.load_state_dict(state_dict.get("budget"), self.loss_weights)
