"""The LightningCLI entry point: ``sgsc fit --config cfg.yaml`` (or ``python -m lightning_sgsc.cli``), and
``sgsc export`` to turn a checkpoint into the compressed file.

Models and datamodules are given by class path (ours or yours), the callback from YAML or flags::

    sgsc fit --model lightning_sgsc.examples.ClassifierModule --model.net lightning_sgsc.examples.DigitsCNN \\
        --data lightning_sgsc.examples.DigitsDataModule --trainer.max_epochs 40 \\
        --trainer.callbacks+=lightning_sgsc.SafetyGuidedQuantization --trainer.callbacks.init_bits=4 \\
        --trainer.callbacks.budget.max_drop=0.01

    sgsc export last.ckpt --model lightning_sgsc.examples.ClassifierModule \\
        --model.net lightning_sgsc.examples.DigitsCNN --submodule net --out net.sgsc \\
        [--onnx net.onnx --input_shape 1,1,8,8]

Your own LightningCLI picks the callback up the same way, from ``trainer.callbacks`` in its YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Builds (and by default runs) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    kwargs: dict[str, Any] = {"save_config_kwargs": {"overwrite": True}}
    return LightningCLI(args=args, run=run, **kwargs)


def _export_parser() -> Any:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="sgsc export", description="Write a checkpoint's compressed model as a .sgsc file.")
    parser.add_argument("ckpt", type=str, help="a Lightning checkpoint written under SafetyGuidedQuantization")
    parser.add_subclass_arguments(pl.LightningModule, "model", help="the LightningModule the checkpoint is of")
    parser.add_argument("--submodule", type=str, default="", help="export this submodule (e.g. net): its skeleton")
    parser.add_argument("--out", type=str, required=True, help="the .sgsc file to write")
    parser.add_argument("--onnx", type=str, default=None, help="also write an ONNX file (the onnx extra)")
    parser.add_argument("--input_shape", type=str, default=None, help="example input shape for ONNX, e.g. 1,1,28,28")
    parser.add_argument("--input_dtype", type=str, default="float32", help="float32, or int64 for token ids")
    return parser


def export_main(argv: list[str]) -> int:
    """``sgsc export CKPT --model ... --out FILE``: loads the checkpoint into the model (twins where it holds
    quantizer state), writes the compressed file (and the ONNX file), prints the size table."""
    import torch

    from lightning_sgsc.errors import SGSCValueError, describe_rule
    from lightning_sgsc.export import export_compressed
    from lightning_sgsc.quant.swap import prepare_for_state_dict
    from lightning_sgsc.size import format_size_table, model_size

    parser = _export_parser()
    cfg = parser.parse_args(argv)
    module = parser.instantiate_classes(cfg).model
    ckpt = Path(cfg.ckpt)
    if not ckpt.is_file():
        raise SGSCValueError(describe_rule("ckpt", "a checkpoint file", str(ckpt)))
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint with other Python objects in its hyperparameters: the user's own file
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise SGSCValueError(describe_rule("ckpt", "a Lightning checkpoint or a state dict", type(state).__name__))
    prepare_for_state_dict(module, weights)
    module.load_state_dict(weights)
    target = module.get_submodule(cfg.submodule) if cfg.submodule else module
    target.eval()
    nbytes = export_compressed(target, cfg.out)
    print(format_size_table(model_size(target)))
    print(f"wrote {cfg.out}: {nbytes:,} bytes")
    if cfg.onnx:
        from lightning_sgsc.deploy import export_onnx

        if not cfg.input_shape:
            raise SGSCValueError(describe_rule("--input_shape", "the example input's shape with --onnx", None))
        shape = [int(d) for d in cfg.input_shape.split(",")]
        dtype = getattr(torch, cfg.input_dtype)
        example = torch.randn(shape) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        report = export_onnx(target, example, cfg.onnx)
        print(f"wrote {cfg.onnx}: {report.file_bytes:,} bytes, ONNX Runtime within {report.max_abs_diff:.2g}")
    return 0


def run_cli() -> None:
    """Console-script entry (``sgsc``): ``sgsc export ...`` or the LightningCLI; the exit status is 0 on success."""
    if sys.argv[1:2] == ["export"]:
        sys.exit(export_main(sys.argv[2:]))
    main()


if __name__ == "__main__":
    run_cli()
