"""A quiet CPU Trainer for the demo, benchmarks and experiments."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(max_epochs: int, callbacks: list[pl.Callback] | None = None, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (``overrides`` win)."""
    settings: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return pl.Trainer(callbacks=callbacks or [], **settings)
