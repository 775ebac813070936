"""95% confidence intervals: normal over many episodes, Student t over a few trials."""
from __future__ import annotations

import math
from collections.abc import Sequence


def _size_and_mean(values: Sequence[float]) -> tuple[int, float]:
    if len(values) == 0:
        raise ValueError("no values to summarise")
    return len(values), sum(values) / len(values)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, ``1.96 * std / sqrt(n)``), the population std as numpy's default (0 for a single value)."""
    n, mean = _size_and_mean(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, 1.96 * std / math.sqrt(n)


def t_central_probability(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``df``: the closed-form series in ``cos(atan(t / sqrt(df)))**2``."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    odd = df % 2 == 1
    term, series = 1.0, 1.0
    for j in range(1, (df - 1) // 2 if odd else df // 2):
        # odd df: 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ...; even df: 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ...
        term *= cos2 * ((2 * j) / (2 * j + 1) if odd else (2 * j - 1) / (2 * j))
        series += term
    if odd:
        tail = math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0
        return 2 / math.pi * (theta + tail)
    return math.sin(theta) * series


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df >= 1``, by bisection on :func:`t_central_probability`."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    low, high = 0.0, 2.0
    while t_central_probability(high, df) < 0.95:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_central_probability(middle, df) < 0.95 else (low, middle)
    return (low + high) / 2


def mean_t_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, ``t(0.975, n - 1) * s / sqrt(n)``), ``s`` the sample std (nan for a single value)."""
    n, mean = _size_and_mean(values)
    if n == 1:
        return mean, math.nan
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sample_std / math.sqrt(n)


def format_accuracy(ways: int, shots: int, split: str, accuracies: Sequence[float], seed: int) -> str:
    """``5-way 1-shot test accuracy: 59.14 +- 0.86 % (600 episodes, seed 0)``; accuracies in [0, 1]."""
    mean, half = mean_ci95([100 * a for a in accuracies])
    return (f"{ways}-way {shots}-shot {split} accuracy: {mean:.2f} +- {half:.2f} % "
            f"({len(accuracies)} episodes, seed {seed})")

