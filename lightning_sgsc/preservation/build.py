"""``build_preservation_set``: choose the examples that matter most from the data the user passes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.outputs import OutputFn
from lightning_sgsc.preservation.scoring import STRATEGIES, Strategy, Uncertainty, score_pool
from lightning_sgsc.preservation.set import PreservationSet

DEFAULT_FRACTIONS: dict[str, float] = {"gradcam": 1 / 3, "uncertainty": 1 / 3, "kmeans": 1 / 3}


def check_fractions(fractions: Mapping[str, float], arg: str = "fractions") -> dict[str, float]:
    """Validates a ``{strategy: share}`` mapping: known names, shares >= 0 summing to 1 (``arg`` names it)."""
    if not isinstance(fractions, Mapping):
        raise SGSCTypeError(describe_rule(arg, "a mapping like {'gradcam': 0.5, 'kmeans': 0.5}", fractions))
    for name, share in fractions.items():
        if name not in STRATEGIES:
            raise SGSCValueError(describe_rule(arg, f"keys among {sorted(STRATEGIES)}", name))
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0:
            raise SGSCValueError(describe_rule(f"{arg}[{name!r}]", "a number >= 0", share))
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise SGSCValueError(describe_rule(arg, "shares that sum to 1", dict(fractions)))
    return {k: float(v) for k, v in fractions.items()}


def _split(size: int, fractions: dict[str, float]) -> dict[str, int]:
    counts = {k: int(math.floor(size * f)) for k, f in fractions.items()}
    rest = size - sum(counts.values())
    for k in sorted(fractions, key=lambda k: size * fractions[k] - counts[k], reverse=True)[:rest]:
        counts[k] += 1
    return counts


def build_preservation_set(
    model: nn.Module,
    data: Dataset | DataLoader,
    size: int,
    fractions: Mapping[str, float] | None = None,
    balance_classes: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    target_layer: str | None = None,
    uncertainty: str = "margin",
    pool_size: int | None = None,
    progress: bool = False,
    modality: str = "auto",
    output_fn: OutputFn | None = None,
) -> PreservationSet:
    """Scores candidates from ``data`` and returns the ``size`` that matter most.

    Args:
        model: a classifier returning logits (its current weights are used; eval mode during scoring).
        data: a map-style Dataset of ``(input, target)`` or a DataLoader over one (re-read in order, not shuffled).
            Pass training or validation data, never the test split.
        size: examples to choose, 1 to the pool size.
        fractions: share of the budget per strategy (``gradcam``, ``uncertainty``, ``kmeans``, ``random``),
            summing to 1. Default: a third each of the first three.
        balance_classes: cap each class at ``ceil(size / classes)`` examples.
        seed: seed of pool sampling and k-means.
        batch_size: batch size of the scoring pass.
        target_layer: Grad-CAM layer name (default: the last Conv2d).
        uncertainty: ``"margin"`` or ``"entropy"``.
        pool_size: score only this many candidates, drawn at random (seeded); default: all.
        progress: show a progress bar while scoring.
        modality: ``"auto"`` (read off the inputs and outputs) or one of ``"image"``, ``"text"``, ``"tokens"``,
            ``"dense"`` (see :mod:`~lightning_sgsc.preservation.scoring`).
        output_fn: which tensor of the model's output are the logits (default: :mod:`lightning_sgsc.outputs`).

    Returns:
        The set, with the source indices, each strategy's scores and which strategy chose each example.
    """
    fractions = check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    collate = data.collate_fn if isinstance(data, DataLoader) else None
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise SGSCTypeError(describe_rule("data", "a map-style Dataset or a DataLoader over one", type(dataset)))
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise SGSCValueError(describe_rule("data", "a non-empty Dataset or DataLoader", "0 examples"))
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(n_total)
    if pool_size is not None and pool_size < n_total:
        candidates = torch.randperm(n_total, generator=generator)[:pool_size].sort().values
    pool = len(candidates)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= pool:
        raise SGSCValueError(describe_rule("size", f"an integer from 1 to the pool size ({pool})", size))
    from torch.utils.data import Subset

    extra: dict[str, Any] = {"collate_fn": collate} if collate is not None else {}
    loader = DataLoader(Subset(dataset, candidates.tolist()), batch_size=batch_size, shuffle=False, **extra)
    device = next(model.parameters()).device
    batches = ([t.to(device) if isinstance(t, torch.Tensor) else t for t in b] for b in loader)
    scores = score_pool(
        model,
        batches,
        target_layer=target_layer,
        with_gradcam=fractions.get("gradcam", 0) > 0,
        progress=progress,
        total=len(loader),
        modality=modality,
        output_fn=output_fn,
    )
    cap = None
    if balance_classes and scores.modality in ("tokens", "dense"):
        rule = f"False for {scores.modality} outputs (an example has no single class)"
        raise SGSCValueError(describe_rule("balance_classes", rule, True))
    if balance_classes:
        classes = int(scores.targets.max()) + 1
        cap = {c: math.ceil(size / classes) for c in range(classes)}
    strategies: dict[str, Strategy] = {
        name: (Uncertainty(uncertainty) if name == "uncertainty" else STRATEGIES[name]()) for name in fractions
    }
    taken: set[int] = set()
    chosen: list[int] = []
    chosen_by: list[str] = []
    for name, n in _split(size, fractions).items():
        picks = strategies[name].choose(scores, n, taken, cap, seed)
        chosen += picks
        chosen_by += [name] * len(picks)
    if len(chosen) < size:  # class caps left the budget short: fill with the remaining highest-uncertainty examples
        fill = Uncertainty(uncertainty).choose(scores, size - len(chosen), taken, None, seed)
        chosen += fill
        chosen_by += ["uncertainty"] * len(fill)
    positions = torch.tensor(chosen, dtype=torch.long)
    source = candidates[positions]
    pset = PreservationSet.from_data(dataset, source.tolist())
    per_strategy = {name: s.scores(scores) for name, s in strategies.items() if name in ("gradcam", "uncertainty")}
    pset.scores = {name: v[positions] for name, v in per_strategy.items()}
    pset.chosen_by = chosen_by
    histogram = Counter(int(t) for t in scores.targets[positions]) if scores.targets.dim() == 1 else Counter()
    by_class = f"classes {dict(sorted(histogram.items()))}; " if histogram else ""
    rank_zero_info(
        f"[sgsc] preservation set: {size} of {pool} candidates; {by_class}by strategy {dict(Counter(chosen_by))}"
    )
    return pset
