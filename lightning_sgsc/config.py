"""The callback's settings: one validated, documented dataclass per concern.

``SafetyGuidedQuantization(quantization=Quantization(...), losses=Losses(...), preservation=Preservation(...),
feedback=Feedback(...), budget=Budget(...))``. Each class is the single place where its arguments, their defaults and
their help live: ``help()``, the LightningCLI (``--trainer.callbacks.budget.max_drop``) and the Hydra schema
(``sgsc.budget.max_drop=``) all read them from here. Each checks itself in ``__post_init__`` and names a bad field
by its dotted path (``budget.max_drop``), as a config or the command line spells it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule

#: A constant, or a function of the epoch (Lightning's ``ModelPruning.amount`` convention).
Schedule = float | Callable[[int], float]

#: The most bits a channel computes with: bit depths are bounded by construction (the quantizer clamps them), so
#: nothing trained, restored or repaired needs more than the file format's 16 bits per integer.
MAX_BITS = 16.0
MIN_INIT_BITS = 2.0


class ReferencePolicy(str, Enum):
    """What the preservation metric is compared against: the best value seen so far, or the first one measured."""

    BEST = "best"
    FIRST = "first"


# ------------------------------------------------------------------------------------------------- validators


def check_enum(arg: str, cls: type[Enum], value: object) -> Any:
    """``cls(value)``, or the package's error listing the allowed values."""
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise SGSCValueError(describe_rule(arg, f"one of {allowed}", value)) from None


def check_number(arg: str, value: object, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """``value`` as a float within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
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


def check_bool(arg: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SGSCTypeError(describe_rule(arg, "True or False", value))
    return value


def check_patterns(arg: str, value: object) -> None:
    if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):  # type: ignore[attr-defined]
        raise SGSCTypeError(describe_rule(arg, "a list of fnmatch patterns such as ['features.*']", value))


def resolve_schedule(arg: str, value: Schedule, epoch: int, lo: float, hi: float = math.inf) -> float:
    """Evaluates a constant-or-callable argument at ``epoch`` and checks the result lies in ``[lo, hi]``."""
    v = value(epoch) if callable(value) else value
    return check_number(f"{arg}({epoch})" if callable(value) else arg, v, lo, hi)


def resolve_headroom(init_bits: float, init_headroom: float | None, arg: str = "quantization.init_headroom") -> float:
    """``init_headroom``, or for ``None`` the default: 2 bits, or ``init_bits - 2`` when that is less (a 2-bit start
    has no room to spare: with any headroom its largest weights would round to zero)."""
    limit = float(init_bits) - MIN_INIT_BITS
    if init_headroom is None:
        return min(2.0, limit)
    if (
        isinstance(init_headroom, bool)
        or not isinstance(init_headroom, (int, float))
        or not 0 <= init_headroom <= limit
    ):
        raise SGSCValueError(
            describe_rule(arg, f"a number from 0 to init_bits - 2 = {limit:g} (or None)", init_headroom)
        )
    return float(init_headroom)


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Quantization:
    """Which weights get a learned quantizer, and how it starts.

    Args:
        init_bits: starting bit depth of every channel, 2 to 16.
        include: fnmatch patterns of layer names to quantize (``None``: every supported layer).
        exclude: fnmatch patterns of layer names to leave in float.
        init_headroom: bits of room above each channel's largest weight at the start, 0 to ``init_bits - 2``
            (``None``: 2, or ``init_bits - 2`` if less): weights grow early on, and a clipped one gets no gradient.
        lr: learning rate of the ``bits``/``exponent`` param group (``weight_decay`` 0 there), > 0.
        compile: run the quantizer's arithmetic through ``torch.compile`` (needs a compiler toolchain).
    """

    init_bits: float = 8.0
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    init_headroom: float | None = None
    lr: float = 0.01
    compile: bool = False

    def __post_init__(self) -> None:
        check_number("quantization.init_bits", self.init_bits, MIN_INIT_BITS, MAX_BITS)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise SGSCValueError(describe_rule("quantization.lr", "a number > 0", self.lr))
        check_bool("quantization.compile", self.compile)
        resolve_headroom(self.init_bits, self.init_headroom)
        check_patterns("quantization.include", self.include)
        check_patterns("quantization.exclude", self.exclude)


@dataclass(frozen=True)
class Losses:
    """Weights of the terms added to the task loss; each a constant >= 0 or a function of the epoch.

    Args:
        l1_weight: weight of the mean absolute weight (L1) term.
        bit_weight: weight of the average bits per weight (the size penalty). With a budget, the controller's
            starting weight (a constant > 0).
        preservation_weight: weight of the preservation term (``None``: 1 when there is a preservation set, else 0).
    """

    l1_weight: Schedule = 0.0
    bit_weight: Schedule = 0.01
    preservation_weight: Schedule | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not callable(value):
                check_number(f"losses.{f.name}", value, 0.0)

    def at(self, epoch: int, has_preservation: bool) -> dict[str, float]:
        """The three weights at ``epoch``, keyed like the loss terms (schedules evaluated and checked)."""
        preservation = self.preservation_weight
        if preservation is None:
            preservation = 1.0 if has_preservation else 0.0
        return {
            "l1": resolve_schedule("losses.l1_weight", self.l1_weight, epoch, 0.0),
            "bits": resolve_schedule("losses.bit_weight", self.bit_weight, epoch, 0.0),
            "preservation": resolve_schedule("losses.preservation_weight", preservation, epoch, 0.0),
        }


PRESERVATION_LOSSES = ("distill", "labels")
MODALITIES = ("auto", "image", "text", "tokens", "dense")


@dataclass(frozen=True)
class Preservation:
    """The preservation set: which training examples the compressed model must keep right, and its loss term.

    Args:
        size: examples in the set (0: no set, no preservation term, no feedback loop).
        data: a ``PreservationSet``, ``Dataset`` or ``DataLoader`` to use as the set (``None``: chosen from the
            training data by the strategies of ``fractions``).
        source: the data the set is chosen from (``None``: the training set; never pass the test split).
        fractions: share of the set per strategy (``gradcam``, ``uncertainty``, ``kmeans``, ``random``), summing to 1
            (``None``: a third each of the first three; a strategy the model cannot use is dropped with a warning).
        warmup_epochs: training epochs before the set is scored and chosen (0: at the start).
        pool: candidates scored, a seeded random subset of the training data (``None``: all).
        balance_classes: cap each class at ``ceil(size / classes)`` examples.
        batch_size: batch of the preservation term (``None``: the training batch, at most 32).
        every_n_steps: add the preservation term on every n-th training step only.
        loss: ``"distill"`` (keep the compressed model's outputs those of its float weights) or ``"labels"`` (cross
            entropy on the set's labels).
        temperature: softmax temperature of the distillation term, > 0.
        recalibrate_norms: recompute BatchNorm statistics on the set before each measurement and after each
            restore.
        modality: what the model does: ``"auto"`` (read off its inputs and outputs), ``"image"`` (class logits of
            float inputs), ``"text"`` (class logits of token ids), ``"tokens"`` (next-token logits) or ``"dense"``
            (per-position class scores, e.g. segmentation).
        target_layer: name of the Grad-CAM layer (``None``: the last Conv2d).
        output_fn: which tensor of the model's output are its logits, ``output_fn(output) -> Tensor`` (``None``: the
            ``logits`` of a ``ModelOutput`` or dict, else the first tensor; see :mod:`lightning_sgsc.outputs`).
    """

    size: int = 256
    data: Any = None
    source: Any = None
    fractions: dict[str, float] | None = None
    warmup_epochs: int = 1
    pool: int | None = 10_000
    balance_classes: bool = False
    batch_size: int | None = None
    every_n_steps: int = 8
    loss: str = "distill"
    temperature: float = 1.0
    recalibrate_norms: bool = True
    modality: str = "auto"
    target_layer: str | None = None
    output_fn: Any = None

    def __post_init__(self) -> None:
        from torch.utils.data import DataLoader, Dataset

        from lightning_sgsc.preservation.build import check_fractions
        from lightning_sgsc.preservation.set import PreservationSet

        if self.data is not None and not isinstance(self.data, (Dataset, DataLoader, PreservationSet)):
            rule = "a PreservationSet, torch Dataset or DataLoader (or None)"
            raise SGSCTypeError(describe_rule("preservation.data", rule, type(self.data)))
        if self.source is not None and not isinstance(self.source, (Dataset, DataLoader)):
            raise SGSCTypeError(
                describe_rule("preservation.source", "a torch Dataset or DataLoader (or None)", type(self.source))
            )
        check_int("preservation.size", self.size, 0)
        check_int("preservation.batch_size", self.batch_size, 1, allow_none=True)
        check_int("preservation.warmup_epochs", self.warmup_epochs, 0)
        check_int("preservation.pool", self.pool, 1, allow_none=True)
        check_int("preservation.every_n_steps", self.every_n_steps, 1)
        if self.fractions is not None:
            check_fractions(self.fractions, arg="preservation.fractions")
        if self.loss not in PRESERVATION_LOSSES:
            raise SGSCValueError(describe_rule("preservation.loss", f"one of {PRESERVATION_LOSSES}", self.loss))
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or self.temperature <= 0
        ):
            raise SGSCValueError(describe_rule("preservation.temperature", "a number > 0", self.temperature))
        check_bool("preservation.balance_classes", self.balance_classes)
        check_bool("preservation.recalibrate_norms", self.recalibrate_norms)
        if self.modality not in MODALITIES:
            raise SGSCValueError(describe_rule("preservation.modality", f"one of {MODALITIES}", self.modality))
        if self.output_fn is not None and not callable(self.output_fn):
            raise SGSCTypeError(
                describe_rule("preservation.output_fn", "a function of the output (or None)", self.output_fn)
            )
        if self.target_layer is not None and not isinstance(self.target_layer, str):
            raise SGSCTypeError(
                describe_rule("preservation.target_layer", "a module name (or None)", self.target_layer)
            )

    @property
    def enabled(self) -> bool:
        """Whether there will be a set: data given, or a size > 0 to choose one."""
        return self.data is not None or self.size > 0


@dataclass(frozen=True)
class Feedback:
    """The restore-and-prune loop on the preservation set.

    Args:
        threshold: largest allowed drop of the preservation metric below its reference before channels are
            restored (in the metric's units: 0.02 = two accuracy points, or 0.02 nats); a drop must also exceed the
            measurement's own noise.
        restore_fraction: fraction of the zero-bit channels restored when the metric dropped, (0, 1].
        restore_bits: bit depth of a restored channel, 1 to 16 (a repair over a budget gives 2 more, at most 16).
        min_channels: channels every quantized layer keeps at least.
        prune: make zero-bit channels permanent when the metric held.
        reference: ``"best"`` or ``"first"``: what the preservation metric is compared with.
        max_history: feedback events and budget checks kept (and checkpointed); the oldest go first.
    """

    threshold: float = 0.02
    restore_fraction: float = 0.25
    restore_bits: float = 2.0
    min_channels: int = 1
    prune: bool = True
    reference: str = "best"
    max_history: int = 1000

    def __post_init__(self) -> None:
        check_number("feedback.threshold", self.threshold, 0.0)
        check_number("feedback.restore_fraction", self.restore_fraction, 0.0, 1.0, lo_open=True)
        check_number("feedback.restore_bits", self.restore_bits, 1.0, MAX_BITS)
        check_int("feedback.min_channels", self.min_channels, 0)
        check_bool("feedback.prune", self.prune)
        check_enum("feedback.reference", ReferencePolicy, self.reference)
        check_int("feedback.max_history", self.max_history, 1)

    @property
    def repair_bits(self) -> float:
        """Bits a repair over a budget gives a low-bit channel: ``restore_bits + 2`` (at most 16)."""
        return min(self.restore_bits + 2.0, MAX_BITS)


DROP_TYPES = ("absolute", "relative")


@dataclass(frozen=True)
class Budget:
    """A budget instead of a fixed size penalty: the callback steers ``losses.bit_weight`` so the model gets as small
    as it can while a metric stays within ``max_drop`` of its reference (or as accurate as it can within a size).

    Args:
        max_drop: the largest allowed drop of the monitored metric below its reference (``None``: no accuracy
            budget).
        monitor: a metric the validation loop logs (``"val/acc"``); ``None``: the preservation set's metric (then
            its direction is the module's ``preservation_metric_mode``).
        mode: ``"max"`` or ``"min"``: whether a larger ``monitor`` is better (required with ``monitor``).
        drop_type: ``"absolute"`` (in the metric's units) or ``"relative"`` (a share of the reference).
        reference_value: the float model's value, when known (e.g. its validation accuracy); ``None``: found in the
            same fit: the size term stays off until the metric reaches its plateau (its trend gains no more than its
            measurement noise, or half the budget), and the reference is the best smoothed value seen, raised by any
            later better one.
        target_bytes: a size budget: the most accurate model of at most these bytes.
        target_bits_per_weight: a size budget in average bits per weight instead.
        warmup_checks: checks trained without the size term first (at least 1 without ``reference_value``; then the
            fewest checks before the plateau may fix the reference).
        reference_fraction: without ``reference_value``: the share of the training steps by which the reference is
            fixed at the latest, plateau or not (less than ``1 - cooldown_fraction``).
        cooldown_fraction: the last share of the training steps with the size term off, bit depths frozen and no
            restore or prune, so the weights settle at their final precision; with a budget, only the cool-down's
            checks compete for the state held at fit end. Works without a budget too.
        keep_best: at fit end the module holds the best state within the budget (if none met it, the closest one
            seen, with a warning); ``False``: its last state.
        best_state_path: also write the best state within the budget to this file each time it changes (rank zero;
            relative to the Trainer's ``default_root_dir``): ``{"state_dict": ..., "sgsc_best": {...}}``.
    """

    max_drop: float | None = None
    monitor: str | None = None
    mode: str | None = None
    drop_type: str = "absolute"
    reference_value: float | None = None
    target_bytes: int | None = None
    target_bits_per_weight: float | None = None
    warmup_checks: int = 1
    reference_fraction: float = 0.5
    cooldown_fraction: float = 0.0
    keep_best: bool = True
    best_state_path: str | None = None

    def __post_init__(self) -> None:
        import os

        if (self.monitor is None) != (self.mode is None):
            raise SGSCValueError(
                describe_rule("budget.mode", "'max' or 'min' exactly when `monitor` is given", self.mode)
            )
        if self.mode is not None and self.mode not in ("max", "min"):
            raise SGSCValueError(describe_rule("budget.mode", "'max' or 'min'", self.mode))
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise SGSCTypeError(describe_rule("budget.monitor", "a metric name (str) or None", self.monitor))
        sizes = [v for v in (self.target_bytes, self.target_bits_per_weight) if v is not None]
        if self.max_drop is not None and sizes:
            raise SGSCValueError(
                describe_rule(
                    "budget.max_drop", "None when target_bytes or target_bits_per_weight is set", self.max_drop
                )
                + " Budget either the metric's drop or the size, not both."
            )
        if len(sizes) > 1:
            rule = "None when target_bytes is set"
            raise SGSCValueError(describe_rule("budget.target_bits_per_weight", rule, self.target_bits_per_weight))
        for name in ("max_drop", "target_bytes", "target_bits_per_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise SGSCValueError(describe_rule(f"budget.{name}", "a number > 0 (or None)", value))
        if self.drop_type not in DROP_TYPES:
            raise SGSCValueError(describe_rule("budget.drop_type", f"one of {DROP_TYPES}", self.drop_type))
        ref = self.reference_value
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (int, float)) or not math.isfinite(ref)):
            raise SGSCValueError(describe_rule("budget.reference_value", "a finite number (or None)", ref))
        if self.drop_type == "relative" and ref == 0:
            raise SGSCValueError(describe_rule("budget.reference_value", "not 0 for a relative drop", ref))
        check_int("budget.warmup_checks", self.warmup_checks, 0)
        if self.max_drop is not None and ref is None and self.warmup_checks == 0:
            raise SGSCValueError(
                describe_rule("budget.warmup_checks", ">= 1 when no reference_value is given", self.warmup_checks)
                + " The reference is established during the warm-up (size term off)."
            )
        check_number("budget.cooldown_fraction", self.cooldown_fraction, 0.0, 1.0)
        check_number("budget.reference_fraction", self.reference_fraction, 0.0, 1.0, lo_open=True)
        if self.max_drop is not None and ref is None and self.reference_fraction >= 1 - self.cooldown_fraction:
            rule = f"< 1 - cooldown_fraction = {1 - self.cooldown_fraction:g} without a reference_value"
            raise SGSCValueError(
                describe_rule("budget.reference_fraction", rule, self.reference_fraction)
                + " The reference is fixed before the cool-down, so that the fit has steps left to compress."
            )
        check_bool("budget.keep_best", self.keep_best)
        if self.best_state_path is not None and not isinstance(self.best_state_path, (str, os.PathLike)):
            raise SGSCTypeError(
                describe_rule("budget.best_state_path", "a file path (str) or None", self.best_state_path)
            )
        if not self.active:
            for name in ("monitor", "reference_value", "best_state_path"):
                if getattr(self, name) is not None:  # nothing is silently ignored
                    rule = "None without a budget (max_drop, target_bytes or target_bits_per_weight)"
                    raise SGSCValueError(describe_rule(f"budget.{name}", rule, getattr(self, name)))

    @property
    def active(self) -> bool:
        """Whether a budget is set (a cool-down alone is not one)."""
        return self.max_drop is not None or self.target_bytes is not None or self.target_bits_per_weight is not None

    @property
    def kind(self) -> str:
        """``"accuracy"``, ``"size"`` or ``"none"``."""
        if self.max_drop is not None:
            return "accuracy"
        return "size" if self.active else "none"


SETTINGS: dict[str, type] = {
    "quantization": Quantization,
    "losses": Losses,
    "preservation": Preservation,
    "feedback": Feedback,
    "budget": Budget,
}
"""The callback's settings groups by argument name."""


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Args:`` section of a settings class's docstring (the one place it is written),
    for the Hydra help and the CLI."""
    doc = cls.__doc__ or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    out: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^\s{8}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out
