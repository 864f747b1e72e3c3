"""The LightningModule mixin: adds the compression terms to the loss the user's own ``training_step`` returns.

::

    class Net(SafetyGuidedMixin, L.LightningModule):
        def training_step(self, batch, batch_idx):      # unchanged user code
            x, y = batch
            return F.cross_entropy(self(x), y)

How it connects, explicitly:

* The :class:`~lightning_sgsc.callback.SafetyGuidedQuantization` callback announces itself to the module in its
  ``setup`` hook (:meth:`SafetyGuidedMixin.attach_compression`) and withdraws in ``teardown``; the mixin never
  imports or searches for the callback.
* The mixin wraps each ``training_step`` a subclass defines, once, when the class is created
  (``__init_subclass__``). While a callback is attached, the wrapped step returns
  ``task + l1_weight * L1 + bit_weight * bits_per_weight + preservation_weight * preservation_loss`` (each term
  logged on its own); with none attached it returns the user's value untouched, so the same class trains a float
  baseline. Set ``sgsc_auto_terms = False`` on the class to opt out of the wrapping and add
  ``self.compression_loss()`` to your loss yourself.

Manual optimisation: call ``self.compression_loss()`` and add it to your loss before ``manual_backward``; a step
that forgets raises :class:`~lightning_sgsc.errors.SGSCRuntimeError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from torch import Tensor

from lightning_sgsc.errors import SGSCRuntimeError, SGSCTypeError, describe_rule
from lightning_sgsc.losses import classes_first, task_loss
from lightning_sgsc.outputs import main_output


class CompressionHook(Protocol):
    """What the mixin needs from the callback that attaches itself (:meth:`SafetyGuidedMixin.attach_compression`)."""

    def training_step_context(self) -> AbstractContextManager[Any]:
        """Entered around one automatic-optimisation ``training_step`` and its compression terms."""

    def compression_terms(self, pl_module: Any, base: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(base + weighted terms, raw terms)`` for this step."""


def _wrap_training_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def training_step(self: SafetyGuidedMixin, *args: Any, **kwargs: Any) -> Any:
        callback = self._sgsc_callback()
        if callback is None or self._sgsc_depth:  # no callback, or a nested super().training_step call
            return fn(self, *args, **kwargs)
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ costs microseconds on every step
        state["_sgsc_depth"] = 1
        state["_sgsc_called"] = False
        if not self.automatic_optimization:  # type: ignore[attr-defined]
            try:
                out = fn(self, *args, **kwargs)
            finally:
                state["_sgsc_depth"] = 0
            if not self._sgsc_called:
                raise SGSCRuntimeError(
                    "Manual optimization: the compression terms were not added. In `training_step`, add "
                    "`self.compression_loss()` to your loss before `self.manual_backward(loss)`."
                )
            return out
        # Automatic optimisation: no backward or optimizer step happens inside, so every forward of this step (the
        # user's and the preservation batch's) can share one fused quantizer pass.
        with callback.training_step_context():
            try:
                out = fn(self, *args, **kwargs)
            finally:
                state["_sgsc_depth"] = 0
            return self._sgsc_add_terms(out, callback)

    training_step._sgsc_wrapped = True  # type: ignore[attr-defined]
    return training_step


class SafetyGuidedMixin:
    """Adds the L1, bit-depth and preservation terms to the user's loss. Put it before ``LightningModule``.

    Attributes:
        preservation_metric_mode: ``"max"`` when :meth:`preservation_evaluate` returns an accuracy-like value,
            ``"min"`` when it returns a loss (language models); used with ``preservation_loss="labels"``.
    """

    preservation_metric_mode: str = "max"
    sgsc_auto_terms: bool = True
    _sgsc_depth: int = 0
    _sgsc_called: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("training_step")
        if fn is not None and cls.sgsc_auto_terms and not getattr(fn, "_sgsc_wrapped", False):
            cls.training_step = _wrap_training_step(fn)  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, after swapping in twins where ``state_dict`` holds quantizer state
        (:func:`~lightning_sgsc.quant.swap.prepare_for_state_dict`): a checkpoint written under the callback loads
        into a fresh instance, with or without the callback (``Net.load_from_checkpoint``,
        ``trainer.fit(ckpt_path=)``)."""
        from lightning_sgsc.quant.swap import prepare_for_state_dict

        prepare_for_state_dict(self, state_dict)  # type: ignore[arg-type]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]

    def attach_compression(self, hook: CompressionHook | None) -> None:
        """Called by the callback in ``setup`` (``None`` in ``teardown``): the compression terms come from
        ``hook`` while it is attached."""
        self.__dict__["_sgsc_hook"] = hook  # a plain attribute: not a submodule, not in the state dict

    # ---------------------------------------------------------------------------------------------- overridable

    def preservation_step(self, batch: Any) -> Tensor:
        """Label loss on one preservation batch (``preservation.loss="labels"``, and what restores and the metric
        judge). Default: cross entropy of ``self(x)`` (its main output) against ``y`` for ``(x, y)``: class logits,
        token logits or dense scores alike (:func:`~lightning_sgsc.losses.task_loss`; targets of -1 do not count)."""
        x, y = batch[0], batch[1]
        return task_loss(self._sgsc_main(self(x)), y)  # type: ignore[operator]

    def preservation_outputs(self, batch: Any) -> Tensor:
        """The outputs the distillation term compares on one preservation batch (default: the main output of
        ``self(x)`` for ``(x, ...)``; classes last, or on axis 1 for dense outputs). Override to drop positions that do
        not count (padding)."""
        return self._sgsc_main(self(batch[0]))  # type: ignore[operator]

    def preservation_evaluate(self, batches: Iterable[Any]) -> float:
        """The metric over the whole set, the feedback loop's signal (default: top-1 accuracy through torchmetrics,
        over every position whose target is not -1; its direction is :attr:`preservation_metric_mode`)."""
        from torchmetrics.classification import MulticlassAccuracy

        metric: MulticlassAccuracy | None = None
        for batch in batches:
            x, y = batch[0], batch[1]
            logits = classes_first(self._sgsc_main(self(x)), y)  # type: ignore[operator]
            if metric is None:
                metric = MulticlassAccuracy(num_classes=logits.shape[1], average="micro", ignore_index=-1)
                metric = metric.to(logits.device)
            metric.update(logits, y)
        if metric is None:
            raise SGSCRuntimeError("The preservation set is empty: no batch to evaluate.")
        return float(metric.compute())

    def _sgsc_main(self, output: Any) -> Tensor:
        """The tensor of a model output the terms work with (:mod:`lightning_sgsc.outputs`; the callback's
        ``preservation.output_fn`` when set)."""
        hook = self._sgsc_callback()
        settings = getattr(hook, "settings", None)
        return main_output(output, settings.preservation.output_fn if settings is not None else None)

    # ----------------------------------------------------------------------------------------------- the terms

    def _sgsc_callback(self) -> CompressionHook | None:
        return self.__dict__.get("_sgsc_hook")

    def compression_loss(self) -> Tensor:
        """The weighted compression terms for this step (logged one by one). Call it yourself under manual
        optimisation; automatic optimisation adds it for you."""
        callback = self._sgsc_callback()
        if callback is None:
            raise SGSCRuntimeError(
                "`compression_loss()` needs the SafetyGuidedQuantization callback in `Trainer(callbacks=[...])`."
            )
        return self._sgsc_compression(callback, None, self._sgsc_log_now())

    def _sgsc_compression(self, callback: CompressionHook, base: Tensor | None, log_now: bool) -> Tensor:
        """``base`` (or nothing) plus the weighted terms; logs each raw term when ``log_now``. The total is kept for
        the callback's check before the optimizer step (a non-finite loss stops the fit there)."""
        self.__dict__["_sgsc_called"] = True
        total, terms = callback.compression_terms(self, base)
        self.__dict__["_sgsc_last_loss"] = total.detach()
        if log_now:
            for key, value in terms.items():
                name = "train/bits_per_weight" if key == "bits" else f"train/loss_{key}"
                self.log(name, value.detach())  # type: ignore[attr-defined]
        return total

    def _sgsc_log_now(self) -> bool:
        """Log the terms on the steps Lightning's loggers write (``log_every_n_steps``): each ``self.log`` call
        costs about a millisecond on CPU, more than the terms themselves on a small model."""
        trainer = self.trainer  # type: ignore[attr-defined]
        return self.global_step % max(trainer.log_every_n_steps, 1) == 0  # type: ignore[attr-defined]

    def _sgsc_add_terms(self, out: Any, callback: CompressionHook) -> Any:
        if out is None:
            return None
        task = out["loss"] if isinstance(out, dict) else out
        if not isinstance(task, Tensor):
            raise SGSCTypeError(
                describe_rule("training_step output", "a loss Tensor, a dict with a 'loss' Tensor, or None", out)
            )
        log_now = self._sgsc_log_now()
        if log_now:
            self.log("train/loss_task", task.detach())  # type: ignore[attr-defined]
        loss = self._sgsc_compression(callback, task, log_now)
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss
