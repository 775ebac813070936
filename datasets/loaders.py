"""DataLoaders over the datasets: decoding in background processes, niced on the CPU."""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # its exit handler is registered before ours, so ours runs first
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset

from datasets.episodes import EpisodeDataset, collate_episode
from utils.interrupt import STOP_SIGNALS, ignore_stop_signals

# Workers' niceness on the CPU: they decode in the compute threads' gaps instead of stalling a parallel region.
CPU_WORKER_NICENESS = 19


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers start with the stop signals blocked (PyTorch's handler would end them)."""

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_lingering_workers() -> None:
    """At exit, SIGKILL live daemonic children (workers ignore multiprocessing's SIGTERM, which would hang)."""
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join()


atexit.register(end_lingering_workers)


def init_worker(worker_id: int, niced: bool) -> None:
    """DataLoader ``worker_init_fn``: stop signals (Ctrl-C, ``scancel`` to the group) left to the main process's
    graceful stop, one held back at start dropped; niced when ``niced``."""
    ignore_stop_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if niced:
        os.nice(CPU_WORKER_NICENESS)


def image_loader(dataset: Dataset, batch: int, workers: int, device: torch.device, **kwargs) -> DataLoader:
    """Batches of ``batch`` items (in order unless ``kwargs`` give a ``sampler``), decoded in ``workers`` background
    processes (:func:`init_worker`, niced when ``device`` is the CPU), pinned for CUDA."""
    return StopSafeLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                          worker_init_fn=functools.partial(init_worker, niced=device.type == "cpu"), **kwargs)


def episode_loader(dataset: EpisodeDataset, workers: int, device: torch.device) -> DataLoader:
    """One episode per step, decoded and prefetched in ``workers`` background processes."""
    return image_loader(dataset, 1, workers, device, collate_fn=collate_episode)

