"""Stage-2 episodes (docs/original.md §4.5, step 1, and §6.2): deterministic, worker-independent, resumable,
disjoint by default."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import PER_CLASS
from datasets.episodes import AugmentDraws, EpisodeDataset, collate_episode
from datasets.images import load_rgb
from datasets.loaders import CPU_WORKER_NICENESS, episode_loader
from datasets.splits import Split
from datasets.transforms import eval_crop
from engine.episode import EpisodeConfig
from utils.errors import DataError

SIZE = 32
WAYS, SHOTS, QUERIES = 5, 1, 3


def make(split, **kwargs) -> EpisodeDataset:
    args = dict(image_size=SIZE, ways=WAYS, shots=SHOTS, queries=QUERIES, episodes=6, seed=11)
    args.update(kwargs)
    return EpisodeDataset(split, **args)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fake_split(sizes: list[int], name: str = "test") -> Split:
    """A split whose files need not exist (for ``plan``, which decodes nothing)."""
    classes = tuple(f"n{i:08d}" for i in range(len(sizes)))
    files = tuple(tuple(Path(f"/nonexistent/{w}{j + 1:08d}.jpg") for j in range(n)) for w, n in zip(classes, sizes))
    return Split(name, classes, files, "flat")


# ---------------------------------------------------------------- determinism


def test_same_seed_stream_epoch_index_gives_identical_episode(val_split) -> None:
    a, b = make(val_split), make(val_split)
    a.set_epoch(2)
    b.set_epoch(2)
    for index in (0, 3, 5):
        first, second = a[index], b[index]
        assert same(first, second)
        assert same(first, a[index])  # asking again gives it again


def test_dataloader_workers_do_not_change_episodes(val_split) -> None:
    draws = AugmentDraws(EpisodeConfig(WAYS, augnum=2, choose_num=4), gallery_size=30, cells=9)
    ds = make(val_split, episodes=5, draws=draws)
    ds.set_epoch(3)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate_episode)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 5
    for a, b in zip(*runs):
        assert same(a, b)
    assert [int(e["index"]) for e in runs[0]] == list(range(5))


class NicenessReportingEpisodes(EpisodeDataset):
    """Episodes that also carry the scheduling niceness of the process that decoded them."""

    def __getitem__(self, index):
        return {**super().__getitem__(index), "niceness": torch.tensor(os.nice(0))}


def test_cpu_episode_loader_decodes_the_same_episodes_at_lower_priority(val_split) -> None:
    ds = NicenessReportingEpisodes(val_split, SIZE, WAYS, SHOTS, QUERIES, episodes=3, seed=11)
    inline = list(episode_loader(ds, 0, torch.device("cpu")))
    background = list(episode_loader(ds, 2, torch.device("cpu")))
    own = os.nice(0)
    assert [int(e["niceness"]) for e in inline] == [own] * 3
    assert [int(e["niceness"]) for e in background] == [min(19, own + CPU_WORKER_NICENESS)] * 3
    for a, b in zip(inline, background):
        assert same({k: v for k, v in a.items() if k != "niceness"}, {k: v for k, v in b.items() if k != "niceness"})


def test_epochs_indices_streams_and_seeds_differ(val_split) -> None:
    ds = make(val_split)
    ds.set_epoch(0)
    base = ds[0]
    assert not same(base, ds[1])
    ds.set_epoch(1)
    assert not same(base, ds[0])
    ds.set_epoch(0)
    assert same(base, ds[0])
    for other in (make(val_split, stream=1), make(val_split, seed=12)):
        other.set_epoch(0)
        assert not same(base, other[0])


def test_episode_plans_differ_over_an_epoch() -> None:
    ds = EpisodeDataset(fake_split([20] * 16), SIZE, WAYS, SHOTS, QUERIES, episodes=50, seed=0)
    plans = set()
    for index in range(50):
        classes, support, query, _ = ds.plan(index)
        plans.add((tuple(classes.tolist()), str(support), str(query)))
    assert len(plans) == 50


def test_set_epoch_start_yields_the_rest_of_the_epoch(val_split) -> None:
    ds = make(val_split, episodes=6)
    ds.set_epoch(4)
    full = [ds[i] for i in range(len(ds))]
    assert len(full) == 6
    resumed = make(val_split, episodes=6)
    resumed.set_epoch(4, start=2)
    assert len(resumed) == 4
    loader = DataLoader(resumed, batch_size=1, num_workers=0, collate_fn=collate_episode)
    rest = list(loader)
    assert len(rest) == 4
    for got, expected in zip(rest, full[2:]):
        assert same(got, expected)
    assert [int(e["index"]) for e in rest] == [2, 3, 4, 5]


# ---------------------------------------------------------------- content


def test_episode_shapes_and_labels(val_split) -> None:
    ways, shots, queries = 4, 2, 3
    ds = make(val_split, ways=ways, shots=shots, queries=queries)
    item = ds[0]
    assert item["support"].shape == (ways * shots, 3, SIZE, SIZE)
    assert item["query"].shape == (ways * queries, 3, SIZE, SIZE)
    assert item["support"].dtype == torch.uint8 and item["query"].dtype == torch.uint8
    # class-major labels: all of class 0, then all of class 1, ...
    assert item["support_labels"].tolist() == [k for k in range(ways) for _ in range(shots)]
    assert item["query_labels"].tolist() == [k for k in range(ways) for _ in range(queries)]
    assert item["support_labels"].dtype == torch.long and item["query_labels"].dtype == torch.long
    classes = item["classes"]
    assert classes.dtype == torch.long and classes.shape == (ways,)
    assert len(set(classes.tolist())) == ways
    assert all(0 <= c < val_split.num_classes for c in classes.tolist())


def test_episode_images_are_the_planned_files(val_split) -> None:
    ds = make(val_split, shots=2)
    ds.set_epoch(1)
    crop = eval_crop(SIZE)
    for index in (0, 4):
        item = ds[index]
        classes, support, query, _ = ds.plan(index)
        assert item["classes"].tolist() == classes.tolist()  # split-level class ids
        expected_support = [crop(load_rgb(val_split.files[c][i])) for c, idx in zip(classes, support) for i in idx]
        expected_query = [crop(load_rgb(val_split.files[c][i])) for c, idx in zip(classes, query) for i in idx]
        assert torch.equal(item["support"], torch.stack(expected_support))
        assert torch.equal(item["query"], torch.stack(expected_query))


def test_plan_picks_ways_classes_and_right_counts() -> None:
    split = fake_split([7, 9, 8, 10, 12, 7, 11])
    ds = EpisodeDataset(split, SIZE, ways=5, shots=2, queries=4, episodes=40, seed=3)
    for index in range(40):
        classes, support, query, _ = ds.plan(index)
        assert len(classes) == 5 and len(set(classes.tolist())) == 5
        assert all(0 <= c < 7 for c in classes)
        for c, s, q in zip(classes, support, query):
            size = len(split.files[c])
            assert len(s) == 2 and len(q) == 4
            assert len(set(s)) == 2 and len(set(q)) == 4
            assert all(0 <= i < size for i in s + q)


def test_support_and_query_disjoint_by_default() -> None:
    # every class has exactly shots + queries files, the tightest case
    split = fake_split([6] * 8)
    ds = EpisodeDataset(split, SIZE, ways=5, shots=1, queries=5, episodes=100, seed=0)
    for index in range(100):
        classes, support, query, _ = ds.plan(index)
        for c, s, q in zip(classes, support, query):
            files_s = {split.files[c][i] for i in s}
            files_q = {split.files[c][i] for i in q}
            assert not files_s & files_q
            assert files_s | files_q == set(split.files[c])


def test_overlap_draws_support_and_query_independently() -> None:
    # class of 10 files, 1 shot, 5 queries: an independent draw overlaps with probability 1/2
    split = fake_split([10] * 5)
    ds = EpisodeDataset(split, SIZE, ways=5, shots=1, queries=5, episodes=40, seed=0, overlap=True)
    overlapping = disjoint = 0
    for index in range(40):
        classes, support, query, _ = ds.plan(index)
        for c, s, q in zip(classes, support, query):
            if {split.files[c][i] for i in s} & {split.files[c][i] for i in q}:
                overlapping += 1
            else:
                disjoint += 1
    assert overlapping >= 1
    assert disjoint >= 1
    # 200 draws with p = 1/2: far from either extreme
    assert 60 <= overlapping <= 140


def test_overlap_allows_classes_smaller_than_shots_plus_queries() -> None:
    split = fake_split([5] * 6)
    with pytest.raises(DataError):
        EpisodeDataset(split, SIZE, ways=5, shots=1, queries=5, episodes=1, seed=0)
    ds = EpisodeDataset(split, SIZE, ways=5, shots=1, queries=5, episodes=1, seed=0, overlap=True)
    _, support, query, _ = ds.plan(0)
    assert all(len(q) == 5 for q in query)


def test_augment_draws_shapes_and_ranges(val_split) -> None:
    ways, shots = 3, 2
    draws = AugmentDraws(EpisodeConfig(ways, augnum=4, choose_num=6), gallery_size=25, cells=9)
    ds = make(val_split, ways=ways, shots=shots, draws=draws)
    n = ways * shots * draws.episode.augnum
    seen_flips = set()
    for index in range(3):
        item = ds[index]
        for key in ("probe_flip", "gallery_flip"):
            assert item[key].dtype == torch.bool and item[key].shape == (n,)
            seen_flips.update(item[key].tolist())
        for key, high in (("shortlist_pick", draws.episode.choose_num), ("gallery_pick", draws.gallery_size)):
            assert item[key].dtype == torch.long and item[key].shape == (n,)
            assert int(item[key].min()) >= 0 and int(item[key].max()) < high
        weights = item["random_weights"]
        assert weights.dtype == torch.float32 and weights.shape == (n, draws.cells)
        assert float(weights.min()) >= 0 and float(weights.max()) <= 1
    assert seen_flips == {True, False}
    assert "probe_flip" not in make(val_split)[0]  # no draws requested, none returned


def test_draws_do_not_change_images(val_split) -> None:
    plain = make(val_split)[2]
    draws = AugmentDraws(EpisodeConfig(WAYS, augnum=3, choose_num=5), gallery_size=20, cells=9)
    with_draws = make(val_split, draws=draws)[2]
    for key in plain:
        assert torch.equal(plain[key], with_draws[key])


# ---------------------------------------------------------------- bad input


def test_more_ways_than_classes_raises(val_split) -> None:
    with pytest.raises(DataError) as info:
        make(val_split, ways=val_split.num_classes + 1)
    assert "--ways" in str(info.value)
    assert str(val_split.num_classes) in str(info.value)
    make(val_split, ways=val_split.num_classes)  # exactly as many is fine


def test_class_smaller_than_shots_plus_queries_raises() -> None:
    split = fake_split([12, 12, 5, 12, 12, 12])
    with pytest.raises(DataError) as info:
        EpisodeDataset(split, SIZE, ways=5, shots=1, queries=5, episodes=1, seed=0)
    assert split.classes[2] in str(info.value)
    EpisodeDataset(split, SIZE, ways=5, shots=1, queries=4, episodes=1, seed=0)


def test_toy_split_has_enough_images(val_split) -> None:
    assert val_split.min_class_size() == PER_CLASS
    with pytest.raises(DataError):
        make(val_split, shots=PER_CLASS - QUERIES + 1)
    make(val_split, shots=PER_CLASS - QUERIES)
