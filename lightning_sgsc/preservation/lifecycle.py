"""The preservation set over a fit: when it is built, how batches are drawn, what a checkpoint keeps.

:class:`PreservationManager` is the part of the callback that owns the set. It is driven by four calls, each from
one callback hook: :meth:`~PreservationManager.start` (``on_train_start``: the user's data, or a resumed run's
examples), :meth:`~PreservationManager.maybe_build` (``on_train_epoch_start``: score and choose once the warm-up
is over), :meth:`~PreservationManager.note_batch` (``on_train_batch_start``: learn the training batch size),
:meth:`~PreservationManager.term` (a training step's preservation loss) and :meth:`~PreservationManager.metric` (the
safety signal at each check, with its :attr:`~PreservationManager.noise`). It reads only public Trainer attributes
(``train_dataloader``, ``world_size``, ``strategy``) and keeps everything a resume needs in
:meth:`~PreservationManager.state_dict`.

The preservation term (``loss``):

* ``"distill"`` (default): keep the compressed model doing on the set what the uncompressed model does. The
  teacher is the same model with its float weights, unquantized, at the current step (one extra forward without
  gradients): ``T² · KL(teacher || compressed)`` on a preservation batch. It is 0 when quantization changes nothing;
  nothing is recorded, so nothing goes stale while the float weights keep learning the task, and the teacher is a
  function of the checkpointed weights (resume is exact by construction).
* ``"labels"``: the paper's cross entropy on the set's labels (``preservation_step``).

The safety signal stays the model's own metric on the set (``preservation_evaluate``, accuracy by default), with a
noise margin. Agreement with the float weights was tried as the signal and dropped: under strong compression the
latent float weights are no trained model of their own, agreement with them falls as a matter of course, and the
restores it triggered cost the digits demo 2.4 points (experiments/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_sgsc.config import Preservation, check_enum
from lightning_sgsc.errors import SGSCValueError, describe_rule
from lightning_sgsc.feedback import taylor_restore_scores
from lightning_sgsc.losses import distillation_loss
from lightning_sgsc.norms import eval_mode, link_norms_, recalibrate_norms_
from lightning_sgsc.outputs import main_output
from lightning_sgsc.preservation.build import DEFAULT_FRACTIONS, build_preservation_set, check_fractions
from lightning_sgsc.preservation.scoring import infer_modality, usable_fractions
from lightning_sgsc.preservation.set import PreservationSampler, PreservationSet
from lightning_sgsc.quant.modes import float_weights
from lightning_sgsc.signal import Direction, binomial_noise

PreservationData = Dataset | DataLoader | PreservationSet

DEFAULT_PRESERVATION_BATCH = 32
"""Largest preservation batch when ``batch_size`` is ``None`` (smaller training batches set it)."""

EVALUATION_BATCH = 256
"""Batch size of the whole-set passes (the metric and the restore scores)."""


class PreservationManager:
    """Builds, holds and samples the preservation set of one callback (see the module docstring).

    Args:
        settings: the callback's preservation settings.
        seed: seed of the set's choice and of the order its batches are drawn in.
    """

    def __init__(self, settings: Preservation, seed: int = 0) -> None:
        self.settings, self.seed = settings, seed
        self.fractions = check_fractions(DEFAULT_FRACTIONS if settings.fractions is None else settings.fractions)
        self.noise = 0.0  # what the last metric could move by from its sample alone (accuracy: binomial)
        self.set: PreservationSet | None = None
        self.modality: str | None = None  # what the model does (preservation.scoring.MODALITIES), read at the start
        self.indices: list[int] | None = None  # positions in the training dataset of a set built from it
        self.chosen_by: list[str] = []
        self._sampler: PreservationSampler | None = None
        self._draws = 0
        self._train_batch_size: int | None = None
        self._warned_no_dataset = False

    # convenience views of the settings (read on hot paths and in messages)
    @property
    def data(self) -> Any:
        return self.settings.data

    @property
    def size(self) -> int:
        return self.settings.size

    @property
    def loss(self) -> str:
        return self.settings.loss

    # ------------------------------------------------------------------------------------------------ set up

    def start(self, trainer: Any, pl_module: Any) -> None:
        """At the start of a fit's training (data loaders ready): use the user's data, or rebuild a resumed set."""
        self._train_batch_size = None  # this fit's loader may batch differently from the last one's
        if self.data is None and self.size > 0 and self.indices is None:
            self._plan_scoring(trainer, pl_module)
        if isinstance(self.data, PreservationSet):
            self._use(self.data, pl_module)
        elif self.data is not None:
            self._use(PreservationSet.from_data(self.data), pl_module)
        elif self.indices is not None:  # resumed: the same examples as before, no re-scoring
            dataset = self._dataset(trainer)
            if dataset is not None:
                pset = PreservationSet.from_data(dataset, self.indices)
                pset.chosen_by = list(self.chosen_by)
                self._use(pset, pl_module)

    def _plan_scoring(self, trainer: Any, pl_module: Any) -> None:
        """Before the first epoch: what the model does (its modality, from two training examples and its outputs),
        and which strategies it can serve; one warning names what is dropped, so nothing fails an epoch later."""
        dataset = self._dataset(trainer)
        if dataset is None or len(dataset) == 0:
            return
        batch = default_collate([dataset[i] for i in range(min(2, len(dataset)))])
        batch = apply_to_collection(batch, Tensor, lambda t: t.to(pl_module.device))
        self._modality_of(pl_module, batch)
        assert self.modality is not None
        usable, dropped = usable_fractions(pl_module, self.fractions, self.modality, self.settings.target_layer)
        if dropped:
            reasons = "; ".join(f"{k!r}: {why}" for k, why in dropped.items())
            rank_zero_warn(
                f"[sgsc] preservation strategies dropped ({reasons}); the set is chosen by {usable}."
                " Set `Preservation(fractions=...)` to choose yourself."
            )
        self.fractions = usable

    def _modality_of(self, pl_module: Any, batch: Any) -> str:
        """The task's modality: the setting, or read once off a batch and the model's outputs on it."""
        if self.modality is None:
            if self.settings.modality != "auto":
                self.modality = self.settings.modality
            else:
                with torch.inference_mode(False), torch.no_grad(), eval_mode(pl_module):
                    out = main_output(pl_module(batch[0]), self.settings.output_fn)
                self.modality = infer_modality(batch[0], out, batch[1] if len(batch) > 1 else None)
        return self.modality

    def maybe_build(self, trainer: Any, pl_module: Any) -> None:
        """Scores and chooses the set from the training data once ``warmup_epochs`` are done (rank 0 scores, every
        rank uses its choice)."""
        if self.set is not None or self.data is not None or self.size == 0:
            return
        if trainer.current_epoch < self.settings.warmup_epochs:
            return
        dataset = self._dataset(trainer)
        if dataset is None:
            return
        if trainer.world_size > 1:
            chosen = self._score(trainer, pl_module, dataset) if trainer.is_global_zero else None
            shared = trainer.strategy.broadcast(
                (chosen.indices.tolist(), chosen.chosen_by) if chosen is not None else None, src=0
            )
            indices, chosen_by = shared
            pset = chosen if chosen is not None else PreservationSet.from_data(dataset, indices)
            pset.chosen_by = list(chosen_by)
        else:
            pset = self._score(trainer, pl_module, dataset)
        self.indices = pset.indices.tolist()
        self.chosen_by = list(pset.chosen_by)
        self._use(pset, pl_module)

    def _dataset(self, trainer: Any) -> Any:
        if self.settings.source is not None:
            source = self.settings.source
            return source.dataset if isinstance(source, DataLoader) else source
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            if not self._warned_no_dataset:
                rank_zero_warn(
                    "[sgsc] no map-style training dataset to build a preservation set from; pass"
                    " `preservation_data=`. Training without preservation loss and feedback."
                )
                self._warned_no_dataset = True
            return None
        return dataset

    def _score(self, trainer: Any, pl_module: Any, dataset: Any) -> PreservationSet:
        return build_preservation_set(
            pl_module,
            dataset,
            size=min(self.size, len(dataset), self.settings.pool or len(dataset)),
            fractions=self.fractions,
            balance_classes=self.settings.balance_classes,
            seed=self.seed,
            pool_size=self.settings.pool,
            target_layer=self.settings.target_layer,
            modality=self.modality or self.settings.modality,
            output_fn=self.settings.output_fn,
            progress=trainer.progress_bar_callback is not None,
        )

    def _use(self, pset: PreservationSet, pl_module: Any) -> None:
        pset = pset.to(pl_module.device)
        first = pset.batch(torch.arange(min(2, len(pset))))
        try:  # one forward: checks the set fits the model, and shows which BatchNorm reads which twin
            self._modality_of(pl_module, first)
            link_norms_(pl_module, lambda: self._check_forward(pl_module, first))
        except Exception as err:
            hook = "preservation_outputs" if self.loss == "distill" else "preservation_step"
            raise SGSCValueError(
                describe_rule("preservation.data", f"examples the model's {hook} accepts", type(pset.data))
                + f" Its first batch failed with {type(err).__name__}: {err}"
            ) from err
        self.set = pset
        self._sampler = None  # made at the first draw, when the training batch size is known
        rank_zero_info(f"[sgsc] preservation set: {len(pset)} examples")

    # ---------------------------------------------------------------------------------------------- batches

    def note_batch(self, trainer: Any, batch: Any) -> None:
        """Learns this fit's training batch size (the loader's ``batch_size``, else the first batch's)."""
        if self._train_batch_size is not None or self.settings.batch_size is not None:
            return
        size = getattr(trainer.train_dataloader, "batch_size", None)
        if isinstance(size, int) and size > 0:  # a resumed fit may start on an epoch's last, smaller batch
            self._train_batch_size = size
            return
        try:
            self._train_batch_size = extract_batch_size(batch)
        except MisconfigurationException:
            self._train_batch_size = DEFAULT_PRESERVATION_BATCH
            rank_zero_warn(
                "[sgsc] no batch size found in the training batch; preservation batches of"
                f" {DEFAULT_PRESERVATION_BATCH}. Pass `Preservation(batch_size=...)` to choose."
            )

    @property
    def effective_batch_size(self) -> int:
        """``batch_size``, or the training batch size capped at ``DEFAULT_PRESERVATION_BATCH``."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        return min(DEFAULT_PRESERVATION_BATCH, self._train_batch_size or DEFAULT_PRESERVATION_BATCH)

    def due(self, global_step: int) -> bool:
        """Whether this step adds a preservation term (a set exists and the step is an ``every_n_steps``-th)."""
        return self.set is not None and global_step % self.settings.every_n_steps == 0

    def _check_forward(self, pl_module: Any, batch: Any) -> None:
        """What a check of the set runs: the term's loss, and the label loss the metric and restores use."""
        self._loss(pl_module, batch)
        if self.loss == "distill":
            pl_module.preservation_step(batch)

    def term(self, pl_module: Any) -> Tensor:
        """The preservation loss on the next preservation batch (see the module docstring)."""
        return self._loss(pl_module, self.next_batch())

    def _loss(self, pl_module: Any, batch: Any) -> Tensor:
        if self.loss == "labels":
            return pl_module.preservation_step(batch)
        with torch.no_grad(), float_weights(pl_module):
            teacher = self._classes_last(pl_module.preservation_outputs(batch))
        student = self._classes_last(pl_module.preservation_outputs(batch))
        return distillation_loss(student, teacher, self.settings.temperature)

    def _classes_last(self, outputs: Tensor) -> Tensor:
        """Dense outputs carry their classes on axis 1; the distillation term compares the last axis."""
        return outputs.movedim(1, -1) if self.modality == "dense" else outputs

    @staticmethod
    def direction(pl_module: Any) -> Direction:
        """Whether a larger metric is better: the module's own ``preservation_metric_mode``."""
        return check_enum(
            f"{type(pl_module).__name__}.preservation_metric_mode", Direction, pl_module.preservation_metric_mode
        )

    def metric(self, trainer: Any, pl_module: Any, recalibrate: bool = True) -> float:
        """The safety signal over the whole set (the model's ``preservation_evaluate``: accuracy by default), in eval
        mode, after recalibrating BatchNorm statistics (``recalibrate``); rank 0's value on every rank (a last-bit
        difference can never split the ranks). Sets :attr:`noise` for an accuracy-like metric: two standard errors
        of the difference of two binomial measurements over the set (``2 * sqrt(2 p (1 - p) / n)``; the loop compares
        this measurement with an earlier one, each with its own noise): a drop within it is not evidence of a loss."""
        with torch.inference_mode(False), torch.no_grad(), eval_mode(pl_module):
            if recalibrate:
                self.recalibrate(pl_module)
            value = float(pl_module.preservation_evaluate(self.evaluation_batches()))
        n = len(self.set) if self.set is not None else 0
        accuracy_like = self.direction(pl_module) is Direction.MAX and 0.0 <= value <= 1.0 and n > 0
        self.noise = binomial_noise(value, n) if accuracy_like else 0.0
        self.noise = float(trainer.strategy.broadcast(self.noise, src=0))
        return float(trainer.strategy.broadcast(value, src=0))

    def recalibrate(self, pl_module: Any) -> int:
        """Recomputes the BatchNorm statistics of ``pl_module`` on the set, for its weights as they are now
        (:func:`~lightning_sgsc.norms.recalibrate_norms_`). Returns the number of norms recalibrated."""
        if self.set is None:
            return 0
        with torch.inference_mode(False), torch.no_grad():
            return recalibrate_norms_(pl_module, self.evaluation_batches(), pl_module.preservation_outputs)

    def restore_scores(self, pl_module: Any, bits: float) -> dict[str, Tensor]:
        """Per zero-bit channel, the first-order change of the label loss (``preservation_step``, what the metric
        judges) if the channel came back at ``bits``."""
        return taylor_restore_scores(pl_module, self.evaluation_batches(), bits, loss=pl_module.preservation_step)

    def next_batch(self) -> Any:
        """The next preservation batch (seeded shuffled passes over the set), already on the model's device."""
        if self._sampler is None:
            assert self.set is not None
            self._sampler = self.set.sampler(self.effective_batch_size, self.seed, draws=self._draws)
        return next(self._sampler)

    @property
    def draws(self) -> int:
        """Preservation batches drawn so far over the whole run (resumes included)."""
        return self._sampler.draws if self._sampler is not None else self._draws

    def evaluation_batches(self) -> Iterator[Any]:
        """The whole set once, in order (for the metric and the restore scores)."""
        assert self.set is not None
        return self.set.batches(max(self.effective_batch_size, EVALUATION_BATCH))

    # ------------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "chosen_by": list(self.chosen_by), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = state.get("indices")
        self.chosen_by = list(state.get("chosen_by", []))
        self._draws = int(state.get("draws", 0))
        self._sampler = None
