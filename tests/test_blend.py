"""Tests for ``models.blend_patches``: the per-cell blend ``W * probe + (1 - W) * gallery`` (docs/original.md §4.1)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import blend_patches


def bounds(size: int, fang: int) -> list[int]:
    """Cell boundaries written out from docs/original.md §3.4: every cell has size // fang pixels, the last
    the rest."""
    return [i * (size // fang) for i in range(fang)] + [size]


def reference_blend(probe: torch.Tensor, gallery: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A direct loop over images and cells: cell (i, j) (i over rows) uses weights[:, i * F + j]."""
    n, _, size, _ = probe.shape
    fang = int(round(weights.shape[1] ** 0.5))
    edges = bounds(size, fang)
    out = torch.empty_like(probe)
    for b in range(n):
        for i in range(fang):
            for j in range(fang):
                w = weights[b, i * fang + j]
                rows = slice(edges[i], edges[i + 1])
                cols = slice(edges[j], edges[j + 1])
                out[b, :, rows, cols] = w * probe[b, :, rows, cols] + (1 - w) * gallery[b, :, rows, cols]
    return out


def random_inputs(n: int, size: int, fang: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64)
    gallery = torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64)
    weights = torch.randn(n, fang * fang, generator=generator, dtype=torch.float64)  # unconstrained, no sigmoid
    return probe, gallery, weights


@pytest.mark.parametrize("fang", [1, 3, 5, 7])
@pytest.mark.parametrize("size", [32, 33, 37, 61])
def test_blend_matches_per_cell_loop(fang: int, size: int) -> None:
    probe, gallery, weights = random_inputs(2, size, fang, seed=size * 10 + fang)
    out = blend_patches(probe, gallery, weights)
    assert out.shape == probe.shape
    torch.testing.assert_close(out, reference_blend(probe, gallery, weights), rtol=0, atol=1e-12)


def test_blend_last_cell_takes_the_remainder() -> None:
    # 37 px, F = 3: cells 0-11, 12-23, 24-36 (the last is 13 px wide). Probe 1, gallery 0: the output is W.
    probe, gallery = torch.ones(1, 3, 37, 37), torch.zeros(1, 3, 37, 37)
    weights = torch.arange(9, dtype=torch.float32).unsqueeze(0)
    out = blend_patches(probe, gallery, weights)[0, 0]
    assert out[0, 0] == 0 and out[11, 11] == 0
    assert out[0, 12] == 1 and out[0, 23] == 1 and out[0, 24] == 2 and out[0, 36] == 2
    assert out[12, 0] == 3 and out[24, 0] == 6 and out[36, 36] == 8 and out[23, 24] == 5
    # all three channels of a cell share the weight
    full = blend_patches(probe, gallery, weights)[0]
    assert torch.equal(full[0], full[1]) and torch.equal(full[1], full[2])


def test_blend_weight_one_and_zero_give_probe_and_gallery() -> None:
    probe, gallery, _ = random_inputs(3, 33, 3, seed=1)
    ones, zeros = torch.ones(3, 9, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.float64)
    torch.testing.assert_close(blend_patches(probe, gallery, ones), probe, rtol=0, atol=0)
    torch.testing.assert_close(blend_patches(probe, gallery, zeros), gallery, rtol=0, atol=0)


@pytest.mark.parametrize("fang,size", [(1, 32), (3, 37), (5, 61), (7, 33)])
def test_blend_weight_gradient_is_per_cell_sum(fang: int, size: int) -> None:
    probe, gallery, weights = random_inputs(2, size, fang, seed=fang + size)
    probe.requires_grad_(True)
    gallery.requires_grad_(True)
    weights.requires_grad_(True)
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    blend_patches(probe, gallery, weights).backward(upstream)

    edges = bounds(size, fang)
    expected = torch.zeros(2, fang * fang, dtype=torch.float64)
    mask = torch.zeros(2, 1, size, size, dtype=torch.float64)
    diff = (probe - gallery).detach()
    for b in range(2):
        for i in range(fang):
            for j in range(fang):
                rows, cols = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
                expected[b, i * fang + j] = (diff[b, :, rows, cols] * upstream[b, :, rows, cols]).sum()
                mask[b, :, rows, cols] = weights[b, i * fang + j].detach()
    torch.testing.assert_close(weights.grad, expected, rtol=1e-10, atol=1e-10)
    # and the image gradients are W * grad and (1 - W) * grad
    torch.testing.assert_close(probe.grad, mask * upstream, rtol=0, atol=1e-12)
    torch.testing.assert_close(gallery.grad, (1 - mask) * upstream, rtol=0, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the number of elements of every tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_blend_builds_no_per_cell_masks() -> None:
    # Every intermediate of the blend (forward and backward) is at most image-sized [N, 3, S, S];
    # per-cell masks [N, F*F, 3, S, S] (or [N, F*F, 1, S, S]) would be F*F (or F*F/3) times larger.
    n, size, fang = 2, 61, 7
    probe, gallery, weights = (t.float().requires_grad_(True) for t in random_inputs(n, size, fang, seed=3))
    with _LargestTensor() as probe_mode:
        out = blend_patches(probe, gallery, weights)
        out.sum().backward()
    image = n * 3 * size * size
    assert 0 < probe_mode.largest <= image
    assert fang * fang * n * size * size > image  # the bound would catch a per-cell mask
