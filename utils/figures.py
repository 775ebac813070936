"""Figures: deformed images of an episode, and training curves from a metrics CSV."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.grid import weight_map


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[N, 3, S, S]`` -> ``[0, 1]`` RGB."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def save_deformation_figure(path: Path, probes: torch.Tensor, gallery: torch.Tensor, weights: torch.Tensor,
                            deformed: torch.Tensor, rows: int = 8) -> None:
    """One row per deformed image: probe, gallery image, cell weights (grey, 0 black, 1 white,
    clipped) and the deformed image. All images ``[N, 3, S, S]`` normalised; ``weights`` ``[N, F*F]``."""
    n, size = min(rows, len(probes)), probes.shape[-1]
    cells = weight_map(weights[:n].float().clamp(0, 1), size).expand(-1, 3, -1, -1).cpu()
    tiles = torch.stack([denormalize(probes[:n]).cpu(), denormalize(gallery[:n]).cpu(), cells,
                         denormalize(deformed[:n]).cpu()], dim=1).flatten(0, 1)
    if size < 96:
        tiles = F.interpolate(tiles, scale_factor=96 / size, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=4, padding=2, pad_value=1.0), path)
