"""--fixCls 1: a training episode decodes its support images and only the query images whose features
the run's cache does not hold yet (``EpisodeDataset(decode="new")``), and trains exactly as when it
decodes all its images."""
from __future__ import annotations

import pytest
import torch

import datasets.episodes as episodes_module
import engine.stage2 as stage2
from datasets import Gallery
from datasets.loaders import episode_loader
from engine.episode import GalleryBank
from engine.features import FeatureCache
from tests.scripts_helpers import stage2_test_args

CPU = torch.device("cpu")
SIZE = 32
WAYS, EPISODES, EPOCHS = 5, 6, 3


class CountingLoads:
    """``load_rgb`` that counts its calls (the loader runs in this process: ``--nthreads 0``)."""

    def __init__(self, load) -> None:
        self.load, self.calls = load, 0

    def __call__(self, path):
        self.calls += 1
        return self.load(path)


class PerEpisode:
    """A loader's items, noting the images decoded for each."""

    def __init__(self, loader, loads: CountingLoads, decoded: list[int]) -> None:
        self.loader, self.loads, self.decoded = loader, loads, decoded

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        before = self.loads.calls
        for item in self.loader:
            self.decoded.append(self.loads.calls - before)
            yield item
            before = self.loads.calls


def train_round_one(workdir, splits, monkeypatch, new: bool, workers: int = 0) -> tuple[dict, list, list[int]]:
    """Round 1 (--fixCls 1) over EPOCHS epochs of EPISODES episodes with the run's feature cache: the
    weights, each epoch's progress (time left out) and the images decoded per episode."""
    args = stage2_test_args(workdir, "--fixCls", "1")
    loads = CountingLoads(episodes_module.load_rgb)
    monkeypatch.setattr(episodes_module, "load_rgb", loads)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    groups = stage2.param_groups(model, args)
    optimizers, _ = stage2.make_optimizers(model, args)
    bank = GalleryBank(Gallery(splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize)
    cache = FeatureCache(model.embed, len(splits["train"]), CPU, args.batchSize)
    dataset = stage2.episodes(splits["train"], args, WAYS, EPISODES, stage2.TRAIN_STREAM, len(bank),
                              cache=cache if new else None)
    assert dataset.decode == ("new" if new else "all")
    decoded, progresses = [], []
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)
        progress = stage2.new_progress()
        stage2.train_one_epoch(model, PerEpisode(episode_loader(dataset, workers, CPU), loads, decoded), bank,
                               stage2.episode_config(args, WAYS, True), CPU, epoch, groups, optimizers, model.embed,
                               progress, show=False, cache=cache)
        progresses.append({key: value for key, value in progress.items() if key != "time"})
    return model.state_dict(), progresses, decoded


def test_round_one_decodes_only_new_queries_and_trains_the_same(stage2_workdir, stage2_splits, monkeypatch) -> None:
    all_state, all_progress, all_decoded = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=False)
    state, progress, decoded = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True)
    assert all(torch.equal(all_state[key], state[key]) for key in all_state)
    assert progress == all_progress  # losses, accuracies, deformation sums: the same numbers
    per_episode = WAYS * (1 + 3)
    assert all_decoded == [per_episode] * (EPOCHS * EPISODES)  # before: every image of every episode
    assert decoded[0] == per_episode  # the first episode: nothing cached yet
    assert all(WAYS <= count <= per_episode for count in decoded)  # the support always
    assert sum(decoded[EPISODES:]) < sum(all_decoded[EPISODES:])  # after the first epoch: fewer
    assert decoded[-1] < per_episode


def test_a_worker_gets_the_plan_of_the_main_process(stage2_workdir, stage2_splits, monkeypatch) -> None:
    state, progress, _ = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True, workers=1)
    inline_state, inline_progress, _ = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True)
    assert all(torch.equal(state[key], inline_state[key]) for key in state)
    assert progress == inline_progress


def test_the_plan_follows_the_cache_and_the_resumed_start(stage2_workdir, stage2_splits) -> None:
    args = stage2_test_args(stage2_workdir, "--fixCls", "1")
    cache = FeatureCache(lambda images: torch.zeros(len(images), 4), len(stage2_splits["train"]), CPU, 16)
    dataset = stage2.episodes(stage2_splits["train"], args, WAYS, EPISODES, stage2.TRAIN_STREAM, 10, cache=cache)
    dataset.set_epoch(1, start=2)
    assert set(dataset.new_queries) == set(range(2, EPISODES))
    first = dataset[0]
    assert len(first["query"]) == WAYS * 3 and len(first["support"]) == WAYS
    cache.known[first["query_ids"].numpy()] = True
    dataset.set_epoch(1, start=2)  # planned again from what the cache holds now
    assert "query" not in dataset[0]


def test_lookup_takes_the_pixels_of_all_images_or_of_the_missing_ones_and_refuses_others() -> None:
    cache = FeatureCache(lambda images: images.flatten(1)[:, :2].float(), 6, CPU, 4)
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.uint8).view(6, 3, 2, 2)
    cache.lookup(torch.tensor([0, 1]), images[:2])
    full = cache.lookup(torch.tensor([0, 2, 1, 3]), images[[0, 2, 1, 3]])
    cache.known[:] = False
    cache.lookup(torch.tensor([0, 1]), images[:2])
    only_missing = cache.lookup(torch.tensor([0, 2, 1, 3]), images[[2, 3]])
    assert torch.equal(full, only_missing)
    with pytest.raises(RuntimeError, match="1 of 2 images not cached and pixels of 3 given"):
        cache.lookup(torch.tensor([0, 4]), images[:3])
    with pytest.raises(RuntimeError, match="no pixels"):
        cache.lookup(torch.tensor([5]))
