"""The Hydra entry point: ``sgsc-train`` (``python -m lightning_sgsc.train``) over the configs in ``conf/``.

``train(cfg)`` is a plain function (tests and notebooks call it with a composed config); :func:`main` wraps it with
``@hydra.main`` and returns what a sweeper optimises: a *validation* metric by default (``optimized_metric:
val_metric``), or ``[val_metric, file_bytes]`` for multi-objective sweepers. The test split is read once per run, for
the report.

Every job writes into its own folder, ``output_dir`` (Hydra's job directory; a multirun job's folder is named by its
number and overrides, so nothing is overwritten): ``result.json`` (the config, the validation and test metrics, the
true exported bytes, bits per weight, pruned channels, time and hardware), ``model.sgsc`` (``export=true``;
:func:`~lightning_sgsc.load_compressed`), ``model.onnx`` (``onnx=true``), ``weights.pt`` (``save_weights=true``: the
module's state dict, the start of a fine-tune), ``logs/metrics.csv`` (the curves, the per-layer bit depths) and the
checkpoints of any ``ModelCheckpoint`` in ``trainer.callbacks``. One line per job says where they are.

The model is any ``LightningModule`` (``model._target_``): it must log ``metric`` (``val/acc`` by default) in its
validation loop; a ``test_step`` that logs the same name under ``test/`` is optional; the network to export is its
attribute ``net`` (``net: <attribute>``, ``net: ''`` for the whole module). ``trainer.callbacks`` and
``trainer.logger`` from the config are instantiated and run beside the app's own callback.

Fine-tuning a trained model: ``init_from=<weights.pt or a Lightning .ckpt>`` (a glob matching exactly one file, e.g.
``'experiments/results/fashion_cnn/float/*seed=${seed}*/weights.pt'``). Under an accuracy budget with a monitor and no
``sgsc.budget.reference_value``, the reference is the starting model's own validation value, measured before the fit.
"""

from __future__ import annotations

import glob
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_sgsc.errors import SGSCValueError, describe_rule
from lightning_sgsc.schema import annotated_config

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
"""The configs ship inside the package (``conf/`` at the top of a checkout links here)."""

log = logging.getLogger("lightning_sgsc.train")


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {torch.get_num_threads()} CPU threads"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {platform.system()}"


def _resolve_init_from(pattern: str) -> Path:
    """``init_from`` as one file: a path, or a glob that matches exactly one."""
    if not any(c in pattern for c in "*?["):
        return Path(pattern)
    matches = sorted(glob.glob(pattern))
    if len(matches) != 1:
        raise SGSCValueError(
            describe_rule("init_from", "a path, or a glob matching exactly one file", pattern)
            + f" It matches {len(matches)}: {matches[:4]}."
        )
    return Path(matches[0])


def _load_start(module: pl.LightningModule, path: str) -> None:
    """Loads the state dict a ``save_weights=true`` run wrote, or a Lightning checkpoint's (``init_from``), into
    ``module``; a file that is neither is named with what it is."""
    file = _resolve_init_from(path)
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


def _validate(trainer_cfg: Any, module: pl.LightningModule, datamodule: Any, name: str, seed: int) -> float:
    """``name`` of ``module`` on the validation split, by a Trainer of the run's settings without callbacks or
    logger; the seed is set again after it, so what follows draws the same numbers with or without it."""
    probe: pl.Trainer = instantiate(trainer_cfg, callbacks=[], logger=False, enable_progress_bar=False)
    measured = probe.validate(module, datamodule=datamodule, verbose=False)[0]
    if name not in measured:
        raise SGSCValueError(describe_rule("metric", f"a metric the validation loop logs ({sorted(measured)})", name))
    pl.seed_everything(seed, workers=True, verbose=False)
    return float(measured[name])


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return str(HydraConfig.get().mode) in ("RunMode.MULTIRUN", "MULTIRUN")


def _components(cfg: DictConfig, output_dir: Path) -> tuple[Any, pl.LightningModule, Any, dict[str, Any]]:
    """The data module, the module (started from ``init_from``), the callback (``None`` for a float run) and the
    ``sgsc`` settings as plain data."""
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    model_cfg.pop("name", None)  # names the run, not a constructor argument
    module = instantiate(model_cfg)
    sgsc_cfg: dict[str, Any] = OmegaConf.to_container(cfg.sgsc, resolve=True)  # type: ignore[assignment]
    enabled = sgsc_cfg.pop("enabled")
    sgsc_cfg.pop("variant")
    if cfg.get("init_from"):
        _load_start(module, cfg.init_from)
        budget = sgsc_cfg["budget"]
        monitor = sgsc_cfg.get("monitor") or budget.get("monitor")
        budgeted = enabled and (sgsc_cfg.get("max_drop") or budget.get("max_drop")) is not None and monitor is not None
        if budgeted and budget.get("reference_value") is None:  # the starting model's own value, uncompressed
            budget["reference_value"] = _validate(cfg.trainer, module, datamodule, monitor, cfg.seed)
    callback = instantiate(sgsc_cfg) if enabled else None
    return datamodule, module, callback, sgsc_cfg


def _trainer(cfg: DictConfig, callback: Any) -> pl.Trainer:
    """The Trainer of the config, with the config's own callbacks and logger next to the app's callback, and a
    progress bar on single runs (``progress_bar: null``) but not in multirun, where bars interleave."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)
    callbacks = [instantiate(c) for c in trainer_cfg.pop("callbacks", None) or []]
    logger = trainer_cfg.pop("logger", None)
    logger = instantiate(logger) if isinstance(logger, dict) else logger
    progress = cfg.get("progress_bar")
    trainer_cfg["enable_progress_bar"] = (not _is_multirun()) if progress is None else bool(progress)
    if any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks):
        trainer_cfg["enable_checkpointing"] = True  # the user's own ModelCheckpoint: Lightning needs this on
    return instantiate(trainer_cfg, callbacks=[*callbacks, *([callback] if callback else [])], logger=logger)


def _network(module: pl.LightningModule, attribute: str) -> torch.nn.Module:
    """The network the app measures and exports: ``module.<attribute>`` (``''``: the module itself)."""
    if not attribute:
        return module
    net = getattr(module, attribute, None)
    if not isinstance(net, torch.nn.Module):
        children = [name for name, _ in module.named_children()]
        raise SGSCValueError(
            describe_rule("net", f"an attribute of the module holding the network ({children})", attribute)
        )
    return net


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits, validates, tests (when the module has a ``test_step``) and (when compressing) exports one configuration
    into its own ``output_dir``; writes ``result.json`` there and returns it."""
    from lightning_sgsc.size import float32_bytes

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, callback, sgsc_cfg = _components(cfg, output_dir)
    trainer = _trainer(cfg, callback)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    metric = str(cfg.metric)
    validated = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if metric not in validated:
        raise SGSCValueError(
            describe_rule("metric", f"a metric the validation loop logs ({sorted(validated)})", metric)
        )
    net = _network(module, cfg.net)
    result: dict[str, Any] = {
        "run": cfg.run_name,
        "variant": cfg.sgsc.variant,
        "val_metric_name": metric,
        "val_metric": float(validated[metric]),
        "float32_bytes": float32_bytes(net),
        "train_seconds": round(train_seconds, 2),
        "hardware": _hardware(),
        "output_dir": str(output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if type(module).test_step is not pl.LightningModule.test_step:  # the test split, read once, for the report
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        test_name = "test/" + metric.split("/", 1)[-1]
        if test_name in tested:
            result.update(test_metric_name=test_name, test_metric=float(tested[test_name]))
    if cfg.get("init_from"):
        result.update(init_from=str(cfg.init_from), reference_value=sgsc_cfg["budget"].get("reference_value"))
    if cfg.get("save_weights", False):  # the starting point of fine-tunes (init_from)
        torch.save(module.state_dict(), output_dir / "weights.pt")
        result["weights"] = "weights.pt"
    _report_compression(cfg, result, net, callback, datamodule, output_dir)
    (output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    _say(result)
    return result


def _report_compression(
    cfg: DictConfig, result: dict[str, Any], net: torch.nn.Module, callback: Any, datamodule: Any, output_dir: Path
) -> None:
    from lightning_sgsc import model_size
    from lightning_sgsc.export import export_compressed
    from lightning_sgsc.size import float32_bytes

    if callback is None:
        result.update(bits_per_weight=32.0, file_bytes=float32_bytes(net), pruned_channels=0)
        return
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
        result["file_bytes"] = export_compressed(net, output_dir / "model.sgsc")
        result["artifact"] = "model.sgsc"
    if cfg.get("onnx", False):  # the deployable file, checked in ONNX Runtime on a validation batch
        from lightning_sgsc.deploy import export_onnx

        example = next(iter(datamodule.val_dataloader()))[0]
        result["onnx_bytes"] = export_onnx(net, example, output_dir / "model.onnx").file_bytes
        result["onnx_file"] = "model.onnx"


def _say(result: dict[str, Any]) -> None:
    """One line per job: the run, its validation (and test) metric, its bytes, where its files are."""
    line = f"[sgsc-train] {result['run']}: {result['val_metric_name']} {result['val_metric']:.4f}"
    if "test_metric" in result:
        line += f", {result['test_metric_name']} {result['test_metric']:.4f}"
    if "file_bytes" in result:
        line += f", {result['file_bytes']:,} B ({100 * result['file_bytes'] / max(result['float32_bytes'], 1):.1f} %"
        line += " of float32)"
    line += f" -> {result['output_dir']}"
    log.info(line)  # Hydra prints it and writes it to the job's train.log


def objective(result: dict[str, Any], optimized: Any) -> float | tuple[float, ...]:
    """What :func:`main` returns to a sweeper: one value of ``result`` (``"val_metric"``, ``"file_bytes"``, ...), or
    a tuple of them for a multi-objective sweeper. The test metric is refused: a sweep must not tune on it."""
    names = [optimized] if isinstance(optimized, str) else list(optimized)
    for name in names:
        if name.startswith("test"):
            raise SGSCValueError(
                describe_rule("optimized_metric", "a validation metric or the file's bytes, never a test metric", name)
            )
        if name not in result:
            raise SGSCValueError(describe_rule("optimized_metric", f"a value of the result ({sorted(result)})", name))
    values = tuple(float(result[name]) for name in names)
    return values[0] if isinstance(optimized, str) else values


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | tuple[float, ...]:
    return objective(train(cfg), cfg.optimized_metric)


def main() -> Any:
    """``sgsc-train ...``: runs :func:`train` under Hydra and returns the value to optimise. ``--cfg job`` prints
    the composed config with each ``sgsc`` setting's help as a comment."""
    argv = sys.argv[1:]
    if any(a in ("--cfg", "-c") for a in argv) and "job" in argv and "--package" not in argv and "-p" not in argv:
        i = next(i for i, a in enumerate(argv) if a in ("--cfg", "-c"))
        if argv[i + 1 : i + 2] == ["job"]:
            overrides = argv[:i] + argv[i + 2 :]
            print(annotated_config(CONF_DIR, [o for o in overrides if not o.startswith("-")]), end="")
            return None
    return _hydra_main()


if __name__ == "__main__":
    main()
