"""The budget controller alone: noisy metrics, convergence, warm-up, size budgets, resume, bad arguments."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lightning_sgsc.budget import BudgetConfig, BudgetController
from lightning_sgsc.errors import SGSCValueError


def _accuracy(weight: float) -> float:
    """A model whose accuracy falls as the size penalty grows: 0.95 at 0.01, 2 points less per factor of 10."""
    return 0.95 - 0.02 * math.log10(max(weight, 1e-9) / 0.01)


def _run(controller: BudgetController, checks: int, noise: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    weights = []
    for _ in range(checks):
        controller.update(_accuracy(controller.weight or 1e-9) + rng.gauss(0, noise))
        weights.append(controller.weight)
    return weights


def test_it_converges_to_the_budget_and_neither_oscillates_nor_collapses_on_noise():
    # budget: at most 2 points below 0.95, so the weight should settle near 0.1 (accuracy 0.93)
    for seed in range(5):
        ctl = BudgetController(BudgetConfig(max_drop=0.02, reference=0.95), initial_weight=0.01)
        weights = _run(ctl, 80, noise=0.0056, seed=seed)  # one image of 180, as digits' validation split
        tail = weights[-30:]
        assert all(0.03 < w < 0.3 for w in tail), (seed, tail)  # near the budget's weight, a factor 3 either way
        changes = sum(1 for a, b in itertools.pairwise(tail) if a != b)
        assert changes < 25  # within the noise it holds still
        assert min(weights) > 0.01 / 10  # never collapsed on a noisy dip


def test_a_metric_that_never_moves_lets_the_weight_grow_and_a_violation_lowers_it_fast():
    ctl = BudgetController(BudgetConfig(max_drop=0.02, reference=0.95), initial_weight=0.01)
    for _ in range(5):
        ctl.update(0.95)
    assert ctl.weight > 0.01 * math.exp(5 * 0.5) * 0.99
    high = ctl.weight
    ctl.update(0.80)  # far beyond the budget: twice the step, down
    assert ctl.weight < high * math.exp(-0.5)


def test_the_warm_up_runs_without_the_size_term_and_sets_the_reference():
    ctl = BudgetController(BudgetConfig(max_drop=0.01, warmup=2), initial_weight=0.05)
    assert ctl.weight == 0.0
    ctl.update(0.90)
    check = ctl.update(0.92)
    assert check.warming_up and ctl.reference == pytest.approx(0.91)  # the best smoothed value
    assert ctl.weight == pytest.approx(0.05)
    assert not ctl.update(0.80).warming_up


def test_relative_drops_and_min_mode():
    ctl = BudgetController(BudgetConfig(max_drop=0.1, drop_type="relative", mode="min", reference=2.0), 0.01)
    assert ctl.drop(2.1) == pytest.approx(0.05) and ctl.drop(1.9) == pytest.approx(-0.05)
    assert ctl.update(2.1).within and not ctl.update(3.0).within


def test_within_needs_a_margin_of_the_noise():
    ctl = BudgetController(BudgetConfig(max_drop=0.02, reference=0.95, smoothing=0.0), 0.01)
    ctl.update(0.95)
    ctl.update(0.90)  # a noisy pair: the noise estimate is now large
    assert ctl.noise > 0.02
    assert not ctl.update(0.94).within  # 1 point below: inside the budget, not beyond doubt


def test_a_size_budget_steers_the_weight_to_the_target():
    def size(weight: float) -> float:
        return 100_000 / (1 + 10 * weight)

    ctl = BudgetController(BudgetConfig(target_bytes=20_000), initial_weight=0.01)
    for _ in range(60):
        ctl.update(0.9, size(ctl.weight))
    assert 0.95 * 20_000 * 0.9 < size(ctl.weight) <= 20_000 * 1.05


def test_the_state_round_trips_exactly():
    a = BudgetController(BudgetConfig(max_drop=0.02, warmup=1), 0.01)
    _run(a, 7, noise=0.01, seed=3)
    b = BudgetController(BudgetConfig(max_drop=0.02, warmup=1), 0.01)
    b.load_state_dict(a.state_dict())
    assert _run(a, 10, 0.01, seed=4) == _run(b, 10, 0.01, seed=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_drop": 0.01, "target_bytes": 1000}, r"`max_drop` must be None when target_bytes"),
        ({"target_bytes": 1000, "target_bits_per_weight": 2.0}, r"`target_bits_per_weight` must be None"),
        ({"max_drop": -1}, r"`max_drop` must be a number > 0"),
        ({"max_drop": 0.01, "drop_type": "percent"}, r"`drop_type` must be one of \('absolute', 'relative'\)"),
        ({"max_drop": 0.01, "mode": "up"}, r"`mode` must be 'max' or 'min'"),
        ({"target_bytes": 0}, r"`target_bytes` must be a number > 0"),
        ({"max_drop": 0.01, "reference": float("nan")}, r"`reference_value` must be a finite number"),
        ({"max_drop": 0.1, "drop_type": "relative", "reference": 0.0}, r"`reference_value` must be not 0"),
        ({"max_drop": 0.01, "warmup": 0}, r"`budget_warmup_checks` must be >= 1 when no reference_value"),
    ],
)
def test_bad_budgets_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(SGSCValueError, match=match):
        BudgetConfig(**kwargs)


def test_a_budget_needs_a_positive_starting_weight():
    with pytest.raises(SGSCValueError, match=r"`bit_weight` must be a constant > 0 with a budget"):
        BudgetController(BudgetConfig(max_drop=0.01, reference=0.9), 0.0)
