"""The Hydra schema of the ``sgsc`` config group and the app's ``--help``, built from the settings dataclasses.

``SGSCSchema`` has the callback's settings groups (nested, each with its fields), its shortcuts and its seed, plus the
app's own ``enabled`` and ``variant``: the dataclasses of :mod:`lightning_sgsc.config` are the one source of names,
types, defaults and help. It is registered in Hydra's ``ConfigStore`` as ``sgsc/schema``, so a typo or a wrong type in
``sgsc.<...>=`` fails before training.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from lightning_sgsc.callback import SafetyGuidedQuantization
from lightning_sgsc.config import SETTINGS, field_help

_NOT_IN_YAML = frozenset(
    {"preservation_data", "data", "source", "output_fn"}
)  # datasets: given in Python, not in a config


def _yaml_type(hint: Any) -> Any:
    """The type OmegaConf checks for an argument annotated ``hint`` (``X | None`` → ``Optional[X]``; a schedule,
    ``float | Callable``, is a constant in a config; pass a function from Python)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    origin = typing.get_origin(inner[0])
    if float in inner:
        base: Any = float
    elif len(inner) == 1 and origin in (list, collections.abc.Sequence):
        base = list[str]
    elif len(inner) == 1 and origin is dict:
        # untyped: OmegaConf cannot merge `{a: 1}` into a typed dict node that is None, nor add keys to one in
        # struct mode; the settings dataclass checks the value
        base = Any
    elif len(inner) == 1:
        base = inner[0]
    else:
        raise TypeError(f"no config type for {hint!r}")
    return Optional[base] if union and len(inner) < len(typing.get_args(hint)) else base  # noqa: UP045


def _group_schema(cls: type) -> type:
    """A config dataclass with the fields of the settings dataclass ``cls`` (same names, types, defaults). The
    callback receives it as a mapping and builds ``cls`` with the shortcuts applied (then validates it once)."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.name in _NOT_IN_YAML:
            continue
        fields.append((f.name, _yaml_type(hints[f.name]), dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _schema_from(cls: type) -> type:
    """The ``sgsc`` group's schema: the callback's settings groups (nested, each with its fields), its shortcuts
    (``None``: not set), its seed, plus the app's own ``enabled`` and ``variant``. The settings dataclasses are the
    one source of truth for names, types and defaults."""
    init = vars(cls)["__init__"]
    hints = typing.get_type_hints(init)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, f"{cls.__module__.split('.')[0]}.{cls.__name__}")]
    for name, param in inspect.signature(init).parameters.items():
        if name in ("self", "deprecated") or name in _NOT_IN_YAML:
            continue
        if name in SETTINGS:
            schema = _group_schema(SETTINGS[name])
            fields.append((name, schema, dataclasses.field(default_factory=schema)))
        else:
            fields.append((name, _yaml_type(hints[name]), dataclasses.field(default=param.default)))
    fields += [("enabled", bool, True), ("variant", str, "safe")]
    return dataclasses.make_dataclass("SGSCSchema", fields)


SGSCSchema = _schema_from(SafetyGuidedQuantization)
"""Typed view of ``conf/sgsc``: the settings groups and shortcuts of
:class:`~lightning_sgsc.SafetyGuidedQuantization`."""

ConfigStore.instance().store(group="sgsc", name="schema", node=SGSCSchema)


def settings_help(width: int = 118) -> str:
    """Every ``sgsc`` setting with its default and its help, from the settings dataclasses' docstrings (the text
    ``--help`` shows)."""
    import textwrap

    from lightning_sgsc.settings import SHORTCUTS

    lines = []
    for group, cls in SETTINGS.items():
        lines.append(f"sgsc.{group}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        defaults = cls()
        for field, text in field_help(cls).items():
            if field in _NOT_IN_YAML:
                continue
            head = f"  sgsc.{group}.{field}={getattr(defaults, field)!r}: "
            lines.append(textwrap.fill(text, width, initial_indent=head, subsequent_indent=" " * 6))
    shortcuts = ", ".join(f"sgsc.{k} ({g}.{f})" for k, (g, f) in SHORTCUTS.items() if k not in _NOT_IN_YAML)
    lines.append(textwrap.fill(f"Shortcuts: {shortcuts}; sgsc.seed.", width, subsequent_indent="  "))
    return "\n".join(lines)


ConfigStore.instance().store(
    group="hydra/help",
    name="sgsc",
    node={
        "app_name": "sgsc-train",
        "header": "sgsc-train: fit, test and export one configuration (python -m lightning_sgsc.train).",
        "footer": "Use --hydra-help to view Hydra specific help; --cfg job to print the composed config.",
        "template": "${hydra.help.header}\n== Configuration groups ==\nCompose your configuration from those groups"
        " (group=option)\n\n$APP_CONFIG_GROUPS\n\n== SafetyGuidedQuantization settings ==\n"
        + settings_help().replace("$", "")
        + "\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n$CONFIG\n\n${hydra.help.footer}\n",
    },
)


def annotated_config(conf_dir: str, overrides: list[str]) -> str:
    """The app's composed config as YAML (what ``--cfg job`` prints), each ``sgsc`` setting followed by its help
    from the settings dataclasses' docstrings."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_sgsc.settings import SHORTCUTS

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    helps = {group: field_help(cls) for group, cls in SETTINGS.items()}
    shortcut_help = {k: f"shortcut for {g}.{f}" for k, (g, f) in SHORTCUTS.items()}
    out, section, group = [], None, None
    for line in OmegaConf.to_yaml(cfg).splitlines():
        stripped = line.lstrip()
        depth = (len(line) - len(stripped)) // 2
        key = stripped.split(":", 1)[0]
        if depth == 0:
            section, group = key, None
        elif depth == 1 and section == "sgsc":
            group = key if key in SETTINGS else None
        text = None
        if section == "sgsc" and depth == 2 and group is not None:
            text = helps[group].get(key)
        elif section == "sgsc" and depth == 1 and group is None:
            text = shortcut_help.get(key) or {"seed": "seed of every random choice the callback makes"}.get(key)
        out.append(f"{line}  # {' '.join(text.split())}" if text else line)
    return "\n".join(out) + "\n"
