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
