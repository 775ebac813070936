"""Tests for ``utils.metrics``: mean and 95% interval (normal over episodes, Student t over trials), and the
accuracy line (docs/original.md §6.4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import engine.stage2 as stage2
from engine.options import stage2_config
from utils.metrics import format_accuracy, mean_ci95, mean_t_ci95, t_central_probability, t_quantile_975


@pytest.mark.parametrize("values", [
    [0.5, 0.7],
    [1.0, 2.0, 4.0, 8.0],
    [59.0, 61.5, 58.25, 60.0, 57.75, 62.0, 55.5],
    list(np.random.default_rng(0).uniform(0, 100, size=600)),
])
def test_mean_ci95_uses_population_std(values) -> None:
    mean, half = mean_ci95(values)
    array = np.asarray(values, dtype=np.float64)
    assert mean == pytest.approx(array.mean(), rel=1e-12)
    assert half == pytest.approx(1.96 * np.std(array) / math.sqrt(len(array)), rel=1e-12)  # ddof=0
    if len(values) > 1:
        assert half != pytest.approx(1.96 * np.std(array, ddof=1) / math.sqrt(len(array)), rel=1e-6)


def test_mean_ci95_by_hand() -> None:
    # 2, 4, 4, 4, 5, 5, 7, 9: mean 5, population variance 4 (std 2): half-width 1.96 * 2 / sqrt(8)
    mean, half = mean_ci95([2, 4, 4, 4, 5, 5, 7, 9])
    assert mean == 5.0
    assert half == pytest.approx(3.92 / 8 ** 0.5, rel=1e-12)


def test_mean_ci95_single_value_has_zero_width() -> None:
    assert mean_ci95([0.42]) == (pytest.approx(0.42), 0.0)


def test_mean_ci95_refuses_empty() -> None:
    with pytest.raises(ValueError):
        mean_ci95([])


def test_format_accuracy_reproduces_the_paper_line() -> None:
    # 300 episodes at 69.888 % and 300 at 48.392 %: mean 59.14, std 10.748,
    # half-width 1.96 * 10.748 / sqrt(600) = 0.86002
    accuracies = [0.69888] * 300 + [0.48392] * 300
    line = format_accuracy(5, 1, "test", accuracies, 0)
    assert line == "5-way 1-shot test accuracy: 59.14 +- 0.86 % (600 episodes, seed 0)"


def test_format_accuracy_other_values() -> None:
    # [0.5, 0.7]: mean 60 %, std 10 %, half-width 19.6 / sqrt(2) = 13.859 %
    assert format_accuracy(5, 5, "val", [0.5, 0.7], 17) == \
        "5-way 5-shot val accuracy: 60.00 +- 13.86 % (2 episodes, seed 17)"
    # 1/3, 2/3, 1: mean 66.667 %, std 33.333 * sqrt(2/3) = 27.217 %, half-width 1.96 * 27.217 / sqrt(3) = 30.798 %
    line = format_accuracy(20, 1, "test", [1 / 3, 2 / 3, 1.0], 2)
    assert line == "20-way 1-shot test accuracy: 66.67 +- 30.80 % (3 episodes, seed 2)"


def test_report_prints_deformed_plain_and_paired_difference(capsys) -> None:
    deformed = [0.8, 0.6, 0.7, 0.9]
    plain = [0.7, 0.6, 0.5, 0.8]
    stats = {"acc": deformed, "plain": plain, "loss": [1.0, 2.0, 3.0, 6.0]}
    args = stage2_config(torch.device("cpu"), ways=5, shots=1, seed=3, tensorname="run", network="x")
    summary = stage2.report(stats, args, "test")
    lines = capsys.readouterr().out.splitlines()
    # deformed: mean 75, std sqrt(125) = 11.180; half 1.96 * 11.180 / 2 = 10.957
    assert lines[0] == "5-way 1-shot test accuracy: 75.00 +- 10.96 % (4 episodes, seed 3)"
    # plain: mean 65, std sqrt(125); difference per episode 10, 0, 20, 10: mean 10, std sqrt(50) = 7.071,
    # half 1.96 * 7.071 / 2 = 6.930
    assert lines[1] == "5-way 1-shot test accuracy without deformation: 65.00 +- 10.96 % (4 episodes, seed 3)"
    assert "+10.00 +- 6.93 %" in lines[2]
    assert summary["accuracy"] == pytest.approx(75.0)
    assert summary["ci95"] == pytest.approx(1.96 * math.sqrt(125) / 2)
    assert summary["plain_accuracy"] == pytest.approx(65.0)
    assert summary["difference"] == pytest.approx(10.0)
    assert summary["difference_ci95"] == pytest.approx(1.96 * math.sqrt(50) / 2)
    assert summary["loss"] == pytest.approx(3.0)
    assert summary["galleryBN"] == "train"
    assert summary["episodes"] == 4


# Published 97.5% quantiles of Student's t (standard tables, 7 decimals); 1.959964 is the normal's.
T_975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 9: 2.2621572, 10: 2.2281389,
         30: 2.0422725, 120: 1.9799304}


@pytest.mark.parametrize("df, quantile", sorted(T_975.items()))
def test_t_quantile_matches_the_tables(df, quantile) -> None:
    assert t_quantile_975(df) == pytest.approx(quantile, abs=5e-8)


def test_t_distribution_closed_forms() -> None:
    # df = 1 (Cauchy): P(|T| < t) = 2 atan(t) / pi; df = 2: t / sqrt(2 + t^2)
    for t in (0.3, 1.0, 4.0):
        assert t_central_probability(t, 1) == pytest.approx(2 * math.atan(t) / math.pi, rel=1e-12)
        assert t_central_probability(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-12)
    assert t_quantile_975(2000) == pytest.approx(1.959964, abs=2e-3)  # approaches the normal's
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_t_ci95_by_hand() -> None:
    # 1, 2, 3, 4, 5: mean 3, sample variance 10 / 4 = 2.5; half-width t(0.975, 4) * sqrt(2.5 / 5)
    mean, half = mean_t_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764451 * math.sqrt(0.5), abs=1e-7)
    assert half / mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])[1] == pytest.approx(1.58, abs=0.01)  # the "1.6x"
    mean, half = mean_t_ci95([70.0])
    assert mean == 70.0 and math.isnan(half)
