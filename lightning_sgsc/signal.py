"""A measured metric as both decision makers see it: its direction, its reference, its noise. Pure Python.

The feedback loop (:mod:`.feedback`) and the budget controller (:mod:`.budget`) both ask the same questions of a
metric: is a larger value better (:class:`Direction`), how much worse is this value than the reference
(:meth:`Reference.drop`), and how much could it have moved by chance (the noise estimators below). The direction is
taken from wherever the signal comes from: the user's ``monitor``/``mode``, or the module's own
``preservation_metric_mode`` for the preservation metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Direction(str, Enum):
    """Whether a larger value of a metric is better (accuracy: ``"max"``) or a smaller one (loss: ``"min"``)."""

    MAX = "max"
    MIN = "min"

    def worse_by(self, value: float, reference: float) -> float:
        """How much worse ``value`` is than ``reference``, in the metric's units (negative: better)."""
        return reference - value if self is Direction.MAX else value - reference

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return self.worse_by(a, b) < 0


@dataclass
class Reference:
    """What a metric is compared with: the first value measured (``policy="first"``) or the best so far
    (``"best"``, never made worse). ``value`` is ``None`` until the first update (or a given value)."""

    direction: Direction
    policy: str = "best"
    value: float | None = None

    def drop(self, value: float, relative: bool = False) -> float:
        """How much worse ``value`` is than the reference (relative: as a share of it); 0 without a reference."""
        if self.value is None:
            return 0.0
        worse = self.direction.worse_by(value, self.value)
        return worse / abs(self.value) if relative else worse

    def update(self, value: float) -> bool:
        """Takes ``value`` as the reference when there is none yet, or when it is better and the policy is
        ``"best"``. Returns whether the reference changed. Non-finite values never become the reference."""
        if not math.isfinite(value):
            return False
        if self.value is None or (self.policy == "best" and self.direction.better(value, self.value)):
            self.value = value
            return True
        return False


def binomial_noise(accuracy: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies measured on the same ``n`` examples,
    ``2 sqrt(2 p (1 - p) / n)`` (``p (1 - p)`` at least ``1 / n``): what comparing two measurements can move by from
    the sample alone."""
    if n <= 0:
        return 0.0
    return 2.0 * math.sqrt(2.0 * max(accuracy * (1.0 - accuracy), 1.0 / n) / n)


class DifferenceNoise:
    """The standard deviation of one measurement, estimated from successive differences and smoothed
    exponentially: ``|x_t - x_(t-1)| * sqrt(pi) / 2`` estimates ``sd * sqrt(2)``. A learning trend counts as noise
    here (see :class:`TrendFreeNoise`)."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.value = 0.0
        self.last: float | None = None

    def update(self, metric: float) -> float:
        if self.last is not None:
            a = self.smoothing
            self.value = a * self.value + (1 - a) * abs(metric - self.last) * math.sqrt(math.pi) / 2 / math.sqrt(2)
        self.last = metric
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.value, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.last = state["noise"], state["last"]


class TrendFreeNoise(DifferenceNoise):
    """The standard deviation of one measurement from second differences, ``x_t - 2 x_(t-1) + x_(t-2)``: a trend
    that is locally linear (a model still learning, or recovering) cancels, white measurement noise of sd ``s`` gives
    differences of sd ``s sqrt(6)``, and ``E|N(0, v)| = v sqrt(2 / pi)``. Smoothed exponentially like
    :class:`DifferenceNoise`; until three values are seen, the first-difference estimate stands in."""

    def __init__(self, smoothing: float = 0.5) -> None:
        super().__init__(smoothing)
        self.before: float | None = None

    def update(self, metric: float) -> float:
        if self.before is None or self.last is None:
            self.before = self.last
            return super().update(metric)
        a = self.smoothing
        second = abs(metric - 2 * self.last + self.before)
        self.value = a * self.value + (1 - a) * second * math.sqrt(math.pi / 2) / math.sqrt(6)
        self.before, self.last = self.last, metric
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.before = state.get("before")
