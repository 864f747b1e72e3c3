"""The Hydra entry point: ``python -m lightning_sgsc.train`` (console script ``sgsc-train``) over ``conf/``.

``train(cfg)`` is a plain function (tests and notebooks call it with a composed config); :func:`main` only wraps
it with ``@hydra.main`` and returns the metric a sweeper optimises. Each run writes one JSON result:
``<results_dir>/<run_name>.json`` with the config, the test metric, the true exported bytes, bits per weight,
pruned channels, training time and the hardware, and (compressed runs, ``export=true``) the exported artifact
itself, ``<results_dir>/<run_name>.sgsc`` (reload it with :func:`lightning_sgsc.export.load_compressed`).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class SGSCSchema:
    """Typed view of ``conf/sgsc``: the arguments of :class:`~lightning_sgsc.SafetyGuidedQuantization`."""

    _target_: str = "lightning_sgsc.SafetyGuidedQuantization"
    enabled: bool = True
    variant: str = "safe"
    init_bits: float = 8.0
    init_headroom: float | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    l1_weight: float = 0.0
    bit_weight: float = 0.5
    preservation_weight: float | None = None
    quantizer_lr: float = 0.01
    preservation_size: int = 256
    preservation_batch_size: int | None = None
    preservation_every_n_steps: int = 8
    preservation_fractions: dict[str, float] = field(
        default_factory=lambda: {"gradcam": 1 / 3, "uncertainty": 1 / 3, "kmeans": 1 / 3}
    )
    preservation_warmup_epochs: int = 1
    preservation_pool: int | None = 10_000
    balance_classes: bool = False
    threshold: float = 0.005
    restore_fraction: float = 0.25
    restore_bits: float = 2.0
    min_channels: int = 1
    prune: bool = True
    reference: str = "best"
    seed: int = MISSING
    max_history: int = 1000


ConfigStore.instance().store(group="sgsc", name="schema", node=SGSCSchema)


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {torch.get_num_threads()} CPU threads"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {platform.system()}"


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
        )
        if cfg.export:  # the artifact itself, next to its result: what was measured is what the user ships
            artifact = results_dir / f"{cfg.run_name}.sgsc"
            result["file_bytes"] = export_compressed(net, artifact)
            result["artifact"] = artifact.name
    else:
        result.update(bits_per_weight=32.0, file_bytes=float32_bytes(net), pruned_channels=0)
    (results_dir / f"{cfg.run_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """``python -m lightning_sgsc.train ...``: runs :func:`train` and returns the metric to optimise."""
    result = train(cfg)
    return float(result[cfg.optimized_metric])


if __name__ == "__main__":
    main()
