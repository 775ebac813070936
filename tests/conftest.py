"""Shared fixtures and helpers: one thread for torch, one small toy dataset in all three layouts, and
hand-made stage-2 inputs (random images, a gallery without files, an episode) for the episode tests.

The toy dataset (``datasets.toy.generate``) is written once per session in the flat+CSV
layout; the other two layouts are built from it with symbolic links (read-only tests) or
copies (tests that damage files), so that every layout holds exactly the same images.
"""
from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T

from datasets import read_split, toy
from datasets.gallery import Gallery
from tests.scripts_helpers import make_workdir

PER_CLASS = 12
TOY_SIZE = 48
SPLIT_NAMES = ("train", "val", "test")
EPISODE_SIZE = 32  # side of the images uint8_images makes
# ImageNet statistics, typed out here (docs/original.md §2.2) rather than imported.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to busy-waiting on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def csv_rows(root: Path, split: str) -> list[tuple[str, str]]:
    """``(filename, wnid)`` rows of ``root/<split>.csv``, read with the csv module."""
    with open(root / f"{split}.csv", newline="") as handle:
        header, *rows = csv.reader(handle)
    assert header == ["filename", "label"]
    return [(name, wnid) for name, wnid in rows]


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src, dst)


def build_flat(src: Path, dst: Path, *, copy: bool = False, exclude: tuple[str, ...] = ()) -> Path:
    """``dst/images/*.jpg`` from the toy dataset at ``src``, without CSV files.

    ``exclude`` lists wnids whose images are left out.
    """
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLIT_NAMES:
        for name, wnid in csv_rows(src, split):
            if wnid not in exclude:
                _place(src / "images" / name, dst / "images" / name, copy)
    return dst


def build_folders(src: Path, dst: Path, *, copy: bool = False) -> Path:
    """``dst/<split>/<wnid>/*.jpg`` from the toy dataset at ``src``."""
    for split in SPLIT_NAMES:
        for name, wnid in csv_rows(src, split):
            _place(src / "images" / name, dst / split / wnid / name, copy)
    return dst


def copy_flat_csv(src: Path, dst: Path) -> Path:
    """A full, writable copy of the flat+CSV toy dataset."""
    shutil.copytree(src, dst, symlinks=False)
    return dst


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy dataset in the flat+CSV layout (read-only; do not modify)."""
    root = tmp_path_factory.mktemp("toy_csv")
    toy.generate(root, per_class=PER_CLASS, size=TOY_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def flat_root(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in the flat layout without CSVs (symbolic links; read-only)."""
    return build_flat(toy_root, tmp_path_factory.mktemp("toy_flat"))


@pytest.fixture(scope="session")
def folders_root(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in the one-folder-per-class layout (symbolic links; read-only)."""
    return build_folders(toy_root, tmp_path_factory.mktemp("toy_folders"))


@pytest.fixture(scope="session")
def layout_roots(toy_root: Path, flat_root: Path, folders_root: Path) -> dict[str, Path]:
    """Layout name (as ``detect_layout`` should report it) -> dataset root."""
    return {"flat+csv": toy_root, "flat": flat_root, "folders": folders_root}


@pytest.fixture(scope="session")
def train_split(toy_root: Path):
    """The toy train split (64 classes x PER_CLASS images)."""
    from datasets.splits import read_split

    return read_split(toy_root, "train")


@pytest.fixture(scope="session")
def val_split(toy_root: Path):
    """The toy val split (16 classes x PER_CLASS images)."""
    from datasets.splits import read_split

    return read_split(toy_root, "val")


@pytest.fixture
def writable_toy(toy_root: Path, tmp_path: Path) -> Path:
    """A fresh writable copy of the flat+CSV toy dataset, for tests that damage it."""
    return copy_flat_csv(toy_root, tmp_path / "toy")


@pytest.fixture
def make_flat(toy_root: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make_flat(copy=False, exclude=())`` -> a new flat (no CSV) dataset root under tmp_path."""
    counter = iter(range(1000))

    def make(copy: bool = False, exclude: tuple[str, ...] = ()) -> Path:
        return build_flat(toy_root, tmp_path / f"flat{next(counter)}", copy=copy, exclude=exclude)

    return make


@pytest.fixture
def make_folders(toy_root: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make_folders(copy=False)`` -> a new one-folder-per-class dataset root under tmp_path."""
    counter = iter(range(1000))

    def make(copy: bool = False) -> Path:
        return build_folders(toy_root, tmp_path / f"folders{next(counter)}", copy=copy)

    return make


@pytest.fixture(scope="session")
def stage2_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder with a small toy dataset and a random stage-1 checkpoint
    (:func:`tests.scripts_helpers.make_workdir`), shared by the in-process stage-2 tests."""
    return make_workdir(tmp_path_factory.mktemp("stage2"))


@pytest.fixture(scope="session")
def stage2_splits(stage2_workdir: Path) -> dict:
    """The three splits of :func:`stage2_workdir`'s toy data, by name."""
    return {name: read_split(stage2_workdir / "toy", name) for name in ("train", "val", "test")}


# Hand-made stage-2 inputs -------------------------------------------------------------------------

def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, 3, S, S]`` as the network sees them: scaled to [0, 1], then ImageNet-normalised."""
    return (images.float() / 255 - MEAN) / STD


def eval_crops(files: list[Path], size: int) -> torch.Tensor:
    """``files`` through the evaluation crop of docs/original.md §2.2 (Resize(round(S*256/224)), CenterCrop(S))
    with torchvision's PIL transforms, then :func:`normalise`: one batch ``[N, 3, S, S]``, no blend, no flip."""
    crops = []
    for path in files:
        with PIL.Image.open(path) as image:
            crop = T.CenterCrop(size)(T.Resize(round(size * 256 / 224))(image.convert("RGB")))
        crops.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    return normalise(torch.stack(crops))


def uint8_images(n: int, seed: int) -> torch.Tensor:
    """``n`` random uint8 images ``[n, 3, EPISODE_SIZE, EPISODE_SIZE]`` drawn from ``seed``."""
    return torch.randint(0, 256, (n, 3, EPISODE_SIZE, EPISODE_SIZE), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def make_gallery(images: torch.Tensor, labels: torch.Tensor) -> Gallery:
    """A :class:`datasets.Gallery` holding the given uint8 images (no files decoded)."""
    gallery = Gallery.__new__(Gallery)
    gallery.images, gallery.labels = images.clone(), labels.clone()
    return gallery


def make_episode(ways: int, shots: int, queries: int, augnum: int, choose_num: int, gallery_size: int, cells: int,
                 classes: list[int], seed: int) -> dict[str, torch.Tensor]:
    """An episode dict with the keys of ``EpisodeDataset.__getitem__`` (with ``AugmentDraws``).

    Each class's ``shortlist_pick`` values cover 0..choose_num-1 when shots * augnum >= choose_num,
    so the chosen gallery images of a class must be exactly its choose_num nearest ones."""
    generator = torch.Generator().manual_seed(seed)
    n = ways * shots * augnum
    per_class = shots * augnum
    picks = torch.cat([torch.randperm(per_class, generator=generator) % choose_num for _ in range(ways)])
    return {
        "support": uint8_images(ways * shots, seed + 1),
        "query": uint8_images(ways * queries, seed + 2),
        "support_labels": torch.arange(ways).repeat_interleave(shots),
        "query_labels": torch.arange(ways).repeat_interleave(queries),
        "classes": torch.tensor(classes),
        "index": torch.tensor(0),
        "probe_flip": torch.rand(n, generator=generator) < 0.5,
        "shortlist_pick": picks,
        "gallery_pick": torch.randint(gallery_size, (n,), generator=generator),
        "gallery_flip": torch.rand(n, generator=generator) < 0.5,
        "random_weights": torch.rand(n, cells, generator=generator),
    }
