"""Forward helpers both stages share (autocast, chunked passes, loaders) and few-shot evaluation of an
embedding with a prototype classifier (no deformation)."""
from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.episodes import EpisodeDataset, collate_episode
from datasets.splits import Split
from datasets.transforms import normalize_uint8
from models.protonet import proto_logits, prototypes


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled``, else a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


def compute_layout(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[N, C, H, W]`` in the memory layout the networks run fastest in on ``device``:
    channels_last on CUDA (with channels_last weights), unchanged on the CPU."""
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def prepare_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` (CPU, possibly pinned) -> normalised float on ``device``."""
    return compute_layout(normalize_uint8(images.to(device, non_blocking=True)), device)


def embed_in_chunks(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int) -> torch.Tensor:
    """``embed`` over ``images`` ``[N, 3, S, S]`` in chunks of ``chunk`` -> float32 ``[N, D]``."""
    return torch.cat([embed(images[i:i + chunk]).float() for i in range(0, len(images), chunk)])


# Scheduling niceness of data-loading workers when the model runs on the CPU.
CPU_WORKER_NICENESS = 19


def lower_worker_priority(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: decode at a lower CPU priority than the compute threads.

    On the CPU the workers share cores with the training threads; at normal priority each
    decode preempts a compute thread and stalls the other threads of that parallel region. A
    niced worker runs in the gaps instead, and the prefetch queue absorbs the delay.
    """
    os.nice(CPU_WORKER_NICENESS)


def worker_init_for(device: torch.device):
    """The loaders' ``worker_init_fn``: :func:`lower_worker_priority` on the CPU, none on CUDA."""
    return lower_worker_priority if device.type == "cpu" else None


def deform_in_chunks(deform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                     probes: torch.Tensor, gallery: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``deform`` (``IDeMeNet.deform``) over probe and gallery images ``[N, 3, S, S]`` -> (deformed
    ``[N, 3, S, S]``, weights ``[N, F*F]``): in chunks of ``chunk`` without autograd, in one call
    with it (the graph keeps every activation anyway; chunks would only add copies)."""
    if torch.is_grad_enabled() or len(probes) <= chunk:
        return deform(probes, gallery)
    parts = [deform(probes[i:i + chunk], gallery[i:i + chunk]) for i in range(0, len(probes), chunk)]
    return torch.cat([deformed for deformed, _ in parts]), torch.cat([weights for _, weights in parts])


def episode_loader(dataset: EpisodeDataset, workers: int, device: torch.device) -> DataLoader:
    """One episode per step, decoded in ``workers`` background processes and prefetched
    (at lower priority when ``device`` is the CPU)."""
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate_episode,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=worker_init_for(device))


@torch.no_grad()
def evaluate_embedding(embed: Callable[[torch.Tensor], torch.Tensor], split: Split, image_size: int, ways: int,
                       shots: int, queries: int, episodes: int, seed: int, device: torch.device, stream: int = 1,
                       chunk: int = 128,
                       workers: int = 0, amp: bool = False, desc: str = "eval", progress: bool = True) -> list[float]:
    """Accuracy of the nearest-prototype classifier per episode (in [0, 1]), episodes from ``seed``
    and ``stream`` (1: val, 2: test)."""
    dataset = EpisodeDataset(split, image_size, ways, shots, queries, episodes, seed, stream)
    accuracies = []
    for episode in tqdm(episode_loader(dataset, workers, device), desc=desc, disable=not progress, leave=False):
        with autocast(device, amp):
            support = embed_in_chunks(embed, prepare_images(episode["support"], device), chunk)
            query = embed_in_chunks(embed, prepare_images(episode["query"], device), chunk)
        logits = proto_logits(query, prototypes(support, episode["support_labels"].to(device), ways))
        accuracies.append((logits.argmax(1).cpu() == episode["query_labels"]).float().mean().item())
    return accuracies
