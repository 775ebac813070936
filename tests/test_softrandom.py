"""Stage-1 soft-random data (docs/original.md §3.2 and §3.3) and the per-item seeded sampler."""
from __future__ import annotations

import pytest
import torch

from conftest import PER_CLASS
from datasets.images import load_rgb
from datasets.seeding import SeededSampler
from datasets.softrandom import SoftRandomDataset
from datasets.transforms import eval_crop, normalize_uint8, train_transform

SIZE = 32


# ---------------------------------------------------------------- SeededSampler


def test_sampler_epoch_is_a_permutation() -> None:
    sampler = SeededSampler(37, seed=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler) == 37
        assert sorted(i for i, _ in items) == list(range(37))
        assert all(isinstance(s, int) and 0 <= s < 2**63 for _, s in items)


def test_sampler_is_deterministic_and_epochs_differ() -> None:
    a, b = SeededSampler(50, seed=1), SeededSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice gives the same epoch
    first = list(a)
    a.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in first]
    other_seed = SeededSampler(50, seed=2)
    other_seed.set_epoch(3)
    assert list(other_seed) != first


@pytest.mark.parametrize("size,world_size", [(10, 2), (11, 2), (11, 3), (12, 3), (13, 3)])
def test_sampler_ranks_split_the_epoch_evenly_padding_with_its_first_items(size: int, world_size: int) -> None:
    full = SeededSampler(size, seed=7)
    full.set_epoch(2)
    everything = list(full)
    shards = []
    for rank in range(world_size):
        sampler = SeededSampler(size, seed=7, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    # every rank runs the same number of steps: ceil(size / W) items each
    assert [len(shard) for shard in shards] == [-(-size // world_size)] * world_size
    # round-robin over the padded epoch: the epoch's items once, then its first ones again
    interleaved = [shards[p % world_size][p // world_size] for p in range(len(shards[0]) * world_size)]
    pad = len(interleaved) - size
    assert interleaved == everything + everything[:pad]
    # the seed of an item does not depend on how the epoch is sharded
    assert dict(item for shard in shards for item in shard) == dict(everything)


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_sampler_start_skips_the_first_items(world_size: int, rank: int) -> None:
    sampler = SeededSampler(23, seed=3, rank=rank, world_size=world_size)
    sampler.set_epoch(1)
    whole = list(sampler)
    for start in (0, 1, 5):
        sampler.set_epoch(1, start=start)
        assert list(sampler) == whole[start:]
        assert len(sampler) == len(whole) - start


# ---------------------------------------------------------------- SoftRandomDataset


def test_dataset_lists_first_files_repeated(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=5, repeats=2)
    per_pass = 5 * train_split.num_classes
    assert len(ds) == 2 * per_pass
    labels = [label for _, label in ds.samples]
    assert sorted(set(labels)) == list(range(train_split.num_classes))
    for label, files in enumerate(train_split.files):
        assert [p for p, lab in ds.samples if lab == label] == list(files[:5])
    # items past the first pass are the same files again
    ds_plain = SoftRandomDataset(train_split, SIZE, files_per_class=5, repeats=2, blend_prob=0.0)
    a, la = ds_plain[(3, 99)]
    b, lb = ds_plain[(3 + per_pass, 99)]
    assert la == lb and torch.equal(a, b)


def test_labels_are_sorted_class_numbers(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=2, repeats=1, blend_prob=0.0)
    ordered = sorted(train_split.classes)
    for index in (0, 5, 77, len(ds) - 1):
        path, label = ds.samples[index]
        assert path.name.startswith(ordered[label])
        assert ds[(index, 0)][1] == label


def test_same_key_gives_same_tensor(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=4, repeats=1)
    for key in [(0, 11), (9, 12345678901234), (100, 3)]:
        a, la = ds[key]
        b, lb = ds[key]
        assert la == lb
        assert torch.equal(a, b)
        assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
    assert not torch.equal(ds[(0, 11)][0], ds[(0, 12)][0])


def test_item_does_not_touch_global_torch_rng(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=4, repeats=1, blend_prob=1.0)
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    ds[(1, 42)]
    assert torch.equal(torch.rand(5), expected)


def test_no_blend_equals_plain_train_transform_under_item_seed(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=4, repeats=1, blend_prob=0.0)
    transform = train_transform(SIZE)
    for index, seed in [(0, 1), (7, 2**40 + 3), (130, 99)]:
        image, label = ds[(index, seed)]
        path = train_split.files[index // 4][index % 4]
        torch.manual_seed(seed)
        expected = transform(load_rgb(path))
        assert label == index // 4
        assert torch.equal(image, expected)


def _fit_cells(out: torch.Tensor, x: torch.Tensor, other: torch.Tensor, fang: int):
    """Per cell, the least-squares w with out = w*x + (1-w)*other, and the worst residual."""
    size = out.shape[-1]
    step = size // fang
    bounds = [i * step for i in range(fang)] + [size]
    weights, worst = [], 0.0
    for r in range(fang):
        for c in range(fang):
            cell = (slice(None), slice(bounds[r], bounds[r + 1]), slice(bounds[c], bounds[c + 1]))
            d = (x - other)[cell]
            w = float(((out - other)[cell] * d).sum() / (d * d).sum())
            residual = float(((out - other)[cell] - w * d).abs().max())
            weights.append(w)
            worst = max(worst, residual)
    return weights, worst


@pytest.mark.parametrize("fang", [3, 5])
def test_full_blend_is_cellwise_convex_combination(train_split, fang: int) -> None:
    # With a deterministic transform (the eval one) and two files per class, the blended image
    # must be, cell by cell, w * x + (1 - w) * other with one w in [0, 1] per cell, where x is
    # the item's file and other the other file of its class.
    ds = SoftRandomDataset(train_split, SIZE, fang=fang, files_per_class=2, repeats=1, blend_prob=1.0)
    ds.transform = lambda image: normalize_uint8(eval_crop(SIZE)(image))
    for index, seed in [(0, 5), (3, 6), (64, 7)]:
        out, label = ds[(index, seed)]
        files = train_split.files[label][:2]
        own, partner = files[index % 2], files[1 - index % 2]
        x = ds.transform(load_rgb(own))
        other = ds.transform(load_rgb(partner))
        weights, worst = _fit_cells(out, x, other, fang)
        assert worst < 1e-4
        assert all(-1e-4 <= w <= 1 + 1e-4 for w in weights)
        assert len({round(w, 3) for w in weights}) > 1  # one weight per cell, not one per image


def test_full_blend_partner_is_another_file_of_the_class(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=3, repeats=1, blend_prob=1.0)
    ds.transform = lambda image: normalize_uint8(eval_crop(SIZE)(image))
    partners = set()
    for seed in range(12):
        index = 4  # class 1, its second file
        out, label = ds[(index, seed)]
        files = train_split.files[label][:3]
        own = files[1]
        x = ds.transform(load_rgb(own))
        assert not torch.equal(out, x)
        fits = [p for p in files if p != own and _fit_cells(out, x, ds.transform(load_rgb(p)), 3)[1] < 1e-4]
        assert len(fits) == 1
        partners.add(fits[0])
    assert partners == {train_split.files[1][0], train_split.files[1][2]}


def test_default_blend_probability_is_about_two_thirds(train_split) -> None:
    ds = SoftRandomDataset(train_split, SIZE, files_per_class=PER_CLASS, repeats=1)
    ds.transform = lambda image: normalize_uint8(eval_crop(SIZE)(image))
    trials, blended = 180, 0
    plain = {}
    for seed in range(trials):
        index = seed % 8
        if index not in plain:
            plain[index] = ds.transform(load_rgb(ds.samples[index][0]))
        blended += not torch.equal(ds[(index, seed)][0], plain[index])
    # Binomial(180, 2/3): mean 120, sd 6.3, so +-4 sd is 95..145
    assert 95 <= blended <= 145
