"""Budgets: the smallest model whose metric stays within a stated drop, or the best one within a stated size.

Pure logic, no Trainer in here. :class:`BudgetController` is a controller on the size-penalty weight (``bit_weight``,
the Lagrange multiplier of the budget), updated once per check, in log space. A small controller of our own rather
than Cooper's dual optimizers: the constraint is judged once per validation on a noisy metric, not per step on a
differentiable one, and what it needs (a dead band of the noise, patience while the model improves, a cool-down, the
best state kept) is a few lines of plain Python that checkpoint as numbers.

* **accuracy budget** (``max_drop``): the slack is ``max_drop - drop``, ``drop`` being how much worse the smoothed
  metric (an exponential moving average) is than the reference (absolute, or relative to it). Room beyond the noise
  raises the weight (compress more); a violation beyond the noise lowers it twice as fast (safety first), unless the
  metric is still improving (a model that is learning, or recovering after its bit depths moved, is not punished for
  being below the reference yet); within the noise the weight holds, so a noisy metric neither makes it oscillate nor
  collapses it. The noise is estimated from successive differences of the metric.
* **size budget** (``target_bytes`` / ``target_bits_per_weight``): the slack is the share of the target left;
  over the target the weight rises, well under it the weight falls (the most accurate model within that size).

Each step is ``step * min(1, |slack| / max_drop)`` in ``log(weight)``; the weight stays within ``[weight0 / 1000,
weight0 * 1000]``. The first ``warmup`` checks train without the size term. Without a ``reference`` the best smoothed
value seen stands for the float model's: set during the warm-up, raised (never lowered) by any later better value.

A check is *within* the budget when its measurement is and its smoothed value is by a margin of the noise, so the
state kept is not one lucky measurement (winner's curse). :class:`BudgetTracker` keeps the smallest such state (for a
size budget: the most accurate); :meth:`BudgetTracker.start_over` makes only later states compete (the cool-down).
The state dicts round-trip for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_sgsc.errors import SGSCValueError, describe_rule

DROP_TYPES = ("absolute", "relative")


@dataclass(frozen=True)
class BudgetConfig:
    """What the budget is (see the module docstring)."""

    max_drop: float | None = None
    drop_type: str = "absolute"
    mode: str = "max"
    reference: float | None = None
    target_bytes: int | None = None
    target_bits_per_weight: float | None = None
    warmup: int = 1
    step: float = 0.5
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        sizes = [v for v in (self.target_bytes, self.target_bits_per_weight) if v is not None]
        if self.max_drop is not None and sizes:
            raise SGSCValueError(
                describe_rule("max_drop", "None when target_bytes or target_bits_per_weight is set", self.max_drop)
                + " Budget either the metric's drop or the size, not both."
            )
        if len(sizes) > 1:
            raise SGSCValueError(
                describe_rule("target_bits_per_weight", "None when target_bytes is set", self.target_bits_per_weight)
            )
        if self.max_drop is not None and not (isinstance(self.max_drop, (int, float)) and self.max_drop > 0):
            raise SGSCValueError(describe_rule("max_drop", "a number > 0 (or None)", self.max_drop))
        if self.drop_type not in DROP_TYPES:
            raise SGSCValueError(describe_rule("drop_type", f"one of {DROP_TYPES}", self.drop_type))
        if self.mode not in ("max", "min"):
            raise SGSCValueError(describe_rule("mode", "'max' or 'min'", self.mode))
        for name in ("target_bytes", "target_bits_per_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SGSCValueError(describe_rule(name, "a number > 0 (or None)", value))
        if self.reference is not None and not (
            isinstance(self.reference, (int, float)) and math.isfinite(self.reference)
        ):
            raise SGSCValueError(describe_rule("reference_value", "a finite number (or None)", self.reference))
        if self.drop_type == "relative" and self.reference == 0:
            raise SGSCValueError(describe_rule("reference_value", "not 0 for a relative drop", self.reference))
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise SGSCValueError(describe_rule("budget_warmup_checks", "an integer >= 0", self.warmup))
        if self.max_drop is not None and self.reference is None and self.warmup == 0:
            raise SGSCValueError(
                describe_rule("budget_warmup_checks", ">= 1 when no reference_value is given", self.warmup)
                + " The reference is established during the warm-up (size term off)."
            )

    @property
    def active(self) -> bool:
        return self.max_drop is not None or self.target_bytes is not None or self.target_bits_per_weight is not None

    @property
    def kind(self) -> str:
        """``"accuracy"``, ``"size"`` or ``"none"``."""
        if self.max_drop is not None:
            return "accuracy"
        return "size" if self.active else "none"


@dataclass(frozen=True)
class Check:
    """What one controller update saw and did."""

    metric: float
    smoothed: float
    noise: float
    reference: float | None
    drop: float
    slack: float
    weight: float
    within: bool
    warming_up: bool


class BudgetController:
    """The size-penalty weight, steered to a budget (see the module docstring)."""

    def __init__(self, config: BudgetConfig, initial_weight: float) -> None:
        if not initial_weight > 0:
            raise SGSCValueError(describe_rule("bit_weight", "a constant > 0 with a budget", initial_weight))
        self.config = config
        self.initial_weight = float(initial_weight)
        self.log_weight = math.log(initial_weight)
        self.reference = config.reference
        self.smoothed: float | None = None
        self.last: float | None = None
        self.noise = 0.0
        self.checks = 0

    @property
    def warming_up(self) -> bool:
        """The size term is off during the first ``warmup`` checks of an accuracy budget (they establish the
        reference when none is given)."""
        return self.config.kind == "accuracy" and self.checks < self.config.warmup

    @property
    def weight(self) -> float:
        """The size-penalty weight to train with now (0 during the warm-up)."""
        return 0.0 if self.warming_up else math.exp(self.log_weight)

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the reference (relative: as a share of it)."""
        assert self.reference is not None
        worse = self.reference - value if self.config.mode == "max" else value - self.reference
        return worse / abs(self.reference) if self.config.drop_type == "relative" else worse

    def _noise_margin(self) -> float:
        if self.config.drop_type == "relative" and self.reference:
            return self.noise / abs(self.reference)
        return self.noise

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.config.mode == "max" else a < b

    def update(self, metric: float, size: float | None = None, steer: bool = True) -> Check:
        """One check: the metric (and, for a size budget, the size in the budget's unit); returns what was done.
        ``steer=False`` (the cool-down): judge the check, leave the weight as it is."""
        if not math.isfinite(metric):
            return Check(metric, math.nan, self.noise, self.reference, math.nan, math.nan, self.weight, False, False)
        a = self.config.smoothing
        if self.last is not None:  # |difference| of two draws, times sqrt(pi)/2, estimates sd * sqrt(2): one draw's sd
            self.noise = a * self.noise + (1 - a) * abs(metric - self.last) * math.sqrt(math.pi) / 2 / math.sqrt(2)
        self.last = metric
        previous = self.smoothed
        self.smoothed = metric if self.smoothed is None else a * self.smoothed + (1 - a) * metric
        # still improving (by more than half the noise since the last check): a model that is learning, or recovering
        # from the last change of bit depths, is not lowered for being below the budget yet
        improving = (
            previous is not None
            and self._better(self.smoothed, previous)
            and abs(self.smoothed - previous) > 0.5 * self.noise
        )
        warming = self.warming_up  # this check was trained without the size term
        self.checks += 1
        kind = self.config.kind
        if kind == "accuracy":
            assert self.config.max_drop is not None
            unset = self.config.reference is None
            if unset and (self.reference is None or self._better(self.smoothed, self.reference)):
                # no reference given: the best smoothed value seen stands for the float model's, during the warm-up
                # and after it (a later, better value raises it, never lowers it: the budget only gets stricter).
                self.reference = self.smoothed
        if warming:
            return Check(metric, self.smoothed, self.noise, self.reference, 0.0, 0.0, 0.0, False, True)
        if kind == "accuracy":
            assert self.config.max_drop is not None
            drop = self.drop(self.smoothed)
            slack = self.config.max_drop - drop
            if steer and slack < -self._noise_margin() and not improving:
                # over the budget beyond the noise, and not recovering: lower, twice as fast as it rises (safety first)
                self.log_weight -= 2.0 * self.config.step * min(1.0, -slack / self.config.max_drop)
            elif steer and slack > self._noise_margin():  # room beyond the noise: compress more; within it: hold
                self.log_weight += self.config.step * min(1.0, slack / self.config.max_drop)
            # met beyond doubt: the measurement within the budget, and the smoothed value by a margin of the noise
            within = self.drop(metric) <= self.config.max_drop and drop <= self.config.max_drop - self._noise_margin()
        elif kind == "size":
            target = float(self.config.target_bytes or self.config.target_bits_per_weight or 0)
            if size is None:
                raise SGSCValueError(describe_rule("size", "the model's size for a size budget", size))
            drop, slack = 0.0, (target - size) / target
            if steer and (slack < 0 or slack > 0.05):  # over the target, or more than 5 % under it
                self.log_weight -= self.config.step * max(-1.0, min(1.0, slack / 0.5))
            within = size <= target
        else:
            drop, slack, within = 0.0, 0.0, True
        low, high = math.log(self.initial_weight / 1000), math.log(self.initial_weight * 1000)
        self.log_weight = min(max(self.log_weight, low), high)
        return Check(metric, self.smoothed, self.noise, self.reference, drop, slack, self.weight, within, False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_weight": self.log_weight,
            "reference": self.reference,
            "smoothed": self.smoothed,
            "last": self.last,
            "noise": self.noise,
            "checks": self.checks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("log_weight", "reference", "smoothed", "last", "noise", "checks"):
            setattr(self, key, state[key])


class BudgetTracker:
    """The controller plus the best state within the budget, for the callback (no Trainer in here either).

    :meth:`observe` takes one check's metric, the model's size and a function returning a copy of the model's
    state; it updates the controller and keeps that copy when the check met the budget beyond doubt and is better than
    the best kept so far: smaller for an accuracy budget, more accurate for a size budget. While no state met it, the
    check nearest the budget is kept instead (:attr:`closest`, :attr:`closest_state`), so a fit whose budget nothing
    met can still end on its least bad state rather than its last.
    """

    def __init__(self, config: BudgetConfig, initial_weight: float) -> None:
        self.config = config
        self.controller = BudgetController(config, initial_weight)
        self.best_state: dict[str, Any] | None = None
        self.best: dict[str, float] | None = None  # metric, bytes, bits_per_weight, drop, step of the state kept
        self.closest: dict[str, float] | None = None  # the check nearest the budget, while none met it
        self.closest_state: dict[str, Any] | None = None

    def observe(
        self,
        metric: float,
        nbytes: float,
        bits_per_weight: float,
        step: int,
        snapshot: Any,
        steer: bool = True,
    ) -> Check:
        """One check (see the class docstring). ``steer=False``: the weight stays (the cool-down)."""
        size = nbytes if self.config.target_bytes is not None else bits_per_weight
        check = self.controller.update(metric, size, steer)
        if check.warming_up or not math.isfinite(metric):
            return check
        seen = {"metric": metric, "bytes": nbytes, "bits_per_weight": bits_per_weight, "drop": check.drop, "step": step}
        ctl = self.controller
        max_drop = ctl.config.max_drop
        if self.best is not None and max_drop is not None and ctl.drop(self.best["metric"]) > max_drop:
            # the reference rose since that state was kept: by today's reference it is over the budget
            self._demote_best()
        if check.within:
            if self.best is None or self._preferred(metric, nbytes):
                self.best, self.best_state = seen, snapshot()
                self.closest_state = None  # a state within the budget exists: the fallback is not needed
        elif self.best is None and (self.closest is None or not check.slack <= self.closest["slack"]):
            self.closest, self.closest_state = {**seen, "slack": check.slack}, snapshot()
        return check

    def _demote_best(self) -> None:
        """The kept state becomes the closest one (the fallback) and no state counts as within the budget."""
        if self.best is not None:
            max_drop = self.config.max_drop
            slack = max_drop - self.best["drop"] if max_drop is not None else math.nan
            self.closest, self.closest_state = {**self.best, "slack": slack}, self.best_state
        self.best, self.best_state = None, None

    def start_over(self) -> None:
        """Forgets the state kept (the cool-down: from now on only states at the final precision compete); the state
        that was kept becomes the :attr:`closest` one, held at the end if none of the new ones meets the budget and
        none comes nearer to it."""
        self._demote_best()

    def _preferred(self, metric: float, nbytes: float) -> bool:
        """Whether a state within the budget beats the one kept: for an accuracy budget, smaller (by more than 1 %),
        or as small and better; for a size budget, better."""
        assert self.best is not None
        better = self.controller._better(metric, self.best["metric"])
        if self.config.kind != "accuracy":
            return better
        return nbytes < 0.99 * self.best["bytes"] or (nbytes <= 1.01 * self.best["bytes"] and better)

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "best": self.best,
            "best_state": self.best_state,
            "closest": self.closest,
            "closest_state": self.closest_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.best, self.best_state, self.closest = state["best"], state["best_state"], state["closest"]
        self.closest_state = state.get("closest_state")
