"""The LightningCLI entry point: ``sgsc fit --config cfg.yaml`` (or ``python -m lightning_sgsc.cli``).

Models and datamodules are given by class path (ours or yours), the callback from YAML or flags::

    sgsc fit --model lightning_sgsc.examples.ClassifierModule --model.net lightning_sgsc.examples.DigitsCNN \\
        --data lightning_sgsc.examples.DigitsDataModule \\
        --trainer.callbacks+=lightning_sgsc.SafetyGuidedQuantization --trainer.callbacks.init_bits=4

Your own LightningCLI picks the callback up the same way, from ``trainer.callbacks`` in its YAML.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Builds (and by default runs) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    kwargs: dict[str, Any] = {"save_config_kwargs": {"overwrite": True}}
    return LightningCLI(args=args, run=run, **kwargs)


def run_cli() -> None:
    """Console-script entry (``sgsc``): runs the CLI and returns nothing, so the exit status is 0 on success."""
    main()


if __name__ == "__main__":
    run_cli()
