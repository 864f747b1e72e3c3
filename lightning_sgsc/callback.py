"""``SafetyGuidedQuantization``: thin Lightning orchestration of the quantizer, the loss terms and the feedback loop.

Hook by hook:

* ``setup``: swap Conv/Linear layers for quantized twins (before the optimizer exists and before checkpoint weights
  load, so ``bits``/``exponent`` are trained by the user's own ``configure_optimizers`` and restored on resume).
* ``on_fit_start``: move ``bits``/``exponent`` into a param group of their own (``weight_decay=0``, own lr); set up
  the preservation data.
* each training step (through :class:`~lightning_sgsc.mixin.SafetyGuidedMixin`): the compression terms.
* ``on_validation_epoch_end`` (or ``on_train_epoch_end`` when there is no validation loop): measure the
  preservation set, restore or prune, log size metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_sgsc.config import FeedbackConfig, LossWeights, QuantizationConfig, Schedule, check_int
from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.feedback import (
    Action,
    Event,
    FeedbackPolicy,
    apply_decision,
    mask_pruned_grads_,
    probe_weight_grads,
    taylor_restore_scores,
)
from lightning_sgsc.losses import l1_term, weighted_sum
from lightning_sgsc.mixin import SafetyGuidedMixin
from lightning_sgsc.preservation.build import DEFAULT_FRACTIONS, build_preservation_set, check_fractions
from lightning_sgsc.preservation.set import PreservationSampler, PreservationSet
from lightning_sgsc.quant import native
from lightning_sgsc.quant.fused import FusedQuantizer
from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers, quantizer_parameters
from lightning_sgsc.quant.swap import quantize_
from lightning_sgsc.size import model_size

try:  # devices with fused optimizer kernels (private in torch; the fallback is the documented pair)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older or newer torch
    _FUSED_DEVICES = frozenset({"cuda", "cpu"})

PreservationData = Dataset | DataLoader | PreservationSet

DEFAULT_PRESERVATION_BATCH = 32
"""Largest preservation batch when ``preservation_batch_size`` is ``None`` (smaller training batches set it)."""


def _batched_update(group: dict[str, Any], device: torch.device | None) -> None:
    """Makes the optimizer update all ``bits``/``exponent`` tensors (two small ones per layer) in one call instead
    of a Python loop over them: the fused kernel where the optimizer has one for this device (Adam, AdamW, SGD,
    Adagrad), else the multi-tensor path. Settings the user chose (``fused``/``foreach`` not ``None``) are kept."""
    if group.get("foreach") is not None or group.get("fused") or group.get("differentiable"):
        return
    if "fused" in group and group["fused"] is None and device is not None and device.type in _FUSED_DEVICES:
        group["fused"] = True
    elif "foreach" in group:
        group["foreach"] = True


class SafetyGuidedQuantization(Callback):
    """Learns a bit depth and exponent per output channel of every Conv/Linear layer while the model trains.

    Args:
        init_bits: starting bit depth, 2 to 16.
        include: fnmatch patterns of layer names to quantize (default: every Conv1d, Conv2d and Linear,
            classifier heads included).
        exclude: fnmatch patterns of layer names to leave in float.
        l1_weight: weight of the mean |w| term (constant or function of the epoch).
        bit_weight: weight of the average-bits-per-weight penalty (constant or function of the epoch).
        preservation_weight: weight of the preservation loss. ``None``: 1.0 when there is preservation data.
        quantizer_lr: learning rate of the ``bits``/``exponent`` param group (``weight_decay`` is 0 there).
        preservation_data: a PreservationSet, Dataset or DataLoader of examples the compressed model must keep
            right (collated once and held as tensors on the model's device). ``None``: built from the training
            data by :func:`~lightning_sgsc.preservation.build_preservation_set` (see the next arguments).
        preservation_size: size of the set built when ``preservation_data`` is ``None``.
        preservation_source: the data the set is scored from when ``preservation_data`` is ``None`` (default: the
            training dataset). Training or validation data, never the test split.
        preservation_fractions: share of the set chosen by each strategy: ``gradcam`` (attention), ``uncertainty``
            (margin), ``kmeans`` (diversity), ``random``. Default: a third each of the first three.
        preservation_warmup_epochs: training epochs before the set is scored and built (from the model as it is
            then; 0 scores the model as it is at fit start). Until then there is no preservation loss or feedback.
        preservation_pool: candidates scored (a seeded random subset of the training data); ``None``: all.
        balance_classes: cap each class at ``ceil(preservation_size / classes)`` examples of the set.
        preservation_batch_size: batch size of preservation batches. ``None``: the training batch size, at most
            ``DEFAULT_PRESERVATION_BATCH`` (32), taken from the training loader's ``batch_size`` (else from the
            first training batch) once per fit: a preservation step then never costs more than a training step (a
            fixed 32 doubled it for a training batch of 16).
        preservation_every_n_steps: add the preservation loss on every n-th training step only; its extra forward
            and backward are most of the callback's cost per step (1: every step). Its weight is not scaled up on
            those steps: weighting it ``n`` times inflated Adam's second moment of ``b`` and slowed compression
            (demo, n=8: 3.88 instead of 1.87 bits per weight at no better accuracy).
        threshold: largest allowed drop of the preservation metric before channels are restored.
        restore_fraction: fraction of zero-bit channels restored when the metric dropped, (0, 1].
        restore_bits: bit depth of a restored channel.
        min_channels: channels every quantized layer keeps at least.
        prune: make zero-bit channels permanent when the metric held.
        reference: ``"best"`` or ``"first"``: what the preservation metric is compared with.
        seed: seed of every random choice the callback makes.
        max_history: feedback events kept in :attr:`history` (and the checkpoint); the oldest go first.
        init_headroom: bits of room above each channel's largest weight at the swap, 0 to ``init_bits - 2``:
            weights grow early in training and a clipped weight gets no gradient, so the first exponents are set
            ``2^headroom`` times coarser than the tightest fit. ``None``: 2, or ``init_bits - 2`` if less (peers
            bench, FashionCNN, 1,000 steps, 8 bits, ``bit_weight`` 0: 88.28 % test accuracy with 2 bits of room
            against 87.02 % with none; the 40-epoch digits demo does better with 0 and sets it).

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
    ) -> None:
        super().__init__()
        self.quant_config = QuantizationConfig(
            init_bits=init_bits, include=include, exclude=exclude, init_headroom=init_headroom
        )
        if preservation_weight is not None and not callable(preservation_weight) and preservation_weight > 0:
            if preservation_data is None and preservation_size == 0:
                raise SGSCValueError(
                    describe_rule("preservation_weight", "0 when there is no preservation data", preservation_weight)
                    + " Pass `preservation_data=` or a `preservation_size` > 0."
                )
        self.loss_weights = LossWeights(
            l1_weight=l1_weight,
            bit_weight=bit_weight,
            preservation_weight=1.0 if preservation_weight is None else preservation_weight,
        )
        if isinstance(quantizer_lr, bool) or not isinstance(quantizer_lr, (int, float)) or not quantizer_lr > 0:
            raise SGSCValueError(describe_rule("quantizer_lr", "a number > 0", quantizer_lr))
        if preservation_data is not None and not isinstance(preservation_data, (Dataset, DataLoader, PreservationSet)):
            raise SGSCTypeError(
                describe_rule(
                    "preservation_data",
                    "a PreservationSet, torch Dataset or DataLoader (or None)",
                    type(preservation_data),
                )
            )
        check_int("preservation_size", preservation_size, 0)
        check_int("preservation_batch_size", preservation_batch_size, 1, allow_none=True)
        check_int("preservation_warmup_epochs", preservation_warmup_epochs, 0)
        check_int("preservation_pool", preservation_pool, 1, allow_none=True)
        check_int("preservation_every_n_steps", preservation_every_n_steps, 1)
        check_int("max_history", max_history, 1)
        self.preservation_fractions = check_fractions(
            DEFAULT_FRACTIONS if preservation_fractions is None else preservation_fractions
        )
        if preservation_source is not None and not isinstance(preservation_source, (Dataset, DataLoader)):
            raise SGSCTypeError(
                describe_rule(
                    "preservation_source", "a torch Dataset or DataLoader (or None)", type(preservation_source)
                )
            )
        self.preservation_source = preservation_source
        self.preservation_warmup_epochs = preservation_warmup_epochs
        self.preservation_pool = preservation_pool
        self.balance_classes = bool(balance_classes)
        self.feedback_config = FeedbackConfig(
            threshold=threshold,
            restore_fraction=restore_fraction,
            restore_bits=restore_bits,
            min_channels=min_channels,
            prune=prune,
            reference=reference,
        )
        self.quantizer_lr = float(quantizer_lr)
        self.preservation_data = preservation_data
        self.preservation_size = preservation_size
        self.preservation_batch_size = preservation_batch_size
        self.preservation_every_n_steps = preservation_every_n_steps
        self.seed = seed
        self.max_history = max_history
        self.policy = FeedbackPolicy(self.feedback_config)
        self.history: list[dict[str, Any]] = []
        self.swapped_layers: list[str] = []
        self._layers: list[QuantizedLayer] = []
        self._fused = FusedQuantizer([])
        self._loss_weights_cache: tuple[tuple[Any, ...], dict[str, float]] | None = None
        self.preservation_set: PreservationSet | None = None
        self._preservation_iter: PreservationSampler | None = None
        self._preservation_draws = 0
        self._train_batch_size: int | None = None  # this fit's, from its loader or first batch
        self._preservation_indices: list[int] | None = None
        self._preservation_chosen_by: list[str] = []
        self._warned_no_dataset = False
        self._feedback_epoch = -1
        self._any_pruned = False

    # ------------------------------------------------------------------------------------------------ set up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SafetyGuidedMixin):
            raise SGSCTypeError(
                describe_rule("model", "a LightningModule that inherits SafetyGuidedMixin", type(pl_module).__name__)
                + " Declare it as `class Net(SafetyGuidedMixin, L.LightningModule)` so the loss terms are added."
            )
        existing = quantized_layers(pl_module)
        if existing:  # a second fit, or a model the user swapped: re-use, never swap twice
            self.swapped_layers = [name for name, _ in existing]
        else:
            self.swapped_layers = quantize_(
                pl_module,
                init_bits=self.quant_config.init_bits,
                init_headroom=self.quant_config.init_headroom,
                include=self.quant_config.include,
                exclude=self.quant_config.exclude,
            )
            rank_zero_info(
                f"[sgsc] quantized {len(self.swapped_layers)} layers at {self.quant_config.init_bits:g} bits"
            )
        self._layers = [m for _, m in quantized_layers(pl_module)]
        self._fused = FusedQuantizer(self._layers)
        self.feedback_config = dataclasses.replace(self.feedback_config, mode=pl_module.preservation_metric_mode)
        self.policy.config = self.feedback_config

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_batch_size = None  # this fit's loader may batch differently from the last one's
        # Pruned masks are buffers: a checkpoint's load after `setup`, so read them here, not in `setup`.
        self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
        if trainer.optimizers:
            self._own_param_group(trainer, pl_module)
        if self._layers and trainer.strategy.root_device.type == "cpu":
            rank_zero_info(f"[sgsc] quantizer kernel: {native.status()}")
        self._setup_preservation(trainer, pl_module)

    def _own_param_group(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Moves ``bits``/``exponent`` out of the user's param groups into one of their own."""
        optimizer = trainer.optimizers[0]
        qparams = quantizer_parameters(pl_module)
        qids = {id(p) for p in qparams}
        template: dict[str, Any] = {}
        for group in optimizer.param_groups:
            if any(id(p) in qids for p in group["params"]):
                template = template or {k: v for k, v in group.items() if k != "params"}
                group["params"] = [p for p in group["params"] if id(p) not in qids]
            if group.get("sgsc_quantizer"):
                return  # already done on a previous fit with this optimizer
        template = template or {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        template.update(lr=self.quantizer_lr, initial_lr=self.quantizer_lr, weight_decay=0.0, sgsc_quantizer=True)
        _batched_update(template, qparams[0].device if qparams else None)
        optimizer.add_param_group({"params": qparams, **template})
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [*list(scheduler.base_lrs)[: len(optimizer.param_groups) - 1], self.quantizer_lr]

    # ------------------------------------------------------------------------------------------- preservation

    def _setup_preservation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self.preservation_data
        if isinstance(data, PreservationSet):
            self._use_set(data, pl_module)
        elif data is not None:
            self._use_set(PreservationSet.from_data(data), pl_module)
        elif self._preservation_indices is not None:  # resumed: the same examples as before, no re-scoring
            dataset = self._training_dataset(trainer)
            if dataset is not None:
                pset = PreservationSet.from_data(dataset, self._preservation_indices)
                pset.chosen_by = list(self._preservation_chosen_by)
                self._use_set(pset, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.preservation_set is None
            and self.preservation_data is None
            and self.preservation_size > 0
            and trainer.current_epoch >= self.preservation_warmup_epochs
        ):
            self._build_preservation_set(trainer, pl_module)

    def _training_dataset(self, trainer: pl.Trainer) -> Any:
        if self.preservation_source is not None:
            source = self.preservation_source
            return source.dataset if isinstance(source, DataLoader) else source
        loader = trainer.train_dataloader
        if loader is None:  # before the fit loop has set up its data
            data_source = trainer.fit_loop._data_source
            loader = data_source.dataloader() if data_source.is_defined() else None
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            if not self._warned_no_dataset:
                rank_zero_warn(
                    "[sgsc] no map-style training dataset to build a preservation set from; pass"
                    " `preservation_data=`. Training without preservation loss and feedback."
                )
                self._warned_no_dataset = True
            return None
        return dataset

    def _build_preservation_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._training_dataset(trainer)
        if dataset is None:
            return
        if trainer.world_size > 1:  # rank 0 scores, every rank uses the same examples
            chosen = self._score_set(trainer, pl_module, dataset) if trainer.is_global_zero else None
            shared = trainer.strategy.broadcast(
                (chosen.indices.tolist(), chosen.chosen_by) if chosen is not None else None, src=0
            )
            assert shared is not None  # rank 0 always sends its choice
            indices, chosen_by = shared
            pset = chosen if chosen is not None else PreservationSet.from_data(dataset, indices)
            pset.chosen_by = list(chosen_by)
        else:
            pset = self._score_set(trainer, pl_module, dataset)
        self._preservation_indices = pset.indices.tolist()
        self._preservation_chosen_by = list(pset.chosen_by)
        self._use_set(pset, pl_module)

    def _score_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any) -> PreservationSet:
        return build_preservation_set(
            pl_module,
            dataset,
            size=min(self.preservation_size, len(dataset), self.preservation_pool or len(dataset)),
            fractions=self.preservation_fractions,
            balance_classes=self.balance_classes,
            seed=self.seed,
            pool_size=self.preservation_pool,
            progress=trainer.progress_bar_callback is not None,
        )

    def _use_set(self, pset: PreservationSet, pl_module: pl.LightningModule) -> None:
        pset = pset.to(pl_module.device)
        was_training = pl_module.training
        try:
            with torch.no_grad():
                pl_module.eval()
                pl_module.preservation_step(pset.batch(torch.arange(min(2, len(pset)))))  # type: ignore[operator]
        except Exception as err:
            raise SGSCValueError(
                describe_rule("preservation_data", "examples the model's preservation_step accepts", type(pset.data))
                + f" Its first batch failed with {type(err).__name__}: {err}"
            ) from err
        finally:
            pl_module.train(was_training)
        self.preservation_set = pset
        self._preservation_iter = None  # made at the first draw, when the training batch size is known
        rank_zero_info(f"[sgsc] preservation set: {len(pset)} examples")

    @property
    def effective_preservation_batch_size(self) -> int:
        """The batch size preservation batches are drawn at: ``preservation_batch_size``, or the training batch
        size capped at ``DEFAULT_PRESERVATION_BATCH`` (that cap alone before the first training batch)."""
        if self.preservation_batch_size is not None:
            return self.preservation_batch_size
        return min(DEFAULT_PRESERVATION_BATCH, self._train_batch_size or DEFAULT_PRESERVATION_BATCH)

    def next_preservation_batch(self) -> Any:
        """The next preservation batch (seeded shuffled passes over the set), already on the model's device."""
        if self._preservation_iter is None:
            assert self.preservation_set is not None
            self._preservation_iter = self.preservation_set.sampler(
                self.effective_preservation_batch_size, self.seed, draws=self._preservation_draws
            )
        return next(self._preservation_iter)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._train_batch_size is None and self.preservation_batch_size is None:
            # The loader's batch_size first: a resumed fit may start on an epoch's last, smaller batch.
            size = getattr(trainer.train_dataloader, "batch_size", None)
            if isinstance(size, int) and size > 0:
                self._train_batch_size = size
                return
            try:
                self._train_batch_size = extract_batch_size(batch)
            except MisconfigurationException:
                self._train_batch_size = DEFAULT_PRESERVATION_BATCH
                rank_zero_warn(
                    "[sgsc] no batch size found in the training batch; preservation batches of"
                    f" {DEFAULT_PRESERVATION_BATCH}. Pass `preservation_batch_size=` to choose."
                )

    # ---------------------------------------------------------------------------------------------- loss terms

    def training_step_context(self) -> AbstractContextManager[Any]:
        """Entered by the mixin around one automatic-optimisation ``training_step`` and its compression terms: all
        layers are quantized once, in one fused pass, for every forward of the step (see
        :class:`~lightning_sgsc.quant.fused.FusedQuantizer`)."""
        return self._fused.step()

    def compression_terms(
        self, pl_module: SafetyGuidedMixin, base: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weighted sum, raw terms)`` for one training step, the sum added to ``base`` (the task loss) when given;
        called by the mixin."""
        weights = self._loss_weights_at(pl_module.current_epoch)  # type: ignore[attr-defined]
        terms: dict[str, Tensor] = {"bits": self._fused.bits_per_weight()}
        used = {"bits": weights["bits"]}
        if weights["l1"]:
            terms["l1"] = l1_term(self._layers)
            used["l1"] = weights["l1"]
        due = pl_module.global_step % self.preservation_every_n_steps == 0  # type: ignore[attr-defined]
        if weights["preservation"] and self.preservation_set is not None and due:
            batch = self.next_preservation_batch()
            terms["preservation"] = pl_module.preservation_step(batch)
            used["preservation"] = weights["preservation"]
        return weighted_sum(terms, used, base), terms

    def _loss_weights_at(self, epoch: int) -> dict[str, float]:
        """:meth:`LossWeights.at`, evaluated (and checked) once per epoch and per change of the weights."""
        lw = self.loss_weights
        key = (epoch, lw.l1_weight, lw.bit_weight, lw.preservation_weight)
        cached = self._loss_weights_cache
        if cached is None or cached[0] != key:
            cached = self._loss_weights_cache = (key, lw.at(epoch))
        return cached[1]

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
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation (when there is one) ran before this hook; without a validation loop, or with one that has no
        # batches, the feedback runs here instead, once per epoch.
        no_validation = not trainer.enable_validation or sum(trainer.num_val_batches) == 0
        if no_validation and self._feedback_epoch != trainer.current_epoch:
            self._feedback(trainer, pl_module)

    def _feedback(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._feedback_epoch = trainer.current_epoch
        if self.preservation_set is not None:
            was_training = pl_module.training
            pl_module.eval()
            with torch.inference_mode(False), torch.no_grad():
                metric = pl_module.preservation_evaluate(self._evaluation_batches())  # type: ignore[operator]
            # Every rank holds the same set and weights; rank 0's measurement and choices are nevertheless what
            # all ranks act on, so a difference in the last bit can never split their models.
            metric = float(trainer.strategy.broadcast(metric, src=0))
            decision = self.policy.decide(metric)
            if decision.action is Action.SKIP:
                rank_zero_warn(f"[sgsc] preservation metric is {metric}; skipping restore/prune this time.")
            event = apply_decision(
                pl_module,
                decision,
                self.feedback_config,
                restore_scores=lambda: trainer.strategy.broadcast(self._restore_scores(pl_module), src=0),
                optimizers=list(trainer.optimizers),
            )
            pl_module.train(was_training)
            self._any_pruned = any(bool(layer.pruned.any()) for layer in self._layers)
            event = Event(**{**event.as_dict(), "epoch": trainer.current_epoch, "step": trainer.global_step})
            self.history.append(event.as_dict())
            del self.history[: max(0, len(self.history) - self.max_history)]
            pl_module.log("sgsc/preservation_metric", metric)
            pl_module.log("sgsc/restored_channels", float(event.restored))
            pl_module.log("sgsc/pruned_channels", float(event.pruned))
            pl_module.log("sgsc/kept_alive_channels", float(event.kept_alive))
        self._log_size(pl_module)

    def _restore_scores(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        with torch.inference_mode(False), torch.enable_grad(), probe_weight_grads(pl_module) as grads:
            for batch in self._evaluation_batches():
                loss = pl_module.preservation_step(batch)  # type: ignore[operator]
                loss.backward(inputs=[layer._weight_probe for layer in self._layers])  # type: ignore[misc]
        return taylor_restore_scores(pl_module, grads, self.feedback_config.restore_bits)

    def _evaluation_batches(self) -> Iterator[Any]:
        assert self.preservation_set is not None
        return self.preservation_set.batches(max(self.effective_preservation_batch_size, 256))

    def _log_size(self, pl_module: pl.LightningModule) -> None:
        size = model_size(pl_module)
        pl_module.log("sgsc/bits_per_weight", size.bits_per_weight)
        pl_module.log("sgsc/model_bytes", float(size.total_bytes))
        pl_module.log("sgsc/compression_ratio", size.compression_ratio)
        pl_module.log("sgsc/zero_bit_channels", float(size.zero_bit_channels))
        pl_module.log("sgsc/pruned_total", float(size.pruned_channels))
        for layer in size.layers:
            pl_module.log(f"sgsc/bits/{layer.name}", layer.mean_bits)

    # ----------------------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "history": [dict(e) for e in self.history],
            "swapped_layers": list(self.swapped_layers),
            "preservation_indices": self._preservation_indices,
            "preservation_chosen_by": list(self._preservation_chosen_by),
            "preservation_draws": (
                self._preservation_iter.draws if self._preservation_iter is not None else self._preservation_draws
            ),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict["policy"])
        self.history = [dict(e) for e in state_dict["history"]]
        self._preservation_indices = state_dict.get("preservation_indices")
        self._preservation_chosen_by = list(state_dict.get("preservation_chosen_by", []))
        self._preservation_draws = int(state_dict.get("preservation_draws", 0))
