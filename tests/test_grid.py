"""The F x F patch grid (docs/original.md §3.4: boundaries ``[i * (S // F) for i in range(F)] + [S]``)."""
from __future__ import annotations

import pytest
import torch

from utils.grid import cell_index, weight_map


def cell_starts(size: int, fang: int) -> list[int]:
    """The first pixel of each cell (where :func:`cell_index` steps up by one), then ``size``."""
    index = cell_index(size, fang).tolist()
    assert index[0] == 0 and all(b - a in (0, 1) for a, b in zip(index, index[1:])) and index[-1] == fang - 1
    return [p for p in range(size) if p == 0 or index[p] != index[p - 1]] + [size]


@pytest.mark.parametrize("fang,expected", [
    (1, [0, 224]),
    (3, [0, 74, 148, 224]),
    (5, [0, 44, 88, 132, 176, 224]),
    (7, [0, 32, 64, 96, 128, 160, 192, 224]),
])
def test_grid_boundaries_at_224(fang: int, expected: list[int]) -> None:
    assert cell_starts(224, fang) == expected


@pytest.mark.parametrize("size,fang,expected", [
    (84, 3, [0, 28, 56, 84]),
    (32, 5, [0, 6, 12, 18, 24, 32]),  # last cell takes the remainder (8 px)
    (7, 7, [0, 1, 2, 3, 4, 5, 6, 7]),
])
def test_grid_boundaries_last_cell_takes_remainder(size: int, fang: int, expected: list[int]) -> None:
    assert cell_starts(size, fang) == expected


@pytest.mark.parametrize("size,fang,expected", [
    (10, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]),
    (7, 2, [0, 0, 0, 1, 1, 1, 1]),
    (5, 5, [0, 1, 2, 3, 4]),
    (4, 1, [0, 0, 0, 0]),
])
def test_cell_index_written_out(size: int, fang: int, expected: list[int]) -> None:
    assert cell_index(size, fang).tolist() == expected


@pytest.mark.parametrize("size", [31, 33, 47, 50, 224])
@pytest.mark.parametrize("fang", [1, 3, 5, 7])
def test_cell_index_gives_size_over_f_pixels_per_cell_and_the_rest_to_the_last(size: int, fang: int) -> None:
    """docs/original.md §3.4: pixel p lies in cell ``p // (S // F)``, except that the pixels past the
    first F - 1 cells all belong to the last one."""
    step = size // fang
    assert cell_index(size, fang).tolist() == [min(pixel // step, fang - 1) for pixel in range(size)]


def _loop_weight_map(weights: torch.Tensor, size: int, fang: int) -> torch.Tensor:
    """Reference: paint each cell with a direct loop over rows and columns of cells."""
    step = size // fang
    starts = [i * step for i in range(fang)]
    ends = starts[1:] + [size]
    out = torch.full((weights.shape[0], 1, size, size), float("nan"))
    for n in range(weights.shape[0]):
        for row in range(fang):
            for col in range(fang):
                out[n, 0, starts[row]:ends[row], starts[col]:ends[col]] = weights[n, row * fang + col]
    return out


@pytest.mark.parametrize("size", [31, 33, 47, 50])
@pytest.mark.parametrize("fang", [1, 3, 5, 7])
def test_weight_map_matches_direct_loop(size: int, fang: int) -> None:
    generator = torch.Generator().manual_seed(size * 10 + fang)
    weights = torch.randn(3, fang * fang, generator=generator)
    got = weight_map(weights, size)
    expected = _loop_weight_map(weights, size, fang)
    assert got.shape == (3, 1, size, size)
    assert not torch.isnan(expected).any()
    assert torch.equal(got, expected)


def test_weight_map_row_major_cells() -> None:
    # weight k = k: cell (row r, column c) must hold r * F + c, rows along the height axis.
    weights = torch.arange(9, dtype=torch.float32).view(1, 9)
    grid = weight_map(weights, 9)[0, 0]
    assert grid[0, 8].item() == 2  # top-right
    assert grid[8, 0].item() == 6  # bottom-left
    assert grid[4, 4].item() == 4


def test_weight_map_is_differentiable() -> None:
    weights = torch.rand(2, 9, requires_grad=True)
    weight_map(weights, 224).sum().backward()
    # each gradient is the pixel count of its cell; at 224 px, F = 3 the cells are 74, 74, 76 wide,
    # and cell k sits at row k // 3, column k % 3
    sizes = [74, 74, 76]
    expected = torch.tensor([[sizes[k // 3] * sizes[k % 3] for k in range(9)]] * 2, dtype=torch.float32)
    assert torch.equal(weights.grad, expected)


@pytest.mark.parametrize("fang", [0, -1])
def test_grid_rejects_nonpositive_grid_size(fang: int) -> None:
    with pytest.raises(ValueError):
        cell_index(224, fang)


def test_grid_rejects_grid_larger_than_image() -> None:
    with pytest.raises(ValueError):
        cell_index(4, 5)
    with pytest.raises(ValueError):
        weight_map(torch.rand(1, 25), 4)


@pytest.mark.parametrize("cells", [2, 8, 10])
def test_weight_map_rejects_non_square_cell_count(cells: int) -> None:
    with pytest.raises(ValueError):
        weight_map(torch.rand(1, cells), 32)
