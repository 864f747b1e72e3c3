"""The budget in a fit: reading the monitored metric, steering ``bit_weight``, the cool-down, the best state.

The callback's glue for :mod:`lightning_sgsc.budget` (the pure controller). It reads only public Trainer attributes
(``callback_metrics``, ``strategy``, ``global_step``, ``estimated_stepping_batches``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sgsc.budget import BudgetConfig, BudgetTracker, Check
from lightning_sgsc.config import LossWeights, _number
from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.quant.modules import quantizer_parameters
from lightning_sgsc.size import model_size

MAX_HISTORY = 1000  # budget checks kept in the history (and the checkpoint)


class BudgetHooks:
    """A budget on the callback (inactive when none of ``max_drop``, ``target_bytes``, ``target_bits_per_weight`` is
    set; the cool-down works with or without one).

    Args:
        max_drop: the largest allowed drop of ``monitor`` below the reference: the smallest model within it.
        monitor: a metric the validation loop logs (``"val/acc"``); ``None``: the preservation metric.
        mode: ``"max"`` or ``"min"``: whether a larger ``monitor`` is better (required with ``monitor``).
        drop_type: ``"absolute"`` (in the metric's units) or ``"relative"`` (a share of the reference).
        reference_value: the float model's value, when known (e.g. its validation accuracy); ``None``: the best
            smoothed value seen, from the warm-up on (see :mod:`lightning_sgsc.budget`).
        target_bytes: a size budget: the most accurate model of at most these bytes.
        target_bits_per_weight: a size budget in average bits per weight instead.
        budget_warmup_checks: checks trained without the size term first (at least 1 without ``reference_value``).
        cooldown_fraction: the last share of training steps with the size term off, ``bits``/``exponent`` frozen and no
            restore or prune, so the weights settle at their final precision; with a budget, only the cool-down's
            checks compete for the state held at fit end.
        best_state_path: also write the best state within the budget to this file each time it changes (rank zero;
            a relative path is under the Trainer's ``default_root_dir``, e.g. next to your ``ModelCheckpoint``'s):
            ``{"state_dict": ..., "sgsc_best": {metric, bytes, ...}}``, for ``module.load_state_dict(f["state_dict"])``.
            A state kept before the cool-down stays in the file until a cool-down state within the budget replaces it.
        keep_best: at fit end the module holds the best state within the budget (else the last one); if no state
            met it, a warning names the closest state seen (the least over the budget), which the module then holds.
        bit_weight: the callback's ``bit_weight``: the controller's starting weight (a constant > 0 with a budget).
    """

    def __init__(
        self,
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
        bit_weight: Any = 0.01,
    ) -> None:
        if (monitor is None) != (mode is None):
            raise SGSCValueError(describe_rule("mode", "'max' or 'min' exactly when `monitor` is given", mode))
        if max_drop is None and target_bytes is None and target_bits_per_weight is None:
            for name, value in (
                ("monitor", monitor),
                ("reference_value", reference_value),
                ("best_state_path", best_state_path),
            ):
                if value is not None:  # nothing is silently ignored
                    raise SGSCValueError(
                        describe_rule(
                            name, "None without a budget (max_drop, target_bytes or target_bits_per_weight)", value
                        )
                    )
        config = BudgetConfig(
            max_drop,
            drop_type,
            mode or "max",
            reference_value,
            target_bytes,
            target_bits_per_weight,
            budget_warmup_checks,
        )
        self.monitor, self.keep_best, self.cooling = monitor, bool(keep_best), False
        if best_state_path is not None and not isinstance(best_state_path, (str, os.PathLike)):
            raise SGSCTypeError(describe_rule("best_state_path", "a file path (str) or None", best_state_path))
        self.best_state_path = Path(best_state_path) if best_state_path is not None else None
        self._frozen = False  # the quantizer parameters are frozen for the cool-down (not checkpointed: redone)
        self.last: Check | None = None
        self.repaired = 0
        self.history: list[dict[str, Any]] = []  # every check: what the controller saw and did (newest last)
        self.cooldown_fraction = _number("cooldown_fraction", cooldown_fraction, 0.0, 1.0)
        if config.active and (callable(bit_weight) or not bit_weight > 0):
            raise SGSCValueError(
                describe_rule("bit_weight", "a constant > 0 (the budget's starting weight)", bit_weight)
            )
        self.tracker = BudgetTracker(config, float(bit_weight)) if config.active else None

    @property
    def violated(self) -> bool:
        """Whether the last check found the (smoothed) metric over the budget: the feedback loop then prunes
        nothing, and :meth:`check` repaired precision."""
        return self.last is not None and not self.last.warming_up and self.last.slack < 0

    def check(
        self,
        trainer: Any,
        pl_module: Any,
        history: list[dict[str, Any]],
        weights: LossWeights,
        repair: Callable[[], int] | None = None,
    ) -> None:
        """One budget check after a validation (``callback_metrics`` hold its metrics by then): steer
        ``weights.bit_weight``, keep the best state, and call ``repair`` (precision back to the low-bit channels that
        cost the most; returns how many) when the accuracy budget is violated. ``history``: the feedback events (the
        preservation metric is the signal without a ``monitor``)."""
        if self.tracker is None:
            return
        if self.monitor is None:
            if not history or history[-1]["epoch"] != trainer.current_epoch:
                return  # the preservation metric is the signal: none until the set exists
            value = history[-1]["metric"]
        elif self.monitor not in trainer.callback_metrics:
            logged = sorted(k for k in trainer.callback_metrics if not k.startswith("sgsc/"))
            raise SGSCValueError(
                describe_rule("monitor", f"a metric the validation loop logs ({logged})", self.monitor)
            )
        else:
            value = float(trainer.strategy.broadcast(float(trainer.callback_metrics[self.monitor]), src=0))

        def snapshot() -> dict[str, Any]:
            return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

        size = model_size(pl_module)
        kept = self.tracker.best
        check = self.tracker.observe(
            value, size.total_bytes, size.bits_per_weight, trainer.global_step, snapshot, steer=not self.cooling
        )
        self.last = check
        if self.best_state_path is not None and self.tracker.best is not kept and self.tracker.best_state is not None:
            self._write_best(trainer)
        if self.cooling:
            self.repaired = 0
        else:
            weights.bit_weight = check.weight
            self.repaired = repair() if repair is not None and self.violated else 0
        entry = {**dataclasses.asdict(check), "step": trainer.global_step, "bytes": size.total_bytes}
        self.history = [*self.history, {**entry, "repaired": self.repaired, "cooling": self.cooling}][-MAX_HISTORY:]

    def summary(self) -> dict[str, Any] | None:
        """What a report needs of the budget: the reference, the state kept (or the closest seen), every check."""
        if self.tracker is None:
            return None
        ctl = self.tracker.controller
        return {
            "reference": ctl.reference,
            "best": self.tracker.best,
            "closest": self.tracker.closest,
            "bit_weight": ctl.weight,
            "checks": list(self.history),
        }

    def metrics(self) -> dict[str, float]:
        """What the callback logs of the budget (under ``sgsc/``): the weight in force, the last check's slack, the
        bytes of the best state kept."""
        if self.tracker is None or self.last is None:
            return {}
        out = {
            "sgsc/bit_weight": self.last.weight,
            "sgsc/budget_slack": self.last.slack,
            "sgsc/repaired_channels": float(self.repaired),
        }
        if self.tracker.best is not None:
            out["sgsc/best_bytes"] = float(self.tracker.best["bytes"])
        return out

    def _write_best(self, trainer: Any) -> None:
        """The best state within the budget to ``best_state_path`` (rank zero; written whole, then renamed)."""
        if not trainer.is_global_zero or self.tracker is None or self.best_state_path is None:
            return
        path = Path(trainer.default_root_dir) / self.best_state_path  # an absolute path stays as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save({"state_dict": self.tracker.best_state, "sgsc_best": dict(self.tracker.best or {})}, partial)
        partial.replace(path)  # a crash mid-write never leaves a truncated file under the user's name

    def maybe_cool_down(self, trainer: Any, pl_module: Any, weights: LossWeights) -> None:
        """From ``(1 - cooldown_fraction)`` of the training steps on: size term off, bit depths frozen, from the state
        as it is. Only the cool-down's own checks are candidates for the state held at fit end: their weights have
        settled at the final precision (a state kept before is forgotten, see :meth:`BudgetTracker.start_over`)."""
        if not self.cooldown_fraction:
            return
        if self.cooling:  # once per fit, also after a resume into the cool-down (not on every step)
            if not self._frozen:
                weights.bit_weight = 0.0
                for param in quantizer_parameters(pl_module):
                    param.requires_grad_(False)
                self._frozen = True
            return
        if trainer.global_step < (1 - self.cooldown_fraction) * trainer.estimated_stepping_batches:
            return
        self.cooling = True
        if self.tracker is not None:
            self.tracker.start_over()
        self.maybe_cool_down(trainer, pl_module, weights)
        rank_zero_info(f"[sgsc] cool-down from step {trainer.global_step}: size term off, bit depths frozen")

    def on_fit_end(self, pl_module: Any) -> None:
        """Bit depths trainable again; the best state within the budget into the module (``keep_best``)."""
        for param in quantizer_parameters(pl_module):
            param.requires_grad_(True)
        self._frozen = False
        if self.tracker is None:
            return
        if self.tracker.best_state is None:
            held = self.keep_best and self.tracker.closest_state is not None
            if held:
                pl_module.load_state_dict(self.tracker.closest_state)
            rank_zero_warn(
                f"[sgsc] no state met the budget; the closest seen: {self.tracker.closest}"
                + ("; the module holds it." if held else "; the module keeps its last state.")
            )
        elif self.keep_best:
            pl_module.load_state_dict(self.tracker.best_state)
            rank_zero_info(f"[sgsc] the module holds the smallest state within the budget: {self.tracker.best}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict() if self.tracker else None,
            "cooling": self.cooling,
            "last": dataclasses.asdict(self.last) if self.last is not None else None,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any] | None, weights: LossWeights) -> None:
        if not state:
            return
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
            weights.bit_weight = self.tracker.controller.weight
        self.cooling = bool(state.get("cooling", False))
        self.last = Check(**state["last"]) if state.get("last") else None
        self.history = [dict(h) for h in state.get("history", [])]
