"""The loops' timing hook: sections reported to a timer that does nothing unless a benchmark passes its own."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext


class Timer:
    """Receives each loop step's ``with timer.section(name):`` parts and :meth:`end_step`; records nothing.

    Sections: ``data_wait`` (the loader), ``prepare`` (uint8 to normalised floats), ``embed_plain`` (no
    autograd), ``embed_support_grad`` (for the classification loss), ``select``, ``gallery_batch``,
    ``deform``, ``embed_deformed``, ``losses``, ``backward``, ``optimizer``, ``bookkeeping`` (checks, sums)."""

    def section(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def end_step(self) -> None:
        """One step (episode or batch) ended."""


NO_TIMER = Timer()


def timed_items(items: Iterable, timer: Timer) -> Iterator:
    """The items of ``items`` (a loader), each wait for the next one timed as ``data_wait``."""
    iterator = iter(items)
    while True:
        with timer.section("data_wait"):
            item = next(iterator, None)
        if item is None:
            return
        yield item
