"""The measured metric's pure helpers: the trend-free noise estimate and the plateau."""

from __future__ import annotations

import math
import random

import pytest

from lightning_sgsc.signal import DifferenceNoise, Direction, Plateau, TrendFreeNoise, linear_trend


def test_linear_trend_is_the_least_squares_slope():
    assert linear_trend([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert linear_trend([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)
    assert linear_trend([4.0]) == 0.0


@pytest.mark.parametrize("trend", [0.0, 0.01, -0.01])
def test_the_trend_free_noise_measures_the_noise_whatever_the_trend(trend):
    rng = random.Random(0)
    noise, first = TrendFreeNoise(), DifferenceNoise()
    for i in range(400):
        value = 0.9 + trend * i + rng.gauss(0, 0.002)
        noise.update(value)
        first.update(value)
    assert noise.value == pytest.approx(0.002, rel=0.35)
    if trend:  # the first-difference estimate reads the trend as noise: three times the true value here
        assert first.value > 2.5 * noise.value


def test_the_noise_estimate_is_not_shrunk_towards_zero_at_the_start():
    noise = TrendFreeNoise(smoothing=0.8)
    noise.update(0.90)
    assert noise.value == 0.0  # nothing to compare yet
    noise.update(0.92)  # one difference of 0.02: sd 0.02 sqrt(pi / 2) / sqrt(2), not a fifth of it
    assert noise.value == pytest.approx(0.02 * math.sqrt(math.pi / 2) / math.sqrt(2))


def test_the_noise_state_round_trips_and_a_0_3_state_loads():
    a = TrendFreeNoise()
    for v in (0.5, 0.7, 0.6, 0.8):
        a.update(v)
    b = TrendFreeNoise()
    b.load_state_dict(a.state_dict())
    assert b.update(0.75) == a.update(0.75)
    old = TrendFreeNoise()
    old.load_state_dict({"noise": 0.01, "last": 0.9})  # 0.3 saved the first-difference estimate and one value
    assert old.value == pytest.approx(0.01) and old.last == 0.9


def test_a_rising_metric_is_not_a_plateau_and_a_flat_one_is_after_confirmation():
    rising = Plateau(Direction.MAX)
    assert not any(rising.update(0.5 + 0.01 * i, tolerance=0.01, noise=0.001) for i in range(30))
    flat = Plateau(Direction.MAX, window=5, confirm=2)
    verdicts = [flat.update(0.9, tolerance=0.01, noise=0.0) for _ in range(7)]
    assert verdicts == [False, False, False, False, False, True, True]  # 5 values to fit, then 2 flat checks


def test_the_plateau_is_judged_in_the_metric_s_direction_and_with_its_uncertainty():
    falling_loss = Plateau(Direction.MIN)
    assert not any(falling_loss.update(2.0 - 0.05 * i, tolerance=0.01) for i in range(20))  # still improving
    worsening = Plateau(Direction.MIN, confirm=1)
    assert [worsening.update(1.0 + 0.05 * i, tolerance=0.01) for i in range(5)][-1]  # no gain ahead
    # the same flat values, measured with much noise: not flat beyond doubt
    doubtful = Plateau(Direction.MAX, confirm=1)
    assert not any(doubtful.update(0.9, tolerance=0.01, noise=0.05) for _ in range(8))


def test_the_plateau_state_round_trips():
    a = Plateau(Direction.MAX)
    for v in (0.5, 0.6, 0.65, 0.66):
        a.update(v, 0.01)
    b = Plateau(Direction.MAX)
    b.load_state_dict(a.state_dict())
    assert [a.update(0.66, 0.01) for _ in range(4)] == [b.update(0.66, 0.01) for _ in range(4)]
