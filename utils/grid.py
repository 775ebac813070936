"""The F x F patch grid shared by stage 1 (soft-random blending) and stage 2 (deformation)."""
from __future__ import annotations

import functools

import torch


def grid_boundaries(size: int, fang: int) -> list[int]:
    """Cell boundaries of an F x F grid on ``size`` pixels, identical on both axes.

    ``[i * (size // fang) for i in range(fang)] + [size]``: every cell has ``size // fang``
    pixels except the last, which takes the remainder (224 with F = 3 gives 0, 74, 148, 224).

    Returns:
        ``fang + 1`` increasing integers from 0 to ``size``.
    """
    if fang < 1:
        raise ValueError(f"grid size must be at least 1, got {fang}")
    if size < fang:
        raise ValueError(f"an image of {size} px cannot hold a {fang} x {fang} grid")
    step = size // fang
    return [i * step for i in range(fang)] + [size]


@functools.lru_cache(maxsize=None)
def cell_index(size: int, fang: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Index of the grid cell each pixel row (or column) belongs to, made once per size, grid and
    device (building it on a GPU would wait for the GPU at every call). Read only.

    Returns:
        Long tensor ``[size]`` with values in ``0..fang-1``.
    """
    bounds = grid_boundaries(size, fang)
    return torch.tensor([cell for cell in range(fang) for _ in range(bounds[cell], bounds[cell + 1])], device=device)


def weight_map(weights: torch.Tensor, size: int) -> torch.Tensor:
    """Paint one weight per grid cell onto the pixels of that cell.

    Args:
        weights: ``[N, F*F]`` cell weights in row-major order (row of cells, then column).
        size: image side S in pixels.

    Returns:
        ``[N, 1, S, S]`` per-pixel weights; differentiable with respect to ``weights``.
    """
    n, cells = weights.shape
    fang = round(cells ** 0.5)
    if fang * fang != cells:
        raise ValueError(f"expected F*F weights per image, got {cells}")
    index = cell_index(size, fang, weights.device)
    grid = weights.reshape(n, fang, fang)
    return grid[:, index][:, :, index].unsqueeze(1)
