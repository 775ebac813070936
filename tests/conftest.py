"""Shared fixtures: one thread for torch, and one small toy dataset in all three layouts.

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

import pytest
import torch

from datasets import read_split, toy
from tests.scripts_helpers import make_workdir

PER_CLASS = 12
TOY_SIZE = 48
SPLIT_NAMES = ("train", "val", "test")


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
