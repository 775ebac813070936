"""Few-shot evaluation of an embedding with a prototype classifier: stage 1's val monitor."""
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
from utils.distributed import DistInfo, gather_round_robin
from utils.forward import autocast, embed_in_chunks
from utils.interrupt import Interrupted, check_stop


@torch.no_grad()
def evaluate_embedding(embed: Callable[[torch.Tensor], torch.Tensor], split: Split, image_size: int, ways: int,
                       shots: int, queries: int, episodes: int, seed: int, device: torch.device, stream: int = 1,
                       chunk: int = 128, workers: int = 0, amp: bool = False, desc: str = "eval",
                       progress: bool = True, stop: Callable[[], bool] | None = None,
                       cache: FeatureCache | None = None, cached: bool = True,
                       info: DistInfo = DistInfo()) -> list[float]:
    """Nearest-prototype accuracy per episode (in [0, 1]) of episodes from ``seed`` and ``stream`` (1: val, 2: test).

    Under distribution rank r evaluates episodes r, r + W, ... and every rank returns all of them in order; a
    stop on any rank stops all. Each distinct image is embedded once into ``cache`` (new unless given);
    ``cached=False`` embeds every episode afresh. Raises Interrupted when ``stop()`` becomes true."""
    dataset = EpisodeDataset(split, image_size, ways, shots, queries, episodes, seed, stream,
                             decode="none" if cached else "all")
    dataset.set_shard(info.rank, info.world_size)
    accuracies, stopped = [], None
    try:
        if cached:
            cache = cache or FeatureCache(embed, len(split), device, chunk, amp)
            cache.fill(dataset, workers, progress, f"{desc} images", stop)
        for episode in tqdm(episode_loader(dataset, workers, device), desc=desc, disable=not progress, leave=False):
            if cached:
                support, query = cache.lookup(episode["support_ids"]), cache.lookup(episode["query_ids"])
            else:
                with autocast(device, amp):
                    support = embed_in_chunks(embed, prepare_images(episode["support"], device), chunk)
                    query = embed_in_chunks(embed, prepare_images(episode["query"], device), chunk)
            labels = episode["support_labels"].to(device, non_blocking=True)
            logits = proto_logits(query, prototypes(support, labels, ways))
            correct = logits.argmax(1) == episode["query_labels"].to(device, non_blocking=True)
            accuracies.append(correct.float().mean())  # read once, after the pass: no wait per episode
            check_stop(stop, f"in the {desc} evaluation")
    except Interrupted as interrupted:
        if not info.enabled:
            raise
        stopped = str(interrupted)  # the message only: the exception would keep this frame's loaders alive
    accuracies = torch.stack(accuracies).tolist() if accuracies and stopped is None else []
    accuracies, any_stopped = gather_round_robin(accuracies, episodes, stopped is not None, device, info)
    if any_stopped:
        raise Interrupted(stopped or f"in the {desc} evaluation (another process was stopped)")
    return accuracies
