"""Where the quantizer-only overhead goes: the fused quantizer's arithmetic against its machinery.

    python experiments/bench/overhead_parts.py [--model digits_cnn] [--steps 150] [--rounds 10]
    python experiments/bench/overhead_parts.py --flat-be [--model char_transformer] [--steps 2000] [--rounds 7]

Six fits alternate in one process (reversed every other round), timed as in ``overhead.py``:

* ``float``: the plain model;
* ``quantizer``: the callback without a preservation set (as ``overhead.py``'s quantizer side), as shipped: the
  fused quantizer's arithmetic in the native kernel where it builds (``lightning_sgsc.quant.native``);
* ``quantizer_torch``: the same on the torch path (the kernel switched off);
* ``no_math``: the torch path with the quantizer's elementwise arithmetic replaced by a copy (forward: ``q = w``;
  backward: ``dw = dq``, ``db = de = 0``): everything else stays, the one autograd Function, the stacking of the
  layers into one matrix, the per-channel vectors, the extra gradients and the b/e optimizer group;
* ``no_math_frozen_be``: ``no_math`` with ``bits`` and ``exponent`` frozen (``requires_grad=False`` at fit start):
  no b/e gradients to accumulate, nothing for their optimizer group to update;
* ``no_quantizer``: the twins compute with their float weights and the step quantizes nothing (the callback, the
  mixin and the b/e param group stay, with no gradients).

``quantizer_torch - quantizer`` is what the native kernel saves; ``quantizer_torch - no_math`` what the torch
path's arithmetic costs; ``no_math - no_quantizer`` the machinery around it, of which
``no_math - no_math_frozen_be`` is the b/e gradients and their optimizer group. The
figures are diagnostics of where time goes (the fits are not training the model one would use). The last line is
one JSON object with each variant's median ms per step and median ratio to ``float``.

``--flat-be`` instead times, in a tight loop, the two costs that one flat ``bits`` and one flat ``exponent`` tensor
for all layers (instead of a pair per layer) would change: the fused Adam step of the b/e group, and an autograd
Function handing its b/e gradients to two leaves per quantized layer of ``--model`` (6 for the DigitsCNN's three
layers, 34 for the CharTransformer's 17) against 2; and the optimizer step as it runs in training, AdamW over the
model's weights plus the b/e group per layer pairs or flat, against AdamW over the weights alone. ``--steps`` is then
the calls per repeat and ``--rounds`` the repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from overhead import WARMUP_STEPS, StepTimer, _callback, _setup, order

from lightning_sgsc.examples.training import quiet_trainer
from lightning_sgsc.quant import fused, modules, native
from lightning_sgsc.quant.modules import quantizer_parameters

VARIANTS = ("float", "quantizer", "quantizer_torch", "no_math", "no_math_frozen_be", "no_quantizer")
_REAL = (
    fused._quantize_forward,
    fused._quantize_backward,
    fused.FusedQuantizer.step,
    modules.QuantizedLayer.quantized_weight,
    fused.FusedQuantizer.bits_per_weight,
)


def _copy_forward(weight: torch.Tensor, steps: Any) -> torch.Tensor:
    return weight.clone()


def _copy_backward(weight: torch.Tensor, grad: torch.Tensor, steps: Any, needs: Any) -> tuple[torch.Tensor, ...]:
    return grad.clone(), grad.new_zeros(grad.shape[0]), grad.new_zeros(grad.shape[0])


@contextlib.contextmanager
def _no_step(self: fused.FusedQuantizer) -> Iterator[fused.FusedQuantizer]:
    yield self


def _float_weight(self: modules.QuantizedLayer) -> torch.Tensor:
    return self.weight


def _zero_bits(self: fused.FusedQuantizer) -> torch.Tensor:
    return torch.zeros(())


def use(variant: str) -> None:
    """Patches the quantizer for ``variant`` (``float`` and ``quantizer``: the real code; every other variant runs
    the torch path)."""
    forward, backward, step, weight, bits = _REAL
    native.enabled = variant in ("float", "quantizer")
    if variant.startswith("no_math"):
        forward, backward = _copy_forward, _copy_backward
    elif variant == "no_quantizer":
        step, weight, bits = _no_step, _float_weight, _zero_bits
    fused._quantize_forward, fused._quantize_backward = forward, backward
    fused.FusedQuantizer.step = step  # type: ignore[method-assign]
    modules.QuantizedLayer.quantized_weight = weight  # type: ignore[method-assign]
    fused.FusedQuantizer.bits_per_weight = bits  # type: ignore[method-assign]


class FreezeQuantizerParameters(pl.Callback):
    """Sets ``requires_grad=False`` on every ``bits`` and ``exponent`` at fit start (after the swap)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p in quantizer_parameters(pl_module):
            p.requires_grad_(False)


def measure(name: str, steps: int, rounds: int) -> dict[str, Any]:
    modules_ = {v: _setup(name, 8192) for v in VARIANTS}
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for r in range(rounds):
            for variant in order(r, VARIANTS):
                use(variant)
                module, loader = modules_[variant]
                timer = StepTimer()
                side = "float" if variant == "float" else "quantizer"
                freeze = [FreezeQuantizerParameters()] if variant == "no_math_frozen_be" else []
                callbacks = [*_callback(side), *freeze, timer]
                trainer = quiet_trainer(1, callbacks, max_steps=steps, limit_val_batches=0)
                trainer.fit(module, train_dataloaders=loader)
                per_round[variant].append(statistics.mean(timer.times[WARMUP_STEPS:]))
    finally:
        use("quantizer")
    base = per_round["float"]
    return {
        v: {
            "ms": round(1e3 * statistics.median(t), 3),
            "ratio": round(statistics.median([a / b for a, b in zip(t, base, strict=True)]), 3),
        }
        for v, t in per_round.items()
    }


class _ToLeaves(torch.autograd.Function):
    """Forward: a scalar from the first input; backward: a flat gradient for all channels, split per leaf as the
    fused quantizer does (or whole, for one leaf each of b and e)."""

    @staticmethod
    def forward(ctx: Any, sizes: list[int], *leaves: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.split = sizes, len(leaves) > 2
        return leaves[0].sum() * 0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        b, e = torch.ones(sum(ctx.sizes)), torch.ones(sum(ctx.sizes))
        if not ctx.split:
            return None, b, e
        return None, *b.split_with_sizes(ctx.sizes), *e.split_with_sizes(ctx.sizes)


def flat_be(
    sizes: list[int], weight_shapes: list[tuple[int, ...]] | None = None, n: int = 2000, repeats: int = 7
) -> dict[str, float]:
    """Median microseconds per call of the b/e optimizer step and gradient routing, per layer pairs vs flat.

    ``adam_*``: an optimizer over the b/e tensors alone. With ``weight_shapes`` (the model's other parameters) also
    ``step_*``: the optimizer a user's ``configure_optimizers`` gives (AdamW over the weights) with the b/e group
    the callback adds (fused, its own learning rate, no weight decay), per layer pairs or flat, against the same
    optimizer without that group (``step_weights_only_us``): the b/e group's cost where it really runs, next to
    the per-step costs it shares. The variants of each measure alternate within every repeat (in reverse order
    every other repeat), so a change of machine speed falls on all of them."""

    def timed(fns: dict[str, Any]) -> dict[str, float]:
        for fn in fns.values():
            for _ in range(max(n // 10, 1)):
                fn()
        runs: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats):
            for key in order(r, tuple(fns)):
                start = time.perf_counter()
                for _ in range(n):
                    fns[key]()
                runs[key].append((time.perf_counter() - start) / n * 1e6)
        return {k: round(statistics.median(v), 1) for k, v in runs.items()}

    per_layer = [torch.nn.Parameter(torch.rand(c)) for c in sizes for _ in range(2)]  # b, e of each layer
    flat = [torch.nn.Parameter(torch.rand(sum(sizes))) for _ in range(2)]
    for p in per_layer + flat:
        p.grad = torch.rand_like(p)
    bits, exponents = per_layer[0::2], per_layer[1::2]

    def route(leaves: list[torch.nn.Parameter], inputs: list[torch.nn.Parameter]) -> None:
        for p in leaves:
            p.grad = None
        _ToLeaves.apply(sizes, *inputs).backward()

    out = timed(
        {
            "adam_per_layer_us": torch.optim.Adam(per_layer, lr=0.01, fused=True).step,
            "adam_flat_us": torch.optim.Adam(flat, lr=0.01, fused=True).step,
        }
    )
    out |= timed(
        {
            "grads_per_layer_us": lambda: route(per_layer, [*bits, *exponents]),
            "grads_flat_us": lambda: route(flat, flat),
        }
    )
    if weight_shapes is not None:
        weights = [torch.nn.Parameter(torch.rand(s)) for s in weight_shapes]
        for p in weights:
            p.grad = torch.rand_like(p) * 1e-3
        be = {"lr": 0.01, "weight_decay": 0.0, "fused": True}

        def optimizer(group: list[torch.nn.Parameter] | None) -> torch.optim.Optimizer:
            extra = [{"params": group, **be}] if group else []
            return torch.optim.AdamW([{"params": weights}, *extra], lr=1e-3)

        out |= timed(
            {
                "step_weights_only_us": optimizer(None).step,
                "step_per_layer_us": optimizer(per_layer).step,
                "step_flat_us": optimizer(flat).step,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per fit (150); with --flat-be calls per repeat (2000)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (10); with --flat-be repeats (7)")
    parser.add_argument("--flat-be", action="store_true", help="time what one flat b/e pair would change")
    args = parser.parse_args()
    for flag in ("steps", "rounds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag} must be >= 1, got {value}")
    if args.flat_be:
        from lightning_sgsc.quant import quantize_, quantized_layers

        net, _ = _setup(args.model, 8)
        quantize_(net)
        sizes = [m.out_channels_ for _, m in quantized_layers(net)]
        qids = {id(p) for p in quantizer_parameters(net)}
        shapes = [tuple(p.shape) for p in net.parameters() if id(p) not in qids]
        times = flat_be(sizes, shapes, n=args.steps or 2000, repeats=args.rounds or 7)
        print(f"b/e of {sizes} channels: " + ", ".join(f"{k} {v}" for k, v in times.items()), flush=True)
        print(json.dumps({"sizes": sizes, **times}))
        return
    args.steps, args.rounds = args.steps or 150, args.rounds or 10
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    result = measure(args.model, args.steps, args.rounds)
    for variant, r in result.items():
        print(f"{variant:>14}: {r['ms']:.3f} ms/step, {r['ratio']:.3f}x float", flush=True)
    summary = {"model": args.model, "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds}
    print(json.dumps({**summary, "variants": result}))


if __name__ == "__main__":
    main()
