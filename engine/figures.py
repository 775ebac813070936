"""The deformed-images figure of an episode."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from datasets.transforms import denormalize
from utils.grid import weight_map

# Frame colours of a gallery tile by its class relation to the probe (engine.episode.gallery_relation):
# another class than the episode's (grey), another class of the episode (orange), the probe's own (green).
RELATION_COLOURS = ((0.6, 0.6, 0.6), (1.0, 0.55, 0.0), (0.0, 0.75, 0.2))


def frame(images: torch.Tensor, colours: torch.Tensor, width: int) -> torch.Tensor:
    """``images`` ``[N, 3, S, S]`` in [0, 1] with a ``width``-pixel border of ``colours`` ``[N, 3]``."""
    out = colours.view(-1, 3, 1, 1).expand_as(images).clone()
    out[:, :, width:-width, width:-width] = images[:, :, width:-width, width:-width]
    return out


def save_deformation_figure(path: Path, probes: torch.Tensor, gallery: torch.Tensor, weights: torch.Tensor,
                            deformed: torch.Tensor, relation: torch.Tensor | None = None, rows: int = 8) -> None:
    """One row per deformed image: probe, gallery image, cell weights (grey, 0 black, 1 white,
    clipped) and the deformed image. All images ``[N, 3, S, S]`` normalised; ``weights`` ``[N, F*F]``.
    The gallery tile is framed by its class relation to the probe (``relation`` ``[N]``, 0 when None):
    grey another class than the episode's, orange another class of the episode, green the probe's."""
    n, size = min(rows, len(probes)), probes.shape[-1]
    cells = weight_map(weights[:n].float().clamp(0, 1), size).expand(-1, 3, -1, -1).cpu()
    relation = torch.zeros(n, dtype=torch.long) if relation is None else relation[:n].cpu()
    gallery_tiles = frame(denormalize(gallery[:n]).cpu(), torch.tensor(RELATION_COLOURS)[relation], max(2, size // 16))
    tiles = torch.stack([denormalize(probes[:n]).cpu(), gallery_tiles, cells, denormalize(deformed[:n]).cpu()],
                        dim=1).flatten(0, 1)
    if size < 96:
        tiles = F.interpolate(tiles, scale_factor=96 / size, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=4, padding=2, pad_value=1.0), path)
