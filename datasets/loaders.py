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

# Scheduling niceness of data-loading workers when the model runs on the CPU.
CPU_WORKER_NICENESS = 19


def lower_worker_priority(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: decode at a lower CPU priority than the compute threads.

    On the CPU the workers share cores with the training threads; at normal priority each
    decode preempts a compute thread and stalls the other threads of that parallel region. A
    niced worker runs in the gaps instead, and the prefetch queue absorbs the delay.
    """
    os.nice(CPU_WORKER_NICENESS)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Leave SIGINT and SIGTERM to the main process: a signal sent to the whole process group (Ctrl-C
    in a terminal, torchrun forwarding one, ``scancel``) then reaches only its graceful stop, and the
    workers end when it shuts the loader down instead of dying under it ("DataLoader worker killed
    by signal"). A signal held back while the worker started (:class:`StopSafeLoader`) is dropped."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGINT and SIGTERM held back (blocked in the calling
    thread, a mask the workers inherit) until their ``worker_init_fn`` ignores them
    (:func:`init_worker`). Without it a signal to the process group as an epoch or an evaluation
    starts can reach a worker before that, where PyTorch's own SIGTERM handler ends it. The main
    process gets a signal held back as soon as the workers are started."""

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_lingering_workers() -> None:
    """At exit, end the daemonic child processes still alive (loader workers of an iterator not
    collected yet) as multiprocessing's own exit handler does, but with SIGKILL: they ignore the
    SIGTERM it sends before waiting for them, which would wait forever."""
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join()


atexit.register(end_lingering_workers)


def init_worker(worker_id: int, niced: bool) -> None:
    """DataLoader ``worker_init_fn`` (:func:`worker_init_for`)."""
    ignore_stop_signals()
    if niced:
        lower_worker_priority(worker_id)


def worker_init_for(device: torch.device):
    """The loaders' ``worker_init_fn``: stop signals ignored (:func:`ignore_stop_signals`), and
    :func:`lower_worker_priority` when ``device`` is the CPU."""
    return functools.partial(init_worker, niced=device.type == "cpu")


def episode_loader(dataset: EpisodeDataset, workers: int, device: torch.device) -> DataLoader:
    """One episode per step, decoded in ``workers`` background processes and prefetched
    (at lower priority when ``device`` is the CPU)."""
    return StopSafeLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate_episode,
                          pin_memory=device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None,
                          worker_init_fn=worker_init_for(device))


def image_loader(dataset: CroppedImages, batch: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of ``batch`` crops in order, decoded in ``workers`` background processes."""
    return StopSafeLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                          worker_init_fn=worker_init_for(device))
