"""Stage-1 data: images blended patch by patch with another of their class (docs/original.md §3.2, §3.3)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from datasets.images import load_rgb
from datasets.splits import Split
from datasets.transforms import normalize_uint8, train_transform
from utils.grid import weight_map


class SoftRandomDataset(Dataset):
    """``files_per_class`` files per class (0: all), ``repeats`` times. ``(index, item_seed)`` -> (uint8
    ``[2, 3, S, S]``: the image and its partner, label, cell weights ``[F*F]``, blended): with probability
    ``blend_prob`` the partner is another file of the class and ``w_k ~ U(0, 1)``; else zeros, not blended.
    Workers hand over uint8 (half the bytes of one float32 image); :func:`blend_batch` blends on the device."""

    def __init__(self, split: Split, image_size: int, fang: int = 3, files_per_class: int = 500,
                 repeats: int = 2, blend_prob: float = 2 / 3, crop: str = "tv02") -> None:
        if files_per_class < 0:
            raise ValueError(f"files_per_class must be at least 0 (0: every file), got {files_per_class}")
        self.image_size, self.fang, self.repeats, self.blend_prob = image_size, fang, repeats, blend_prob
        self.class_files = [files[:files_per_class or None] for files in split.files]
        self.samples = [(path, label) for label, files in enumerate(self.class_files) for path in files]
        self.transform = train_transform(image_size, crop)

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        index, item_seed = key
        path, label = self.samples[index % len(self.samples)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            image = self.transform(load_rgb(path))
            other, weights, blended = torch.zeros_like(image), torch.ones(self.fang * self.fang), False
            if torch.rand(()) < self.blend_prob:
                rest = [p for p in self.class_files[label] if p != path]
                other_path = rest[int(torch.randint(len(rest), ()))] if rest else path
                other = self.transform(load_rgb(other_path))
                weights, blended = torch.rand(self.fang * self.fang), True
        return torch.stack([image, other]), label, weights, blended


def blend_batch(pairs: torch.Tensor, weights: torch.Tensor, blended: torch.Tensor, device: torch.device
                ) -> torch.Tensor:
    """A collated batch of :class:`SoftRandomDataset` items -> normalised float ``[N, 3, S, S]`` on ``device``.

    ``pairs`` uint8 ``[N, 2, 3, S, S]``, ``weights`` ``[N, F*F]``, ``blended`` bool ``[N]`` (CPU, possibly pinned).
    Cell k of a blended image is ``w_k * x + (1 - w_k) * other`` of the normalised images, the original's
    arithmetic element by element, so the numbers equal blending in the worker."""
    x, other = normalize_uint8(pairs.to(device, non_blocking=True)).unbind(1)
    mask = weight_map(weights.to(device, non_blocking=True), x.shape[-1])
    mixed = other.mul_(1 - mask).add_(mask * x)  # in the partner's memory; a + b is b + a exactly
    return torch.where(blended.to(device, non_blocking=True).view(-1, 1, 1, 1), mixed, x)
