"""Stage 2's episodes (docs/original.md §4.5): classes, images, deformation draws, by (seed, stream, epoch, index)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.images import load_rgb
from datasets.seeding import item_rng
from datasets.splits import Split
from datasets.transforms import eval_crop
from utils.errors import DataError


@dataclass(frozen=True)
class AugmentDraws:
    """The deformation draws of an episode or a low-shot step: ``episode`` (``engine.episode.EpisodeConfig``, the
    one holder of ``augnum`` and ``choose_num``), ``gallery_size`` (whole-gallery picks), ``cells`` (F*F random
    weights per image)."""

    episode: Any
    gallery_size: int
    cells: int

    def draw(self, rng: np.random.Generator, images: int) -> dict[str, torch.Tensor]:
        """The draws of ``episode.augnum`` deformed copies of each of ``images`` images, in this order from ``rng``:
        ``probe_flip``, ``shortlist_pick``, ``gallery_pick``, ``gallery_flip`` ``[images*augnum]``, ``random_weights``
        ``[images*augnum, cells]``."""
        total = images * self.episode.augnum
        return {"probe_flip": torch.from_numpy(rng.random(total) < 0.5),
                "shortlist_pick": torch.from_numpy(rng.integers(self.episode.choose_num, size=total)),
                "gallery_pick": torch.from_numpy(rng.integers(self.gallery_size, size=total)),
                "gallery_flip": torch.from_numpy(rng.random(total) < 0.5),
                "random_weights": torch.from_numpy(rng.random((total, self.cells), dtype=np.float32))}


class EpisodeDataset(Dataset):
    """``episodes`` episodes of ``ways`` classes with ``shots`` support and ``queries`` query images.

    Support and query files are disjoint unless ``overlap`` (the original draws them independently).
    Item i of epoch e depends only on (seed, stream, e, i); streams 0, 1, 2: training, val, test.

    Items: ``support`` uint8 ``[ways*shots, 3, S, S]`` and ``query`` ``[ways*queries, 3, S, S]`` class by
    class; ``support_ids``/``query_ids`` (split positions: feature cache rows); ``support_labels``/
    ``query_labels`` 0..ways-1; ``classes`` ``[ways]`` (split ids); ``index``; with ``draws``, the support's
    (:meth:`AugmentDraws.draw`: ``[ways*shots*augnum]`` and ``random_weights`` ``[ways*shots*augnum, F*F]``).

    ``decode``: ``all``, ``support``, ``none`` or ``new``: the support and only the queries ``known`` (a
    cache's live mask by split position) will lack when the episode runs (``query`` then holds those alone,
    absent when none), planned when the epoch, shard or mask is set (workers cannot see the cache): so set
    the epoch right before iterating and run the episodes in order (the cache refuses surplus pixels)."""

    def __init__(self, split: Split, image_size: int, ways: int, shots: int, queries: int,
                 episodes: int, seed: int, stream: int = 0, overlap: bool = False,
                 draws: AugmentDraws | None = None, decode: str = "all", known: np.ndarray | None = None) -> None:
        if decode not in ("all", "support", "none", "new"):
            raise ValueError(f"decode {decode!r}: one of all, support, none, new")
        if (decode == "new") != (known is not None):
            raise ValueError("decode 'new' needs the mask of known features (known), and only it does")
        if ways > split.num_classes:
            raise DataError(f"--ways {ways} is larger than the {split.num_classes} classes of split {split.name}")
        need = max(shots if overlap else shots + queries, queries)
        small = [(c, len(f)) for c, f in zip(split.classes, split.files) if len(f) < need]
        if small:
            raise DataError(f"class {small[0][0]} of split {split.name} has {small[0][1]} images; "
                            f"an episode needs {need} (shots {shots} + queries {queries})")
        self.split, self.ways, self.shots, self.queries = split, ways, shots, queries
        self.episodes, self.seed, self.stream, self.overlap, self.draws = episodes, seed, stream, overlap, draws
        self.image_size, self.crop, self.decode = image_size, eval_crop(image_size), decode
        self.offsets = np.cumsum([0] + [len(f) for f in split.files[:-1]])
        self.epoch, self.start, self.rank, self.world_size = 0, 0, 0, 1
        self.known, self.new_queries = known, {}
        self.plan_decoding()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's episodes, skipping the first ``start`` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start
        self.plan_decoding()

    def set_shard(self, rank: int, world_size: int) -> None:
        """Serve only episodes ``rank``, ``rank + world_size``, ... (of those after ``start``)."""
        self.rank, self.world_size = rank, world_size
        self.plan_decoding()

    def plan_decoding(self) -> None:
        """With ``decode="new"``: each served episode's mask of queries to decode, from ``known`` as it is now."""
        if self.decode != "new":
            return
        known, self.new_queries = set(np.flatnonzero(self.known).tolist()), {}
        for index, support_ids, query_ids in self.planned_positions():
            known.update(support_ids)  # a cache looks the support up first
            self.new_queries[index] = np.array([p not in known for p in query_ids], dtype=bool)
            known.update(query_ids)

    def planned_positions(self) -> Iterator[tuple[int, list[int], list[int]]]:
        """Per served episode in order: its index and its support and query images' split positions."""
        for index in self.indices():
            classes, support, query, _ = self.plan(index)
            yield index, self.positions(classes, support).tolist(), self.positions(classes, query).tolist()

    def indices(self) -> range:
        """The episode indices this dataset serves, in order."""
        return range(self.start, self.episodes)[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.indices())

    def plan(self, index: int) -> tuple[np.ndarray, list[list[int]], list[list[int]], np.random.Generator]:
        """The classes and the support and query file indices of episode ``index`` (no decoding)."""
        rng = item_rng(self.seed, self.stream, self.epoch, index)
        classes = np.sort(rng.choice(self.split.num_classes, self.ways, replace=False))
        support, query = [], []
        for c in classes:
            size = len(self.split.files[c])
            if self.overlap:
                support.append(rng.choice(size, self.shots, replace=False).tolist())
                query.append(rng.choice(size, self.queries, replace=False).tolist())
            else:
                picked = rng.choice(size, self.shots + self.queries, replace=False).tolist()
                support.append(picked[:self.shots])
                query.append(picked[self.shots:])
        return classes, support, query, rng

    def _decode(self, classes: np.ndarray, picks: list[list[int]]) -> torch.Tensor:
        return torch.stack([self.crop(load_rgb(self.split.files[c][i])) for c, idx in zip(classes, picks) for i in idx])

    def positions(self, classes: np.ndarray, picks: list[list[int]]) -> torch.Tensor:
        """Positions in the split of the picked files of ``classes`` (class by class)."""
        return torch.tensor([int(self.offsets[c]) + i for c, idx in zip(classes, picks) for i in idx], dtype=torch.long)

    def files_at(self, positions: torch.Tensor) -> list:
        """The files at split ``positions``."""
        flat = [path for files in self.split.files for path in files]
        return [flat[p] for p in positions.tolist()]

    def pass_positions(self) -> torch.Tensor:
        """The distinct split positions of every image the current epoch's episodes use, sorted."""
        used = {p for _, support_ids, query_ids in self.planned_positions() for p in support_ids + query_ids}
        return torch.tensor(sorted(used), dtype=torch.long)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.indices()[position]
        classes, support, query, rng = self.plan(index)
        item = {
            "support_ids": self.positions(classes, support),
            "query_ids": self.positions(classes, query),
            "support_labels": torch.arange(self.ways).repeat_interleave(self.shots),
            "query_labels": torch.arange(self.ways).repeat_interleave(self.queries),
            "classes": torch.from_numpy(classes).long(),
            "index": torch.tensor(index),
        }
        if self.decode in ("all", "support", "new"):
            item["support"] = self._decode(classes, support)
        if self.decode == "all":
            item["query"] = self._decode(classes, query)
        elif self.decode == "new" and self.new_queries[index].any():
            new = iter(self.new_queries[index])
            item["query"] = self._decode(classes, [[i for i in idx if next(new)] for idx in query])
        if self.draws is not None:
            item.update(self.draws.draw(rng, self.ways * self.shots))
        return item


def collate_episode(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader collate for ``batch_size=1``: the episode itself, no batch dimension."""
    return batch[0]


class CroppedImages(Dataset):
    """The evaluation crops of ``files``: item i is uint8 ``[3, S, S]`` (for embedding them once)."""

    def __init__(self, files: list, image_size: int) -> None:
        self.files, self.crop = files, eval_crop(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.crop(load_rgb(self.files[index]))
