"""Cached evaluation: each distinct image embedded once per pass (or per run when the embedding is
frozen) gives the same per-episode accuracies as embedding every episode's images afresh."""
from __future__ import annotations

import pytest
import torch

import engine.stage2 as stage2
from datasets import EpisodeDataset, Gallery
from datasets.loaders import episode_loader
from engine.diagnostics import columns
from engine.episode import GalleryBank
from engine.features import FeatureCache
from engine.fewshot import evaluate_embedding
from models import EmbeddingNet
from tests.scripts_helpers import stage2_test_config

CPU = torch.device("cpu")
SIZE = 32


class Counting:
    """An embedding call that counts the images it embeds (a lone image is embedded as an expanded
    pair, with stride 0, by ``utils.forward.embed_in_chunks``: one image)."""

    def __init__(self, embed) -> None:
        self.embed, self.images = embed, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += 1 if images.stride(0) == 0 else len(images)
        return self.embed(images)


def test_stage1_monitor_cached_equals_per_episode(stage2_splits) -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(64).eval()
    common = dict(split=stage2_splits["val"], image_size=SIZE, ways=5, shots=1, queries=3, episodes=12, seed=3,
                  device=CPU, chunk=7, progress=False)
    fresh = Counting(net.features)
    per_episode = evaluate_embedding(fresh, cached=False, **common)
    once = Counting(net.features)
    cached = evaluate_embedding(once, **common)
    assert cached == per_episode
    assert fresh.images == 12 * 5 * (1 + 3)
    used = EpisodeDataset(stage2_splits["val"], SIZE, 5, 1, 3, 12, 3, 1).pass_positions()
    assert once.images == len(used) < fresh.images  # each distinct image once


def test_a_shared_cache_embeds_nothing_twice(stage2_splits) -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(64).eval()
    counting = Counting(net.features)
    cache = FeatureCache(counting, len(stage2_splits["val"]), CPU, 16)
    for shots in (1, 5):
        evaluate_embedding(counting, stage2_splits["val"], SIZE, 5, shots, 1, 10, 0, CPU, progress=False, cache=cache)
    assert counting.images == int(cache.known.sum())


@pytest.mark.parametrize("deform", ["learned", "random", "none"])
def test_stage2_evaluation_cached_equals_per_episode(stage2_workdir, stage2_splits, deform) -> None:
    args = stage2_test_config(stage2_workdir, deform=deform)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    gallery = None if deform == "none" else Gallery(stage2_splits["train"], 2, SIZE, 0, progress=False)
    bank = GalleryBank(gallery, model, CPU, args.batchSize) if gallery else None
    size = len(bank or [])
    config = stage2.episode_config(args, 5)
    cached = stage2.evaluate(model, stage2.episodes(stage2_splits["val"], args, config, 10, stage2.VAL_STREAM, size,
                                                    evaluation=True), bank, args, CPU, "val", model.embed)
    fresh = stage2.evaluate(model, stage2.episodes(stage2_splits["val"], args, config, 10, stage2.VAL_STREAM, size),
                            bank, args, CPU, "val", model.embed, cached=False)
    assert cached["acc"] == fresh["acc"] and cached["plain"] == fresh["plain"]
    assert cached["loss"] == pytest.approx(fresh["loss"], rel=1e-6)
    assert_same_columns(columns(cached["sums"], "select"), columns(fresh["sums"], "select"))


def assert_same_columns(got: dict[str, float | str], want: dict[str, float | str]) -> None:
    """The same columns; an empty cell ("": nothing measured) in both or neither, numbers to 1e-5."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, str):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5), key


def test_frozen_embedding_training_with_a_run_cache_trains_the_same(stage2_workdir, stage2_splits) -> None:
    """--fixCls 1: features kept from an image's first episode on give the same training, bit for bit,
    and each support or query image is embedded once."""
    args = stage2_test_config(stage2_workdir, fixCls=1)
    results = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        model = stage2.build_model(args, CPU)
        groups = stage2.param_groups(model, args)
        optimizers, _ = stage2.make_optimizers(model, args)
        bank = GalleryBank(Gallery(stage2_splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize)
        counting = Counting(model.embed)
        cache = FeatureCache(counting, len(stage2_splits["train"]), CPU, args.batchSize) if use_cache else None
        config = stage2.episode_config(args, 5, train=True)
        dataset = stage2.episodes(stage2_splits["train"], args, config, 6, stage2.TRAIN_STREAM, len(bank))
        for epoch in range(2):
            dataset.set_epoch(epoch)
            stage2.train_one_epoch(model, episode_loader(dataset, 0, CPU), bank, config,
                                   CPU, epoch, groups, optimizers, counting, stage2.new_progress(), show=False,
                                   cache=cache)
        results.append((model.state_dict(), counting.images, cache))
    (plain, _, _), (with_cache, embedded, cache) = results
    assert all(torch.equal(plain[key], with_cache[key]) for key in plain)
    deformed = 2 * 6 * 5 * args.augnum
    assert embedded - deformed == int(cache.known.sum())  # support and query images: once each
