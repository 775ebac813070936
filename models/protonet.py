"""Prototype classifier maths shared by both stages."""
from __future__ import annotations

import torch


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for ``a`` ``[N, D]`` and ``b`` ``[M, D]`` -> ``[N, M]``."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean feature per class: ``features`` ``[N, D]``, ``labels`` ``[N]`` in 0..ways-1 -> ``[ways, D]``."""
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.zeros(ways, 1, dtype=features.dtype, device=features.device)
    counts.index_add_(0, labels, torch.ones(len(labels), 1, dtype=features.dtype, device=features.device))
    return sums / counts  # counts by index_add_: bincount would wait for the GPU to size its output


def proto_logits(queries: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``-scale * ||q - p||^2`` for queries ``[Q, D]`` and prototypes ``[W, D]`` -> ``[Q, W]``."""
    return -scale * squared_distances(queries, protos)
