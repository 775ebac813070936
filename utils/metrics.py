"""Accuracy summaries with 95% confidence intervals."""
from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-interval ``1.96 * std / sqrt(n)`` (population std, as numpy's default).

    Returns:
        ``(mean, half_width)``; the half-width is 0 for a single value.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, 1.96 * std / math.sqrt(n)


def format_accuracy(ways: int, shots: int, split: str, accuracies: Sequence[float], seed: int) -> str:
    """``5-way 1-shot test accuracy: 59.14 +- 0.86 % (600 episodes, seed 0)``; accuracies in [0, 1]."""
    mean, half = mean_ci95([100 * a for a in accuracies])
    return (f"{ways}-way {shots}-shot {split} accuracy: {mean:.2f} +- {half:.2f} % "
            f"({len(accuracies)} episodes, seed {seed})")


# Student's t 97.5 % quantiles for 1..30 degrees of freedom (to 7 decimals).
T975 = (12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243, 2.3060041, 2.2621572,
        2.2281389, 2.2009852, 2.1788128, 2.1603687, 2.1447867, 2.1314495, 2.1199053, 2.1098156, 2.1009220,
        2.0930241, 2.0859634, 2.0796138, 2.0738731, 2.0686576, 2.0638986, 2.0595386, 2.0555294, 2.0518305,
        2.0484071, 2.0452296, 2.0422725)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom: the table above, beyond it
    the Cornish-Fisher expansion around the normal quantile (error below 2e-6 from df = 31 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_std_t95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (ddof 1) and the t-based 95 % half-interval of the mean
    ``t975(n - 1) * std / sqrt(n)`` of ``values``; std and half-interval are nan for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t975(n - 1) * std / math.sqrt(n)
