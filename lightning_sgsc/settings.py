"""From the callback's arguments to its settings: groups, shortcuts and the old flat spellings, by explicit tables.

``SafetyGuidedQuantization(budget=Budget(max_drop=0.01), init_bits=4)``: each group is a settings dataclass of
:mod:`.config` (or a mapping of its fields, as a config file gives it); a shortcut sets one field of one group
(:data:`SHORTCUTS`); the flat names of lightning-sgsc 0.2 still work for one release (:data:`DEPRECATED`), with an
:class:`~lightning_sgsc.errors.SGSCDeprecationWarning` (a ``FutureWarning``). A field set twice (by a shortcut and in
its group, or by an old name and a new one) with two different values is an error: nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_sgsc.config import SETTINGS, Budget, Feedback, Losses, Preservation, Quantization
from lightning_sgsc.errors import SGSCDeprecationWarning, SGSCTypeError, SGSCValueError, describe_rule

SHORTCUTS: dict[str, tuple[str, str]] = {
    "init_bits": ("quantization", "init_bits"),
    "include": ("quantization", "include"),
    "exclude": ("quantization", "exclude"),
    "bit_weight": ("losses", "bit_weight"),
    "preservation_size": ("preservation", "size"),
    "preservation_data": ("preservation", "data"),
    "max_drop": ("budget", "max_drop"),
    "monitor": ("budget", "monitor"),
    "mode": ("budget", "mode"),
    "cooldown_fraction": ("budget", "cooldown_fraction"),
}
"""Keyword shortcuts of the callback: argument -> (group, field)."""

DEPRECATED: dict[str, tuple[str, str]] = {
    "quantizer_lr": ("quantization", "lr"),
    "init_headroom": ("quantization", "init_headroom"),
    "compile_quantizer": ("quantization", "compile"),
    "l1_weight": ("losses", "l1_weight"),
    "preservation_weight": ("losses", "preservation_weight"),
    "preservation_batch_size": ("preservation", "batch_size"),
    "preservation_every_n_steps": ("preservation", "every_n_steps"),
    "preservation_source": ("preservation", "source"),
    "preservation_fractions": ("preservation", "fractions"),
    "preservation_warmup_epochs": ("preservation", "warmup_epochs"),
    "preservation_pool": ("preservation", "pool"),
    "balance_classes": ("preservation", "balance_classes"),
    "preservation_loss": ("preservation", "loss"),
    "distill_temperature": ("preservation", "temperature"),
    "recalibrate_norms": ("preservation", "recalibrate_norms"),
    "threshold": ("feedback", "threshold"),
    "restore_fraction": ("feedback", "restore_fraction"),
    "restore_bits": ("feedback", "restore_bits"),
    "min_channels": ("feedback", "min_channels"),
    "prune": ("feedback", "prune"),
    "reference": ("feedback", "reference"),
    "max_history": ("feedback", "max_history"),
    "drop_type": ("budget", "drop_type"),
    "reference_value": ("budget", "reference_value"),
    "target_bytes": ("budget", "target_bytes"),
    "target_bits_per_weight": ("budget", "target_bits_per_weight"),
    "budget_warmup_checks": ("budget", "warmup_checks"),
    "keep_best": ("budget", "keep_best"),
    "best_state_path": ("budget", "best_state_path"),
}
"""The flat arguments of lightning-sgsc 0.2 that are neither groups nor shortcuts: old name -> (group, field)."""


@dataclass(frozen=True)
class Settings:
    """Everything the callback was told, one validated group per concern."""

    quantization: Quantization
    losses: Losses
    preservation: Preservation
    feedback: Feedback
    budget: Budget

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (callables and datasets named by their type), for logs and reports."""
        return {name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in SETTINGS}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _group(name: str, value: Any, changes: dict[str, tuple[str, Any]]) -> Any:
    """The group ``name`` from its argument (an instance, a mapping of its fields or ``None``) with the fields that
    shortcuts and old spellings set (``changes``: field -> (argument, value)); validated once, whole."""
    cls = SETTINGS[name]
    set_by = {field: value for field, (_, value) in changes.items()}
    if value is None:
        return cls(**set_by)
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            hint = difflib.get_close_matches(str(unknown[0]), known, n=1)
            raise SGSCValueError(
                describe_rule(f"{name}", f"a {cls.__name__} or a mapping of its fields ({sorted(known)})", unknown[0])
                + (f" Did you mean {hint[0]!r}?" if hint else "")
            )
        given = dict(value)
        default = cls()
    elif isinstance(value, cls):
        given = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
        default = cls()
    else:
        raise SGSCTypeError(
            describe_rule(name, f"a lightning_sgsc.{cls.__name__}, a mapping of its fields, or None", value)
        )
    for field, (arg, new) in changes.items():
        if field in given and given[field] != getattr(default, field) and given[field] != new:
            raise SGSCValueError(
                describe_rule(arg, f"left unset when `{name}=` sets {name}.{field} ({given[field]!r})", new)
                + " Set each field once."
            )
    if not set_by and isinstance(value, cls):
        return value
    return cls(**{**given, **set_by})


def _unknown_argument(name: str) -> SGSCTypeError:
    choices = [*SETTINGS, *SHORTCUTS, "seed", *DEPRECATED]
    hint = difflib.get_close_matches(name, choices, n=1)
    return SGSCTypeError(
        describe_rule(
            "SafetyGuidedQuantization(...)",
            f"called with its arguments ({', '.join([*SETTINGS, *SHORTCUTS])}, seed)",
            name,
        )
        + (f" Did you mean {hint[0]!r}?" if hint else "")
    )


def resolve_settings(groups: dict[str, Any], shortcuts: dict[str, Any], deprecated: dict[str, Any]) -> Settings:
    """The callback's :class:`Settings` from its group arguments, its shortcuts (``None``: not given) and any old
    flat names (see the module docstring)."""
    changes: dict[str, dict[str, tuple[str, Any]]] = {name: {} for name in SETTINGS}  # group -> field -> (by, value)
    for arg, value in shortcuts.items():
        if value is not None:
            group, field = SHORTCUTS[arg]
            changes[group][field] = (arg, value)
    for arg, value in deprecated.items():
        if arg not in DEPRECATED:
            raise _unknown_argument(arg)
        group, field = DEPRECATED[arg]
        warnings.warn(
            f"`SafetyGuidedQuantization({arg}=...)` is deprecated and will be removed in lightning-sgsc 0.4: use "
            f"`{group}={SETTINGS[group].__name__}({field}=...)`.",
            SGSCDeprecationWarning,
            stacklevel=3,
        )
        if field in changes[group] and changes[group][field][1] != value:
            raise SGSCValueError(
                describe_rule(arg, f"the same as `{changes[group][field][0]}`, which sets {group}.{field} too", value)
            )
        changes[group][field] = (arg, value)
    built = {name: _group(name, groups.get(name), changes[name]) for name in SETTINGS}
    settings = Settings(**built)
    _check_together(settings)
    return settings


def _check_together(settings: Settings) -> None:
    """Rules that span groups."""
    losses, preservation, budget = settings.losses, settings.preservation, settings.budget
    weight = losses.preservation_weight
    if weight is not None and not callable(weight) and weight > 0 and not preservation.enabled:
        raise SGSCValueError(
            describe_rule("losses.preservation_weight", "0 or None when there is no preservation set", weight)
            + " Pass `preservation_data=` or a `preservation_size` > 0."
        )
    if budget.active and (callable(losses.bit_weight) or not losses.bit_weight > 0):
        rule = "a constant > 0 (the budget's starting weight)"
        raise SGSCValueError(describe_rule("losses.bit_weight", rule, losses.bit_weight))
    if budget.max_drop is not None and budget.monitor is None and not preservation.enabled:
        raise SGSCValueError(
            describe_rule("budget.monitor", "a metric the validation loop logs when there is no preservation set", None)
            + " A budget on `max_drop` needs a signal: set `monitor=`/`mode=`, or keep a preservation set"
            " (`preservation_size` > 0)."
        )


def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Group mappings merged field by field, later layers winning: ``merge_settings(DEMO_SETTINGS, {"feedback":
    {"threshold": 0.01}})`` keeps every other field of every group. Keys that are not groups (shortcuts, ``seed``)
    are taken as they are. For building variants of a configuration, as the demo and the benchmarks do."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in SETTINGS and isinstance(value, Mapping):
                out[key] = {**out.get(key, {}), **value}
            else:
                out[key] = value
    return out
