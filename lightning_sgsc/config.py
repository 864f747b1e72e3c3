"""Typed, validated settings. Each dataclass checks itself in ``__post_init__``; the callback builds them from its
flat keyword arguments (so LightningCLI and Hydra see plain, typed arguments)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule

#: A constant, or a function of the epoch (Lightning's ``ModelPruning.amount`` convention).
Schedule = float | Callable[[int], float]


class MetricMode(str, Enum):
    """Whether a larger preservation metric is better (accuracy) or a smaller one (loss)."""

    MAX = "max"
    MIN = "min"


class ReferencePolicy(str, Enum):
    """What the preservation metric is compared against: the best value seen so far, or the first one measured."""

    BEST = "best"
    FIRST = "first"


def _enum(arg: str, cls: type[Enum], value: object) -> Enum:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise SGSCValueError(describe_rule(arg, f"one of {allowed}", value)) from None


def _number(arg: str, value: object, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise SGSCValueError(describe_rule(arg, "a finite number", value))
    v = float(value)
    if v < lo or (lo_open and v == lo) or v > hi:
        left = "(" if lo_open else "["
        right = "]" if math.isfinite(hi) else ")"
        raise SGSCValueError(describe_rule(arg, f"in {left}{lo:g}, {hi:g}{right}", value))
    return v


def check_int(arg: str, value: object, lo: int, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``lo`` (or None when allowed); otherwise the package's error naming ``arg``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        rule = f"an integer >= {lo}" + (" or None" if allow_none else "")
        raise SGSCValueError(describe_rule(arg, rule, value))
    return value


def resolve_schedule(arg: str, value: Schedule, epoch: int, lo: float, hi: float = math.inf) -> float:
    """Evaluates a constant-or-callable argument at ``epoch`` and checks the result lies in ``[lo, hi]``."""
    v = value(epoch) if callable(value) else value
    return _number(f"{arg}({epoch})" if callable(value) else arg, v, lo, hi)


@dataclass
class QuantizationConfig:
    """Which layers get twins, and at what starting bit depth.

    Args:
        init_bits: starting bit depth of every channel, 2 to 16.
        include: fnmatch patterns of layer names to swap (default: every Conv1d/Conv2d/Linear).
        exclude: fnmatch patterns of layer names to keep in float.
        init_headroom: bits of room above each channel's largest weight at the start, 0 to ``init_bits - 2``
            (``None``: 2, or ``init_bits - 2`` if less).
        lr: learning rate of ``bits`` and ``exponent`` (the callback's ``quantizer_lr``), > 0.
        compile: run the fused quantizer's arithmetic through ``torch.compile`` (``compile_quantizer``).
    """

    init_bits: float = 8.0
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    init_headroom: float | None = None
    lr: float = 0.01
    compile: bool = False

    def __post_init__(self) -> None:
        _number("init_bits", self.init_bits, 2, 16)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise SGSCValueError(describe_rule("quantizer_lr", "a number > 0", self.lr))
        if not isinstance(self.compile, bool):
            raise SGSCTypeError(describe_rule("compile_quantizer", "True or False", self.compile))
        from lightning_sgsc.quant.modules import resolve_headroom

        resolve_headroom(self.init_bits, self.init_headroom)
        for arg in ("include", "exclude"):
            value = getattr(self, arg)
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise SGSCTypeError(describe_rule(arg, "a list of fnmatch patterns such as ['features.*']", value))


@dataclass
class LossWeights:
    """Weights of the compression terms added to the task loss. All must be >= 0.

    Args:
        l1_weight: weight of the mean absolute weight (L1) term.
        bit_weight: weight of the average bits per weight (the size penalty, ``gamma`` in the paper).
        preservation_weight: weight of the loss on a preservation batch; needs preservation data.
    """

    l1_weight: Schedule = 0.0
    bit_weight: Schedule = 0.01
    preservation_weight: Schedule = 1.0

    def __post_init__(self) -> None:
        for arg in ("l1_weight", "bit_weight", "preservation_weight"):
            value = getattr(self, arg)
            if not callable(value):
                _number(arg, value, 0.0)

    def at(self, epoch: int) -> dict[str, float]:
        """The three weights at ``epoch`` (schedules evaluated and checked), keyed like the loss terms. Evaluated once
        per epoch and per change of the weights: this runs on every training step."""
        key = (epoch, self.l1_weight, self.bit_weight, self.preservation_weight)
        cached = self.__dict__.get("_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_cache"] = (
                key,
                {
                    "l1": resolve_schedule("l1_weight", self.l1_weight, epoch, 0.0),
                    "bits": resolve_schedule("bit_weight", self.bit_weight, epoch, 0.0),
                    "preservation": resolve_schedule("preservation_weight", self.preservation_weight, epoch, 0.0),
                },
            )
        return cached[1]


@dataclass
class FeedbackConfig:
    """The restore-and-prune loop.

    Args:
        threshold: largest allowed degradation of the preservation metric against the reference (absolute, in
            the metric's units: 0.02 = two accuracy points, or 0.02 nats of loss). A larger drop restores channels.
        restore_fraction: fraction of the zero-bit (unpruned) channels restored when the metric degraded, (0, 1].
        restore_bits: bit depth given to a restored channel, 1 to 16.
        min_channels: channels each quantized layer keeps at least; pruning never goes below it.
        mode: ``"max"`` (accuracy-like metric) or ``"min"`` (loss-like metric).
        reference: ``"best"`` (compare against the best value seen) or ``"first"`` (against the first one).
        prune: whether zero-bit channels become permanent when the metric held.
    """

    threshold: float = 0.02
    restore_fraction: float = 0.25
    restore_bits: float = 2.0
    min_channels: int = 1
    mode: MetricMode | str = MetricMode.MAX
    reference: ReferencePolicy | str = ReferencePolicy.BEST
    prune: bool = True

    def __post_init__(self) -> None:
        _number("threshold", self.threshold, 0.0)
        _number("restore_fraction", self.restore_fraction, 0.0, 1.0, lo_open=True)
        _number("restore_bits", self.restore_bits, 1.0, 16.0)
        check_int("min_channels", self.min_channels, 0)
        self.mode = _enum("mode", MetricMode, self.mode)  # type: ignore[assignment]
        self.reference = _enum("reference", ReferencePolicy, self.reference)  # type: ignore[assignment]
