"""The timing hook of the engine's loops, for benchmarks: the training code users run reports its
sections to a timer, which does nothing unless a benchmark passes its own."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext


class Timer:
    """Receives the sections of each step of a loop.

    The loops wrap each part of a step in ``with timer.section(name):`` and call
    :meth:`end_step` after each step (episode or batch). Section names: ``data_wait`` (blocked on
    the loader), ``prepare`` (uint8 to normalised floats on the device), ``embed_plain`` (support
    and query embedding without autograd), ``embed_support_grad`` (the support again, with autograd,
    for the classification loss), ``select`` (gallery shortlists), ``gallery_batch`` (gathering the
    gallery images), ``deform`` (the deformation network and the blend), ``embed_deformed``,
    ``losses``, ``backward``, ``optimizer`` (zero_grad and step), ``bookkeeping`` (checks, sums).
    This base class records nothing.
    """

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
