"""The F x F patch grid shared by stage 1 (soft-random blending) and stage 2 (deformation)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cell_index(size: int, fang: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The cell of each pixel row (or column), long ``[size]``: ``p // (size // fang)``, the last cell taking the
    remainder (224 px, 3 cells: 74, 74, 76 px); cached per device, read only."""
    if fang < 1:
        raise ValueError(f"grid size must be at least 1, got {fang}")
    if size < fang:
        raise ValueError(f"an image of {size} px cannot hold a {fang} x {fang} grid")
    return (torch.arange(size, device=device) // (size // fang)).clamp_(max=fang - 1)


def weight_map(weights: torch.Tensor, size: int) -> torch.Tensor:
    """Cell weights ``[N, F*F]`` (row-major) painted onto their pixels: ``[N, 1, S, S]``, ``S = size``."""
    n, cells = weights.shape
    fang = round(cells ** 0.5)
    if fang * fang != cells:
        raise ValueError(f"expected F*F weights per image, got {cells}")
    index = cell_index(size, fang, weights.device)
    grid = weights.reshape(n, fang, fang)
    return grid[:, index][:, :, index].unsqueeze(1)
