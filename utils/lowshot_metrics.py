"""The metrics of the ImageNet-1K low-shot benchmark from a score matrix over base + novel classes.

Scores are ``[M, B + N]``: the setup's B base classes in the first columns, its N novel classes
after them; ``targets`` ``[M]`` are column indices. Accuracies are in %.

- ``novel``: novel test images, ranked over the novel classes only (what later papers report);
- ``novel_joint``: novel test images over base + novel classes (the original benchmark's number);
- ``base``: base test images over base + novel classes;
- ``all``: every test image over base + novel classes;
- ``all_prior``: as ``all``, with the base and novel probabilities renormalised to sum to
  ``1 - mu`` and ``mu`` (``mu`` chosen on the validation setup).
"""
from __future__ import annotations

import math

import torch

METRIC_NAMES = ("novel", "novel_joint", "base", "all", "all_prior")
TOPK = (1, 5)
PRIOR_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # candidate mu values


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """% of rows of ``scores`` ``[M, C]`` whose ``targets`` ``[M]`` column is among the k highest
    (all of them when C <= k); nan for no rows."""
    if len(targets) == 0:
        return math.nan
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * (top == targets.unsqueeze(1)).any(1).float().mean().item()


def prior_scores(scores: torch.Tensor, num_base: int, mu: float) -> torch.Tensor:
    """Log-probabilities ``[M, B+N]`` whose base part sums to ``1 - mu`` and novel part to ``mu``
    (softmax over each part of ``scores``)."""
    base = torch.log_softmax(scores[:, :num_base], 1) + (math.log(1 - mu) if mu < 1 else -math.inf)
    novel = torch.log_softmax(scores[:, num_base:], 1) + (math.log(mu) if mu > 0 else -math.inf)
    return torch.cat([base, novel], 1)


def lowshot_metrics(scores: torch.Tensor, targets: torch.Tensor, num_base: int,
                    mu: float | None = None) -> dict[str, dict[int, float]]:
    """Every metric of the module docstring, top-1 and top-5: ``{metric: {k: accuracy %}}``
    (``all_prior`` only when ``mu`` is given)."""
    novel = targets >= num_base
    rows = {"novel_joint": novel, "base": ~novel, "all": torch.ones_like(novel)}
    out = {"novel": {k: topk_accuracy(scores[novel, num_base:], targets[novel] - num_base, k) for k in TOPK}}
    for name, mask in rows.items():
        out[name] = {k: topk_accuracy(scores[mask], targets[mask], k) for k in TOPK}
    if mu is not None:
        out["all_prior"] = {k: topk_accuracy(prior_scores(scores, num_base, mu), targets, k) for k in TOPK}
    return out


def prior_curve(scores: torch.Tensor, targets: torch.Tensor, num_base: int,
                grid: tuple[float, ...] = PRIOR_GRID) -> list[dict[int, float]]:
    """``all_prior`` top-1 and top-5 accuracy ``{k: %}`` for each ``mu`` of ``grid``."""
    return [{k: topk_accuracy(prior_scores(scores, num_base, mu), targets, k) for k in TOPK} for mu in grid]


def best_prior(curves: list[list[dict[int, float]]], grid: tuple[float, ...] = PRIOR_GRID) -> float:
    """The ``mu`` of ``grid`` with the highest mean top-5 over ``curves`` (one :func:`prior_curve` per
    trial); the smallest such ``mu`` on ties."""
    means = [sum(point[5] for point in points) / len(points) for points in zip(*curves)]
    return grid[max(range(len(grid)), key=lambda i: (means[i], -i))]
