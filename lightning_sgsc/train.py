"""The Hydra entry point: ``python -m lightning_sgsc.train`` (console script ``sgsc-train``) over ``conf/``.

``train(cfg)`` is a plain function (tests and notebooks call it with a composed config); :func:`main` only wraps
it with ``@hydra.main`` and returns the metric a sweeper optimises. Each run writes one JSON result:
``<results_dir>/<run_name>.json`` with the config, the test metric, the true exported bytes, bits per weight,
pruned channels, training time and the hardware, and (compressed runs, ``export=true``) the exported artifact
itself, ``<results_dir>/<run_name>.sgsc`` (reload it with :func:`lightning_sgsc.export.load_compressed`), and with
``onnx=true`` an ONNX file with integer weights, ``<results_dir>/<run_name>.onnx`` (:func:`lightning_sgsc.export_onnx`).

Fine-tuning a trained model: a run with ``save_weights=true`` also writes ``<results_dir>/<run_name>.pt`` (the
module's state dict); another run starts from it with ``init_from=<that file>`` (or a Lightning ``.ckpt``). Under an
accuracy budget (``sgsc.max_drop`` with ``sgsc.monitor``) and no ``sgsc.budget.reference_value``, the reference is then
the starting model's own validation value, measured before the fit (the float model the compression must stay near).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import platform
import time
import types
import typing
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_sgsc.callback import SafetyGuidedQuantization
from lightning_sgsc.config import SETTINGS, field_help
from lightning_sgsc.errors import SGSCValueError, describe_rule

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
"""The configs ship inside the package (``conf/`` at the top of a checkout links here)."""

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


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {torch.get_num_threads()} CPU threads"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {platform.system()}"


def _load_start(module: pl.LightningModule, path: str) -> None:
    """Loads the state dict a ``save_weights=true`` run wrote, or a Lightning checkpoint's (``init_from``), into
    ``module``; a file that is neither is named with what it is."""
    file = Path(path)
    rule = "a weights file (save_weights=true) or a Lightning checkpoint"
    if not file.is_file():
        raise SGSCValueError(describe_rule("init_from", rule, path) + " No such file.")
    head = file.read_bytes()[:16]
    if len(head) < 8:
        raise SGSCValueError(describe_rule("init_from", rule, path) + f" It is {file.stat().st_size} bytes long.")
    if head[8:9] == b"{":  # a safetensors file: the compressed artifact, most likely
        raise SGSCValueError(
            describe_rule("init_from", rule, path)
            + " It is a safetensors file (a compressed .sgsc artifact?): load that with"
            " lightning_sgsc.load_compressed, or start from the float run's .pt or .ckpt."
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SGSCValueError(
            describe_rule("init_from", rule, path)
            + f" torch.load could not read it ({type(err).__name__}: {err})."[:400]
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint (.ckpt)
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SGSCValueError(describe_rule("init_from", rule, path) + f" It holds a {type(state).__name__}.")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SGSCValueError(
            describe_rule("init_from", "the weights of this model", path)
            + f" Missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]} (another model or experiment?)."
        )


def _measure(cfg: DictConfig, module: pl.LightningModule, datamodule: Any, monitor: str) -> float:
    """``monitor`` of ``module`` on the validation split, by a Trainer of the run's settings without callbacks; the
    seed is set again after it, so the fit draws the same numbers with or without this measurement."""
    probe: pl.Trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    measured = probe.validate(module, datamodule=datamodule, verbose=False)[0]
    if monitor not in measured:
        raise SGSCValueError(
            describe_rule("sgsc.budget.monitor", f"a metric the validation loop logs ({sorted(measured)})", monitor)
        )
    pl.seed_everything(cfg.seed, workers=True)
    return float(measured[monitor])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits, tests and (when compressing) exports one configuration; writes and returns its result."""
    from lightning_sgsc import model_size
    from lightning_sgsc.export import export_compressed
    from lightning_sgsc.size import float32_bytes

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    model_cfg.pop("name", None)  # names the run, not a constructor argument
    module = instantiate(model_cfg)
    sgsc_cfg = OmegaConf.to_container(cfg.sgsc, resolve=True)
    assert isinstance(sgsc_cfg, dict)
    enabled = sgsc_cfg.pop("enabled")
    variant = sgsc_cfg.pop("variant")
    if cfg.get("init_from"):
        _load_start(module, cfg.init_from)
        budget = sgsc_cfg["budget"]
        monitor = sgsc_cfg.get("monitor") or budget.get("monitor")
        budgeted = enabled and (sgsc_cfg.get("max_drop") or budget.get("max_drop")) is not None and monitor is not None
        if budgeted and budget.get("reference_value") is None:  # the starting model's own value, uncompressed
            budget["reference_value"] = _measure(cfg, module, datamodule, monitor)
    callback = instantiate(sgsc_cfg) if enabled else None
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[callback] if callback else [])
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metric_name = "test/acc" if "test/acc" in test else "test/loss"
    net = module.net
    result: dict[str, Any] = {
        "run": cfg.run_name,
        "variant": variant,
        "test_metric_name": metric_name,
        "test_metric": float(test[metric_name]),
        "float32_bytes": float32_bytes(net),
        "train_seconds": round(train_seconds, 2),
        "hardware": _hardware(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("init_from"):
        result.update(init_from=str(cfg.init_from), reference_value=sgsc_cfg["budget"].get("reference_value"))
    if cfg.get("save_weights", False):  # the starting point of fine-tunes (init_from)
        weights = results_dir / f"{cfg.run_name}.pt"
        torch.save(module.state_dict(), weights)
        result["weights"] = weights.name
    if callback is not None:
        size = model_size(net)
        result.update(
            bits_per_weight=size.bits_per_weight,
            estimate_bytes=size.total_bytes,
            pruned_channels=size.pruned_channels,
            zero_bit_channels=size.zero_bit_channels,
            restored_channels=sum(e["restored"] for e in callback.history),
            kept_alive_channels=sum(e.get("kept_alive", 0) for e in callback.history),
            feedback=callback.history,
            preservation_metric=callback.history[-1]["metric"] if callback.history else None,
            budget=callback.budget_summary(),
        )
        if cfg.export:  # the artifact itself, next to its result: what was measured is what the user ships
            artifact = results_dir / f"{cfg.run_name}.sgsc"
            result["file_bytes"] = export_compressed(net, artifact)
            result["artifact"] = artifact.name
        if cfg.get("onnx", False):  # the deployable file, checked in ONNX Runtime on a test batch
            from lightning_sgsc.deploy import export_onnx

            example = next(iter(datamodule.test_dataloader()))[0]
            onnx_path = results_dir / f"{cfg.run_name}.onnx"
            result["onnx_bytes"] = export_onnx(net, example, onnx_path).file_bytes
            result["onnx_file"] = onnx_path.name
    else:
        result.update(bits_per_weight=32.0, file_bytes=float32_bytes(net), pruned_channels=0)
    (results_dir / f"{cfg.run_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """``python -m lightning_sgsc.train ...``: runs :func:`train` and returns the metric to optimise."""
    result = train(cfg)
    return float(result[cfg.optimized_metric])


if __name__ == "__main__":
    main()
