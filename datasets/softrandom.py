"""Stage-1 data: images blended patch by patch with another of their class (docs/original.md §3.2, §3.3)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from datasets.images import load_rgb
from datasets.splits import Split
from datasets.transforms import train_transform
from utils.grid import weight_map


class SoftRandomDataset(Dataset):
    """``files_per_class`` files per class (0: all), ``repeats`` times: ``(index, item_seed)`` -> (float ``[3, S, S]``,
    label); with probability ``blend_prob``, cell k becomes ``w_k * x + (1 - w_k) * other``, ``w_k ~ U(0, 1)``."""

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

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, item_seed = key
        path, label = self.samples[index % len(self.samples)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            image = self.transform(load_rgb(path))
            if torch.rand(()) < self.blend_prob:
                rest = [p for p in self.class_files[label] if p != path]
                other_path = rest[int(torch.randint(len(rest), ()))] if rest else path
                other = self.transform(load_rgb(other_path))
                weights = torch.rand(1, self.fang * self.fang)
                mask = weight_map(weights, self.image_size)[0]
                image = mask * image + (1 - mask) * other
        return image, label
