"""Few-shot evaluation of an embedding with a prototype classifier (no deformation): stage 1's
val monitor."""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from datasets.episodes import EpisodeDataset
from datasets.loaders import episode_loader
from datasets.splits import Split
from datasets.transforms import prepare_images
from engine.features import FeatureCache
from models.protonet import proto_logits, prototypes
from utils.forward import autocast, embed_in_chunks
from utils.interrupt import check_stop


@torch.no_grad()
def evaluate_embedding(embed: Callable[[torch.Tensor], torch.Tensor], split: Split, image_size: int, ways: int,
                       shots: int, queries: int, episodes: int, seed: int, device: torch.device, stream: int = 1,
                       chunk: int = 128, workers: int = 0, amp: bool = False, desc: str = "eval",
                       progress: bool = True, stop: Callable[[], bool] | None = None,
                       cache: FeatureCache | None = None, cached: bool = True) -> list[float]:
    """Accuracy of the nearest-prototype classifier per episode (in [0, 1]), episodes from ``seed``
    and ``stream`` (1: val, 2: test).

    Each distinct image of the pass is decoded and embedded once, into ``cache`` (a new one unless
    the caller shares one between passes with the same embedding); ``cached=False`` embeds every
    episode's images afresh. Raises :class:`utils.interrupt.Interrupted` when ``stop()`` becomes
    true (checked after each episode and each batch of the advance pass).
    """
    dataset = EpisodeDataset(split, image_size, ways, shots, queries, episodes, seed, stream,
                             decode="none" if cached else "all")
    if cached:
        cache = cache or FeatureCache(embed, len(split), device, chunk, amp)
        cache.fill(dataset, workers, progress, f"{desc} images", stop)
    accuracies = []
    for episode in tqdm(episode_loader(dataset, workers, device), desc=desc, disable=not progress, leave=False):
        if cached:
            support, query = cache.lookup(episode["support_ids"]), cache.lookup(episode["query_ids"])
        else:
            with autocast(device, amp):
                support = embed_in_chunks(embed, prepare_images(episode["support"], device), chunk)
                query = embed_in_chunks(embed, prepare_images(episode["query"], device), chunk)
        logits = proto_logits(query, prototypes(support, episode["support_labels"].to(device), ways))
        accuracies.append((logits.argmax(1).cpu() == episode["query_labels"]).float().mean().item())
        check_stop(stop, f"in the {desc} evaluation")
    return accuracies
