"""Budgets: the smallest model whose metric stays within a stated drop, or the best one within a stated size.

Pure logic, no Trainer in here: each check returns a verdict (:class:`Verdict`) and the callback applies it.

:class:`BudgetController` steers the size-penalty weight (``bit_weight``, the Lagrange multiplier of the budget) once
per check, in log space. A small controller of our own rather than Cooper's dual optimizers: the constraint is judged
once per validation on a noisy metric, not per step on a differentiable one.

* **accuracy budget** (``max_drop``): the slack is ``max_drop - drop``, ``drop`` being how much worse the smoothed
  metric (an exponential moving average) is than the reference (absolute, or relative to it). Room beyond the noise
  raises the weight (compress more); a violation beyond the noise lowers it twice as fast (safety first), unless the
  metric is still improving; within the noise the weight holds. The noise is the metric's measurement noise, from
  second differences, so a learning trend does not count as noise (:class:`~lightning_sgsc.signal.TrendFreeNoise`).
* **size budget** (``target_bytes`` / ``target_bits_per_weight``): the slack is the share of the target left;
  over the target the weight rises, well under it the weight falls (the most accurate model within that size).

Each step is ``step * min(1, |slack| / max_drop)`` in ``log(weight)``; the weight stays within ``[weight0 / 1000,
weight0 * 1000]``. The first ``warmup_checks`` checks train without the size term (the weight is 0).

Without a ``reference_value`` one fit does it all, in three phases: **reference** (size term off) until the metric is
on its plateau (:class:`~lightning_sgsc.signal.Plateau`: the gain its trend projects over the next checks is within
the measurement noise, or within half the budget), at least ``warmup_checks`` checks and at most ``reference_fraction``
of the training steps; then **compress** within the budget; then the **cool-down** (the callback's). The reference is
the best smoothed value seen, raised (never lowered) by any later better value: the float model would have improved
too.

A check is *within* the budget when its measurement is and its smoothed value is by a margin of the noise, so the
state kept is not one lucky measurement (winner's curse); the first measurement, with no noise estimate yet, never
is. :class:`BudgetTracker` says which state to keep (the smallest within the budget; for a size budget the most
accurate; while none met it, the closest), and :class:`CoolDown` when the last share of the fit begins. Every state
dict round-trips for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_sgsc.config import Budget
from lightning_sgsc.errors import SGSCValueError, describe_rule
from lightning_sgsc.signal import Direction, Plateau, Reference, TrendFreeNoise

STEP = 0.5
"""Largest change of ``log(bit_weight)`` per check when raising it (lowering: twice this)."""

SMOOTHING = 0.5
"""Weight of the past in the exponential moving average of the metric."""

NOISE_SMOOTHING = 0.8
"""Weight of the past in the average of the metric's noise (a spread is estimated from more checks than a level)."""

PHASES = ("reference", "compress", "cooldown")
"""A budgeted fit's phases, in order (logged as ``sgsc/phase``, their index)."""


@dataclass(frozen=True)
class Check:
    """What one controller update saw and decided."""

    metric: float
    smoothed: float
    noise: float
    reference: float | None
    drop: float
    slack: float
    weight: float
    within: bool
    warming_up: bool
    phase: str = "compress"
    """``"reference"`` (size term off, the reference being found), ``"compress"`` or ``"cooldown"``."""

    @property
    def violated(self) -> bool:
        """Over the budget (smoothed), after the warm-up: nothing is pruned for good, precision is repaired."""
        return not self.warming_up and self.slack < 0


class BudgetController:
    """The size-penalty weight, steered to a budget (see the module docstring).

    Args:
        budget: what the budget is.
        direction: whether a larger value of the budget's metric is better.
        initial_weight: the starting weight (the callback's ``losses.bit_weight``), > 0.
    """

    def __init__(
        self,
        budget: Budget,
        direction: Direction,
        initial_weight: float,
        step: float = STEP,
        smoothing: float = SMOOTHING,
    ) -> None:
        if isinstance(initial_weight, bool) or not isinstance(initial_weight, (int, float)) or not initial_weight > 0:
            raise SGSCValueError(describe_rule("losses.bit_weight", "a constant > 0 with a budget", initial_weight))
        self.budget, self.direction = budget, Direction(direction)
        self.step, self.smoothing = step, smoothing
        self.initial_weight = float(initial_weight)
        self.log_weight = math.log(initial_weight)
        self.reference = Reference(self.direction, "best", budget.reference_value)
        self.noise = TrendFreeNoise(NOISE_SMOOTHING)
        self.plateau = Plateau(self.direction)
        self.smoothed: float | None = None
        self.checks = 0
        # the reference phase is over (always, with a given reference or a size budget)
        self.fixed = budget.kind != "accuracy" or budget.reference_value is not None

    @property
    def warming_up(self) -> bool:
        """The size term is off during the first ``warmup_checks`` checks of an accuracy budget and, without a
        ``reference_value``, until the reference is fixed at the metric's plateau."""
        return self.budget.kind == "accuracy" and (self.checks < self.budget.warmup_checks or not self.fixed)

    @property
    def phase(self) -> str:
        """``"reference"`` while warming up, else ``"compress"`` (the cool-down is the caller's to say)."""
        return "reference" if self.warming_up else "compress"

    @property
    def weight(self) -> float:
        """The size-penalty weight to train with now (0 during the warm-up)."""
        return 0.0 if self.warming_up else math.exp(self.log_weight)

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the reference (relative: as a share of it)."""
        return self.reference.drop(value, relative=self.budget.drop_type == "relative")

    @property
    def noise_measured(self) -> bool:
        """Whether the noise has an estimate yet: the first measurement has none (not a zero one)."""
        return self.noise.count > 0

    def noise_margin(self) -> float:
        """How far inside the budget the smoothed value must be to count as within it beyond doubt: the measurement
        noise, in the budget's unit (a share of the reference for a relative drop)."""
        ref = self.reference.value
        if self.budget.drop_type == "relative" and ref:
            return self.noise.value / abs(ref)
        return self.noise.value

    def _plateau_tolerance(self) -> float:
        """How much further gain still counts as the plateau: the measurement noise, or half the budget (a gain the
        budget absorbs), whichever is larger; in the metric's units."""
        half = 0.5 * float(self.budget.max_drop or 0.0)
        if self.budget.drop_type == "relative":
            half *= abs(self.smoothed or 0.0)
        return max(self.noise.value, half)

    def _fix_reference(self, metric: float, steer: bool, progress: float | None) -> None:
        """In the reference phase: whether this check ends it (the plateau, after ``warmup_checks`` checks; or
        ``reference_fraction`` of the steps gone; or the cool-down begun)."""
        flat = self.plateau.update(metric, self._plateau_tolerance(), self.noise.value)
        late = progress is not None and progress >= self.budget.reference_fraction
        if (flat and self.checks >= self.budget.warmup_checks) or late or not steer:
            self.fixed = True
            self.reference.value = self.smoothed

    def update(
        self, metric: float, size: float | None = None, steer: bool = True, progress: float | None = None
    ) -> Check:
        """One check: the metric (and, for a size budget, the size in the budget's unit); returns the verdict.
        ``steer=False`` (the cool-down): judge the check, leave the weight as it is. ``progress``: the share of the
        training steps done (ends the reference phase at ``reference_fraction``)."""
        if not math.isfinite(metric):
            ref = self.reference.value
            phase = self.phase if steer else "cooldown"
            return Check(metric, math.nan, self.noise.value, ref, math.nan, math.nan, self.weight, False, False, phase)
        a = self.smoothing
        noise = self.noise.update(metric)
        previous = self.smoothed
        self.smoothed = metric if previous is None else a * previous + (1 - a) * metric
        # still improving (by more than half the noise since the last check): a model that is learning, or recovering
        # from the last change of bit depths, is not lowered for being below the budget yet
        improving = (
            previous is not None
            and self.direction.better(self.smoothed, previous)
            and abs(self.smoothed - previous) > 0.5 * noise
        )
        warming = self.warming_up  # this check was trained without the size term
        self.checks += 1
        kind = self.budget.kind
        if kind == "accuracy" and self.budget.reference_value is None and self.fixed:
            self.reference.update(self.smoothed)  # the best smoothed value seen: the budget only gets stricter
        ref = self.reference.value
        if warming:
            if not self.fixed:
                self._fix_reference(metric, steer, progress)
            return Check(metric, self.smoothed, noise, ref, 0.0, 0.0, 0.0, False, True, "reference")
        if kind == "accuracy":
            drop, slack, within = self._steer_accuracy(metric, steer, improving)
        elif kind == "size":
            drop, slack, within = self._steer_size(size, steer)
        else:
            drop, slack, within = 0.0, 0.0, True
        low, high = math.log(self.initial_weight / 1000), math.log(self.initial_weight * 1000)
        self.log_weight = min(max(self.log_weight, low), high)
        phase = "compress" if steer else "cooldown"
        return Check(metric, self.smoothed, noise, ref, drop, slack, self.weight, within, False, phase)

    def _steer_accuracy(self, metric: float, steer: bool, improving: bool) -> tuple[float, float, bool]:
        max_drop = float(self.budget.max_drop or 0.0)
        assert self.smoothed is not None
        drop = self.drop(self.smoothed)
        slack = max_drop - drop
        margin = self.noise_margin()
        if steer and slack < -margin and not improving:
            # over the budget beyond the noise, and not recovering: lower, twice as fast as it rises (safety first)
            self.log_weight -= 2.0 * self.step * min(1.0, -slack / max_drop)
        elif steer and slack > margin:  # room beyond the noise: compress more; within it: hold
            self.log_weight += self.step * min(1.0, slack / max_drop)
        # met beyond doubt: the measurement within the budget, and the smoothed value by a margin of the noise; the
        # first measurement has no noise estimate yet (not a zero one), so it cannot be beyond doubt
        within = self.noise_measured and self.drop(metric) <= max_drop and drop <= max_drop - margin
        return drop, slack, within

    def _steer_size(self, size: float | None, steer: bool) -> tuple[float, float, bool]:
        target = float(self.budget.target_bytes or self.budget.target_bits_per_weight or 0)
        if size is None:
            raise SGSCValueError(describe_rule("size", "the model's size for a size budget", size))
        slack = (target - size) / target
        if steer and (slack < 0 or slack > 0.05):  # over the target, or more than 5 % under it
            self.log_weight -= self.step * max(-1.0, min(1.0, slack / 0.5))
        return 0.0, slack, size <= target

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_weight": self.log_weight,
            "reference": self.reference.value,
            "smoothed": self.smoothed,
            **self.noise.state_dict(),
            "noise": self.noise.value,
            "checks": self.checks,
            "fixed": self.fixed,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_weight, self.smoothed, self.checks = state["log_weight"], state["smoothed"], state["checks"]
        self.reference.value = state["reference"]
        self.noise.load_state_dict(state)
        # a 0.3 checkpoint has no phase: its warm-up ended after `warmup_checks` checks
        self.fixed = bool(state.get("fixed", self.fixed or self.checks >= self.budget.warmup_checks))
        if "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])


@dataclass(frozen=True)
class Verdict:
    """One budget check's outcome for the callback to apply: the weight to train with, whether the budget is
    violated, and whether this state is to be kept (``"best"``: the best within the budget so far; ``"closest"``: the
    nearest to it while none met it; ``None``)."""

    check: Check
    keep: str | None = None
    record: dict[str, float] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        return self.check.weight

    @property
    def violated(self) -> bool:
        return self.check.violated


class BudgetTracker:
    """The controller plus the best state within the budget (no Trainer in here either).

    :meth:`observe` takes one check's metric and the model's size and returns a :class:`Verdict`; the caller stores
    the state the verdict names with :meth:`keep`. A state is kept when its check met the budget beyond doubt and it
    is better than the best kept so far: smaller for an accuracy budget, more accurate for a size budget. While no
    state met it, the check nearest the budget is kept instead (:attr:`closest`, :attr:`closest_state`).
    """

    def __init__(
        self, budget: Budget, direction: Direction, initial_weight: float, smoothing: float = SMOOTHING
    ) -> None:
        self.budget = budget
        self.controller = BudgetController(budget, direction, initial_weight, smoothing=smoothing)
        self.best_state: dict[str, Any] | None = None
        self.best: dict[str, float] | None = None  # metric, bytes, bits_per_weight, drop, step of the state kept
        self.closest: dict[str, float] | None = None  # the check nearest the budget, while none met it
        self.closest_state: dict[str, Any] | None = None
        self.reference_step: int | None = None  # the step at which the reference phase ended
        self.narrowest_margin: float | None = None  # the smallest noise margin of the checks judged (accuracy budget)
        self.judged = 0  # checks judged since the states began to compete (the fit, or the cool-down)
        self.doubtful = 0  # of those: inside the budget on the smoothed value, not by the noise margin

    def observe(
        self,
        metric: float,
        nbytes: float,
        bits_per_weight: float,
        step: int,
        steer: bool = True,
        progress: float | None = None,
    ) -> Verdict:
        """One check (see the class docstring). ``steer=False``: the weight stays (the cool-down); ``progress``: the
        share of the training steps done."""
        size = nbytes if self.budget.target_bytes is not None else bits_per_weight
        check = self.controller.update(metric, size, steer, progress)
        if self.reference_step is None and self.budget.kind == "accuracy" and not self.controller.warming_up:
            self.reference_step = step  # the size term is on from the next step
        if check.warming_up or not math.isfinite(metric):
            return Verdict(check)
        seen = {"metric": metric, "bytes": nbytes, "bits_per_weight": bits_per_weight, "drop": check.drop, "step": step}
        max_drop = self.budget.max_drop
        if self.budget.kind == "accuracy":
            margin = self.controller.noise_margin()
            self.judged += 1
            self.doubtful += int(not check.within and 0 <= check.slack < margin)
            if self.controller.noise_measured and (self.narrowest_margin is None or margin < self.narrowest_margin):
                self.narrowest_margin = margin
        if self.best is not None and max_drop is not None and self.controller.drop(self.best["metric"]) > max_drop:
            self._demote_best()  # the reference rose since that state was kept: by today's reference it is over
        if check.within:
            if self.best is None or self._preferred(metric, nbytes):
                return Verdict(check, "best", seen)
        elif self.best is None and (self.closest is None or not check.slack <= self.closest["slack"]):
            return Verdict(check, "closest", {**seen, "slack": check.slack})
        return Verdict(check)

    def keep(self, verdict: Verdict, state: dict[str, Any]) -> None:
        """Stores ``state`` as the verdict says (the model's state at that check)."""
        if verdict.keep == "best":
            self.best, self.best_state = dict(verdict.record), state
            self.closest_state = None  # a state within the budget exists: the fallback is not needed
        elif verdict.keep == "closest":
            self.closest, self.closest_state = dict(verdict.record), state

    def _demote_best(self) -> None:
        """The kept state becomes the closest one (the fallback) and no state counts as within the budget."""
        if self.best is not None:
            max_drop = self.budget.max_drop
            slack = max_drop - self.best["drop"] if max_drop is not None else math.nan
            self.closest, self.closest_state = {**self.best, "slack": slack}, self.best_state
        self.best, self.best_state = None, None

    def start_over(self) -> None:
        """Forgets the state kept (the cool-down: from now on only states at the final precision compete); the state
        that was kept becomes the :attr:`closest` one, held at the end if none of the new ones meets the budget and
        none comes nearer to it."""
        self._demote_best()
        self.judged = self.doubtful = 0

    def why_none_met(self) -> str | None:
        """Why no state met an accuracy budget, when the measurement noise is the reason (else None). A check is
        within the budget when its smoothed drop is at most ``max_drop`` less the noise margin: checks inside the
        budget by less than the margin could not be told from its edge, and a margin as wide as the budget leaves
        room for no state short of the reference. Checks all over the budget: the noise is not the reason."""
        max_drop = self.budget.max_drop
        if self.best is not None or self.budget.kind != "accuracy" or max_drop is None or not self.doubtful:
            return None
        reason = (
            f"{self.doubtful} of {self.judged} checks were within the budget (max_drop={max_drop:g}) on their smoothed"
            " value, by less than the noise margin"
        )
        if self.narrowest_margin is not None and self.narrowest_margin >= max_drop:
            reason += (
                f", which never fell below {self.narrowest_margin:.4g}, as wide as the budget: no state short of the"
                " reference could count as within it"
            )
        return reason + "; a larger max_drop, or a steadier monitor (more validation data), lets states qualify"

    def _preferred(self, metric: float, nbytes: float) -> bool:
        """Whether a state within the budget beats the one kept: for an accuracy budget, smaller (by more than 1 %),
        or as small and better; for a size budget, better."""
        assert self.best is not None
        better = self.controller.direction.better(metric, self.best["metric"])
        if self.budget.kind != "accuracy":
            return better
        return nbytes < 0.99 * self.best["bytes"] or (nbytes <= 1.01 * self.best["bytes"] and better)

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "best": self.best,
            "best_state": self.best_state,
            "closest": self.closest,
            "closest_state": self.closest_state,
            "reference_step": self.reference_step,
            "narrowest_margin": self.narrowest_margin,
            "judged": self.judged,
            "doubtful": self.doubtful,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.best, self.best_state, self.closest = state["best"], state["best_state"], state["closest"]
        self.closest_state = state.get("closest_state")
        self.reference_step = state.get("reference_step")
        self.narrowest_margin = state.get("narrowest_margin")
        self.judged, self.doubtful = state.get("judged", 0), state.get("doubtful", 0)


class CoolDown:
    """The last ``fraction`` of the training steps: size term off, bit depths frozen, no restore or prune.

    :meth:`starts_now` says, once, when it begins; :attr:`active` stays true from then on (and through a resume).
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self.active = False

    def starts_now(self, step: int, total_steps: float) -> bool:
        """Whether the cool-down begins at ``step`` of ``total_steps`` (true once per fit)."""
        if self.active or not self.fraction or step < (1 - self.fraction) * total_steps:
            return False
        self.active = True
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("active", False))
