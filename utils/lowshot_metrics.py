"""The metrics of the ImageNet-1K low-shot benchmark from a score matrix over base + novel classes.

Scores are ``[M, B + N]``: the setup's B base classes in the first columns, its N novel classes
after them; ``targets`` ``[M]`` are column indices. Accuracies are in %.

- ``novel``: novel test images, ranked over the novel classes only (what later papers report);
- ``novel_joint``: novel test images over base + novel classes (the original benchmark's number);
- ``base``: base test images over base + novel classes;
- ``all``: every test image over base + novel classes;
- ``all_prior``: as ``all``, with the base and novel probabilities (softmax of ``scores / T``)
  renormalised to sum to ``1 - mu`` and ``mu``; the temperature ``T`` and ``mu`` are chosen
  together on the validation setup. Prototype scores ``-scale * ||x - p||^2`` run to the hundreds,
  so at ``T = 1`` the softmax is one-hot and every ``mu < 0.5`` ranks like base-only.
"""
from __future__ import annotations

import math

import torch

METRIC_NAMES = ("novel", "novel_joint", "base", "all", "all_prior")
TOPK = (1, 5)
PRIOR_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # candidate mu values
TEMPERATURE_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)  # candidate T values


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """% of rows of ``scores`` ``[M, C]`` whose ``targets`` ``[M]`` column is among the k highest: fewer
    than k other columns score at least as high (a tie counts against the target, so an undecided
    classifier gets no credit and no tie is broken by column order); nan for no rows."""
    if len(targets) == 0:
        return math.nan
    target = scores.gather(1, targets.unsqueeze(1))
    rivals = (scores >= target).sum(1) - 1
    return 100.0 * int((rivals < k).sum()) / len(targets)


def _log_weight(weight: float) -> float:
    return math.log(weight) if weight > 0 else -math.inf


def prior_scores(scores: torch.Tensor, num_base: int, mu: float, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``[M, B+N]`` whose base part sums to ``1 - mu`` and novel part to ``mu``
    (softmax over each part of ``scores / temperature``): ``all_prior`` ranks by these, at one point of the
    grids :func:`prior_curve` covers."""
    base = torch.log_softmax(scores[:, :num_base] / temperature, 1) + _log_weight(1 - mu)
    novel = torch.log_softmax(scores[:, num_base:] / temperature, 1) + _log_weight(mu)
    return torch.cat([base, novel], 1)


def lowshot_metrics(scores: torch.Tensor, targets: torch.Tensor, num_base: int) -> dict[str, dict[int, float]]:
    """Every metric of the module docstring but ``all_prior`` (:func:`prior_curve`), top-1 and top-5:
    ``{metric: {k: accuracy %}}``."""
    novel = targets >= num_base
    out = {"novel": {k: topk_accuracy(scores[novel, num_base:], targets[novel] - num_base, k) for k in TOPK}}
    for name, mask in (("novel_joint", novel), ("base", ~novel), ("all", torch.ones_like(novel))):
        out[name] = {k: topk_accuracy(scores[mask], targets[mask], k) for k in TOPK}
    return out


def prior_curve(scores: torch.Tensor, targets: torch.Tensor, num_base: int,
                temperatures: tuple[float, ...] = TEMPERATURE_GRID,
                grid: tuple[float, ...] = PRIOR_GRID) -> list[list[dict[int, int]]]:
    """``all_prior`` top-1 and top-5 hits ``{k: test images}`` (as :func:`topk_accuracy` counts them, exact
    integers) for each temperature (outer list) and ``mu`` (inner list). The prior adds one constant to each part, so
    whether fewer than k rivals reach the target is decided by each part's own k highest: those
    ``[M, 2k]`` candidates are compared once per ``mu``."""
    k = max(TOPK)
    is_novel = (targets >= num_base).unsqueeze(1)
    curves = []
    for temperature in temperatures:
        base = torch.log_softmax(scores[:, :num_base] / temperature, 1)
        novel = torch.log_softmax(scores[:, num_base:] / temperature, 1)
        target = torch.cat([base, novel], 1).gather(1, targets.unsqueeze(1))  # the target's log-probability
        top_base, top_novel = base.topk(min(k, num_base), 1), novel.topk(min(k, novel.shape[1]), 1)
        own = torch.cat([top_base.indices, top_novel.indices + num_base], 1) == targets.unsqueeze(1)
        curve = []
        for mu in grid:
            shift = torch.where(is_novel, _log_weight(mu), _log_weight(1 - mu))
            candidates = torch.cat([top_base.values + _log_weight(1 - mu), top_novel.values + _log_weight(mu)], 1)
            rivals = ((candidates >= target + shift) & ~own).sum(1)
            curve.append({top: int((rivals < top).sum()) for top in TOPK})
        curves.append(curve)
    return curves


def best_prior(curves: list[list[list[dict[int, int]]]], temperatures: tuple[float, ...] = TEMPERATURE_GRID,
               grid: tuple[float, ...] = PRIOR_GRID) -> tuple[float, float]:
    """The ``(temperature, mu)`` of the grids with the most top-5 hits summed over ``curves`` (one
    :func:`prior_curve` per trial, all on the same test images: the best mean top-5 accuracy), compared
    as exact counts; on ties the smallest temperature, then the smallest ``mu``."""
    candidates = [(t, m) for t in range(len(temperatures)) for m in range(len(grid))]
    hits = {(t, m): sum(curve[t][m][5] for curve in curves) for t, m in candidates}
    t, m = max(candidates, key=lambda c: (hits[c], -c[0], -c[1]))
    return temperatures[t], grid[m]


def curve_accuracy(curve: list[list[dict[int, int]]], temperature: float, mu: float,
                   test_images: int) -> dict[int, float]:
    """The ``all_prior`` accuracy ``{k: %}`` at ``(temperature, mu)``, read off a :func:`prior_curve` of
    ``test_images``."""
    hits = curve[TEMPERATURE_GRID.index(temperature)][PRIOR_GRID.index(mu)]
    return {k: 100.0 * count / test_images for k, count in hits.items()}
