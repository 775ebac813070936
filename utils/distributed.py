"""Distributed set-up for ``torchrun`` (DDP over NCCL on GPUs, gloo on CPUs)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How long a collective waits before failing instead of hanging (longest: the main process saving or --preciseBN).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run_distributed(work: Callable[[Any, torch.device, DistInfo], int], args: Any, device: torch.device) -> int:
    """``work(args, device, info)`` in the process group ``torchrun`` describes in the environment (if any), on this
    process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))) if world > 1 else DistInfo()
    if info.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        return work(args, device, info)
    finally:
        cleanup(info)


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few numbers over all processes (identity without distribution)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def step_verdict(finite: torch.Tensor, stop: bool, info: DistInfo,
                 local: torch.Tensor | None = None) -> tuple[list[int], bool, list[float]]:
    """One collective per step: the ranks whose loss was not finite (``finite``: 0-dim bool), whether any asked to
    stop, and ``local`` (float32 ``[k]``, not reduced) as floats, in the step's only host read."""
    flags = torch.zeros(info.world_size + 1, dtype=torch.float32, device=finite.device)
    flags[info.rank] = (~finite).float()
    flags[-1] = float(stop)
    if info.enabled:
        dist.all_reduce(flags)
    values = (flags if local is None else torch.cat([flags, local.to(flags.dtype)])).tolist()
    diverged = [rank for rank in range(info.world_size) if values[rank] > 0]
    return diverged, values[info.world_size] > 0, values[info.world_size + 1:]


def gather_round_robin(values: Sequence[float], total: int, stopped: bool, device: torch.device,
                       info: DistInfo) -> tuple[list[float], bool]:
    """The ``total`` values rank r computed as items r, r + W, ..., in order on every rank; whether any stopped."""
    if not info.enabled:
        return list(values), stopped
    buffer = [0.0] * total + [float(stopped)]
    if not stopped:
        buffer[info.rank:total:info.world_size] = values
    gathered = all_reduce_sum(buffer, device, info)
    return gathered[:total], gathered[-1] > 0


def raise_together(error: Exception | None, info: DistInfo) -> None:
    """Raise on every process the lowest rank's ``error`` (this process's, or None), so that none waits alone."""
    if info.enabled:
        errors: list[Exception | None] = [None] * info.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
