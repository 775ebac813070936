"""Embedding features cached by image while the embedding is fixed (each image embedded once)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from datasets.episodes import CroppedImages, EpisodeDataset
from datasets.loaders import image_loader
from datasets.transforms import prepare_images
from utils.forward import autocast, embed_in_chunks
from utils.interrupt import check_stop


class FeatureCache:
    """Features ``[size, D]`` of a split's images by position (``EpisodeDataset`` ``*_ids``), each embedded
    once: in advance for a pass (:meth:`fill`) or as episodes bring them (:meth:`lookup`). ``embed``
    (``[n, 3, S, S]`` -> ``[n, D]``, ``chunk`` images a call) must not change while the cache is used."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], size: int, device: torch.device, chunk: int,
                 amp: bool = False) -> None:
        self.embed, self.device, self.chunk, self.amp = embed, device, chunk, amp
        self.features: torch.Tensor | None = None  # allocated at the first embedding (its width D)
        self.known = np.zeros(size, dtype=bool)  # on the host: deciding what to embed waits for no GPU

    def _store(self, positions: torch.Tensor, features: torch.Tensor) -> None:
        """``positions`` ``[n]`` (CPU) get ``features`` ``[n, D]``."""
        if self.features is None:
            self.features = torch.empty(len(self.known), features.shape[1], device=self.device)
        self.features[positions.to(self.device, non_blocking=True)] = features
        self.known[positions.numpy()] = True

    @torch.no_grad()
    def fill(self, dataset: EpisodeDataset, workers: int, progress: bool = True, desc: str = "features",
             stop: Callable[[], bool] | None = None) -> None:
        """Embed every image of the dataset's current episodes not cached yet, decoded by ``workers``."""
        positions = dataset.pass_positions()
        positions = positions[~self.known[positions.numpy()]]
        images = CroppedImages(dataset.files_at(positions), dataset.image_size)
        done = 0
        for batch in tqdm(image_loader(images, self.chunk, workers, self.device), desc=desc, disable=not progress,
                          leave=False):
            with autocast(self.device, self.amp):
                features = embed_in_chunks(self.embed, prepare_images(batch, self.device), self.chunk)
            self._store(positions[done:done + len(batch)], features)
            done += len(batch)
            check_stop(stop, f"while embedding the {desc}")

    @torch.no_grad()
    def lookup(self, positions: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``[n, D]`` of the images at ``positions`` ``[n]`` (CPU); those not cached are embedded from
        ``images`` (uint8, all ``n`` or only the uncached ones, in order, as ``decode="new"`` gives) and kept."""
        missing = ~self.known[positions.numpy()]
        if missing.any():
            count = int(missing.sum())
            if images is None or len(images) not in (len(positions), count):
                given = "no pixels" if images is None else f"pixels of {len(images)}"
                raise RuntimeError(f"FeatureCache.lookup: {count} of {len(positions)} images not cached and "
                                   f"{given} given")
            missing = torch.from_numpy(missing)
            new = prepare_images(images[missing] if len(images) == len(positions) else images, self.device)
            with autocast(self.device, self.amp):
                self._store(positions[missing], embed_in_chunks(self.embed, new, self.chunk))
        return self.features[positions.to(self.device, non_blocking=True)]
