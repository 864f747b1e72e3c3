"""Budgets: the smallest model whose metric stays within a stated drop, or the best one within a stated size.

Pure logic, no Trainer in here. Not yet wired into the callback (issue 19: in a first end-to-end trial on digits the
reference set by a short warm-up was too early, the noise estimate mixed the metric's trend into its noise, and
channels pruned while the budget was violated could not come back; the wiring waits on those).

:class:`BudgetController` is a controller on the size-penalty weight (``bit_weight``,
the Lagrange multiplier of the budget), updated once per check, in log space:

* **accuracy budget** (``max_drop``): the slack is ``max_drop - drop`` where ``drop`` is how much worse the metric
  is than the reference (absolute, or relative to it). Room left raises the weight (compress more), a violation
  lowers it twice as fast (safety first). The metric is smoothed (an exponential moving average) and its noise
  estimated from successive differences; a slack within that noise changes nothing, so a noisy metric neither makes
  the weight oscillate nor collapses it.
* **size budget** (``target_bytes`` / ``target_bits_per_weight``): the slack is the share of the target left;
  over the target the weight rises, well under it the weight falls (the most accurate model within that size).

Each step is ``step * clip(slack / scale, -1, 1)`` in ``log(weight)`` (doubled when lowering for an accuracy
violation), the weight stays within ``[weight0 / 1000, weight0 * 1000]``. Without a ``reference``, the first
``warmup`` checks (the size term off) establish it: the best smoothed value seen then.

:meth:`BudgetController.within` says whether a check met the budget *with a margin of the measurement's noise*, so
the best state kept is not one lucky measurement (winner's curse); the state dicts round-trip for exact resume.
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
        """Checks that establish the reference (the size term off): only while no reference is known."""
        return self.config.kind == "accuracy" and self.config.reference is None and self.checks < self.config.warmup

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

    def update(self, metric: float, size: float | None = None) -> Check:
        """One check: the metric (and, for a size budget, the size in the budget's unit); returns what was done."""
        if not math.isfinite(metric):
            return Check(metric, math.nan, self.noise, self.reference, math.nan, math.nan, self.weight, False, False)
        a = self.config.smoothing
        if self.last is not None:  # |difference| of two draws, times sqrt(pi)/2, estimates sd * sqrt(2): one draw's sd
            self.noise = a * self.noise + (1 - a) * abs(metric - self.last) * math.sqrt(math.pi) / 2 / math.sqrt(2)
        self.last = metric
        self.smoothed = metric if self.smoothed is None else a * self.smoothed + (1 - a) * metric
        warming = self.warming_up
        self.checks += 1
        if warming:
            better = self.config.mode == "max"
            if self.reference is None or (self.smoothed > self.reference if better else self.smoothed < self.reference):
                self.reference = self.smoothed
            return Check(metric, self.smoothed, self.noise, self.reference, 0.0, 0.0, 0.0, False, True)
        kind = self.config.kind
        if kind == "accuracy":
            assert self.config.max_drop is not None
            drop = self.drop(self.smoothed)
            slack = self.config.max_drop - drop
            margin = self._noise_margin()
            if abs(slack) > margin:  # outside the noise: act
                e = max(-1.0, min(1.0, slack / self.config.max_drop))
                self.log_weight += self.config.step * e * (2.0 if e < 0 else 1.0)
            within = self.drop(metric) <= self.config.max_drop and drop <= self.config.max_drop - margin
        elif kind == "size":
            target = float(self.config.target_bytes or self.config.target_bits_per_weight or 0)
            if size is None:
                raise SGSCValueError(describe_rule("size", "the model's size for a size budget", size))
            drop, slack = 0.0, (target - size) / target
            if slack < 0 or slack > 0.05:  # over the target, or more than 5 % under it
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
