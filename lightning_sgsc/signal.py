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


class TrendFreeNoise:
    """The standard deviation of one measurement from second differences, ``x_t - 2 x_(t-1) + x_(t-2)``: a trend
    that is locally linear (a model still learning, or recovering) cancels, white measurement noise of sd ``s`` gives
    differences of sd ``s sqrt(6)``, and ``E|N(0, v)| = v sqrt(2 / pi)``. Averaged exponentially with the start-up bias
    corrected (as Adam's moments), so neither the first checks nor one lucky pair of them read as "no noise"; until
    three values are seen, the first difference stands in."""

    def __init__(self, smoothing: float = 0.8) -> None:
        self.smoothing = smoothing
        self.raw, self.count = 0.0, 0
        self.last: float | None = None
        self.before: float | None = None

    @property
    def value(self) -> float:
        """The current estimate (0 before two values)."""
        return self.raw / (1 - self.smoothing**self.count) if self.count else 0.0

    def update(self, metric: float) -> float:
        if self.last is not None:
            if self.before is None:  # two values: the first difference, sd s sqrt(2)
                sample = abs(metric - self.last) * math.sqrt(math.pi / 2) / math.sqrt(2)
            else:
                sample = abs(metric - 2 * self.last + self.before) * math.sqrt(math.pi / 2) / math.sqrt(6)
            a = self.smoothing
            self.raw, self.count = a * self.raw + (1 - a) * sample, self.count + 1
        self.before, self.last = self.last, metric
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"noise_raw": self.raw, "noise_count": self.count, "last": self.last, "before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self.before = state["last"], state.get("before")
        if "noise_raw" in state:
            self.raw, self.count = state["noise_raw"], state["noise_count"]
        else:  # a 0.3 checkpoint: its first-difference estimate, taken as settled
            self.raw, self.count = state["noise"], 10**6


def linear_trend(values: list[float]) -> float:
    """The slope, per check, of the least-squares line through ``values`` (equally spaced); 0 for fewer than 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx


class Plateau:
    """Whether a metric has stopped improving, judged against its measurement noise rather than its trend.

    The question is whether training as long again would still pay: a line is fitted by least squares to the later
    half of the values seen (at least ``window``), and the metric is on its plateau when the gain that line projects
    over as many checks again as have been seen, plus one standard error of that projection (from the measurement
    noise), is no more than a tolerance (the caller's: the measurement noise from :class:`TrendFreeNoise`, or the
    share of a budget a further gain may take). Flat beyond doubt, then: a few noisy checks early in a fit cannot tell
    a slow creep from noise, so they do not end it; and the verdict must hold on ``confirm`` successive checks.
    """

    def __init__(self, direction: Direction, window: int = 5, confirm: int = 2) -> None:
        self.direction, self.window, self.confirm = Direction(direction), window, confirm
        self.values: list[float] = []
        self.flat = 0  # successive checks whose fit looked flat

    def gain(self, noise: float = 0.0) -> float:
        """The improvement the fitted line projects over as many checks again as seen (in the metric's units,
        positive: better), plus one standard error of it for measurements of standard deviation ``noise``; ``inf``
        until ``window`` values are seen."""
        n = len(self.values)
        if n < self.window:
            return math.inf
        fitted = max(self.window, n // 2)
        slope = linear_trend(self.values[-fitted:])
        error = noise / math.sqrt(fitted * (fitted**2 - 1) / 12)  # of the slope: sd / sqrt(sum (x - mean x)^2)
        return n * ((slope if self.direction is Direction.MAX else -slope) + error)

    def update(self, value: float, tolerance: float, noise: float = 0.0) -> bool:
        """Adds one check's value; whether the plateau is reached (the projected gain, plus its standard error for
        measurements of standard deviation ``noise``, within ``tolerance`` on ``confirm`` successive checks). A
        non-finite value is skipped."""
        if math.isfinite(value):
            self.values = [*self.values, value]
        self.flat = self.flat + 1 if self.gain(noise) <= tolerance else 0
        return self.flat >= self.confirm

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "flat": self.flat}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values, self.flat = list(state["values"]), int(state["flat"])
