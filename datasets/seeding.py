"""Per-item seeds from (seed, epoch, position): the data do not depend on workers, processes or resumption."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def item_rng(*key: int) -> np.random.Generator:
    """A numpy generator determined by integer ``key`` (e.g. seed, epoch, index)."""
    return np.random.default_rng([int(k) for k in key])


class SeededSampler(Sampler):
    """``(index, item_seed)`` for a shuffled epoch, padded as ``DistributedSampler`` does; rank r takes r, r + W..."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order, skipping this rank's first ``start`` items (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Items each rank yields in a whole epoch, padding included."""
        return -(-self.size // self.world_size)

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = item_rng(self.seed, self.epoch)
        order = rng.permutation(self.size)
        seeds = rng.integers(2**63 - 1, size=self.size)
        padded = range(self.per_rank * self.world_size)
        mine = padded[self.rank::self.world_size][self.start:]
        return iter([(int(order[p % self.size]), int(seeds[p % self.size])) for p in mine])
