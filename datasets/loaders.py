"""DataLoaders over the datasets: decoding in background processes, niced on the CPU."""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # its exit handler is registered before ours, so ours runs first
import os
import signal

import torch
from torch.utils.data import DataLoader

from datasets.episodes import CroppedImages, EpisodeDataset, collate_episode
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


def worker_init_for(device: torch.device):
    """The loaders' ``worker_init_fn`` (:func:`init_worker`), niced when ``device`` is the CPU."""
    return functools.partial(init_worker, niced=device.type == "cpu")


def _loader(dataset, batch: int, workers: int, device: torch.device, **kwargs) -> DataLoader:
    return StopSafeLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                          worker_init_fn=worker_init_for(device), **kwargs)


def episode_loader(dataset: EpisodeDataset, workers: int, device: torch.device) -> DataLoader:
    """One episode per step, decoded and prefetched in ``workers`` background processes."""
    return _loader(dataset, 1, workers, device, collate_fn=collate_episode)


def image_loader(dataset: CroppedImages, batch: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of ``batch`` crops in order, decoded in ``workers`` background processes."""
    return _loader(dataset, batch, workers, device)
