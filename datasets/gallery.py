"""The gallery of base-class images deformed examples are blended from (docs/original.md §4.3), decoded once."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from datasets.images import load_rgb
from datasets.splits import Split
from datasets.transforms import eval_crop, normalize_uint8
from utils.errors import DataError
from utils.interrupt import check_stop

GALLERY_SEED = 2019


def gallery_files(split: Split, gallery_num: int, seed: int = GALLERY_SEED) -> list[tuple[int, object]]:
    """``(class index, path)``, ``gallery_num`` per class drawn without replacement from ``RandomState(seed)``."""
    too_small = [(c, len(f)) for c, f in zip(split.classes, split.files) if len(f) < gallery_num]
    if too_small:
        wnid, size = too_small[0]
        raise DataError(f"--galleryNum {gallery_num} is larger than class {wnid} of split {split.name} ({size} images)")
    state = np.random.RandomState(seed)
    return [(label, files[int(i)]) for label, files in enumerate(split.files)
            for i in state.choice(len(files), gallery_num, replace=False)]


class Gallery:
    """``images`` uint8 ``[G, 3, S, S]`` (centre crops), ``labels`` long ``[G]``; :class:`Interrupted` on ``stop()``."""

    def __init__(self, split: Split, gallery_num: int, image_size: int, workers: int = 4,
                 seed: int = GALLERY_SEED, progress: bool = True, stop: Callable[[], bool] | None = None) -> None:
        chosen = gallery_files(split, gallery_num, seed)
        crop = eval_crop(image_size)
        self.images = torch.empty(len(chosen), 3, image_size, image_size, dtype=torch.uint8)
        self.labels = torch.tensor([label for label, _ in chosen], dtype=torch.long)

        def decode(i: int) -> None:
            self.images[i] = crop(load_rgb(chosen[i][1]))

        pool = ThreadPoolExecutor(max(1, workers))
        try:
            for _ in tqdm(pool.map(decode, range(len(chosen))), total=len(chosen), desc="gallery",
                          disable=not progress, leave=False):
                check_stop(stop, "while decoding the gallery")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Gallery":
        """Move the uint8 images and labels to ``device`` (a 1,920-image gallery at 224 px is 289 MB)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def batch(self, index: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float ``[len(index), 3, S, S]``, mirrored where ``flip`` (bool ``[len(index)]``)."""
        images = normalize_uint8(self.images[index])
        if flip is None:
            return images
        return torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
