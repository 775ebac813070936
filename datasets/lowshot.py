"""The ImageNet-1K low-shot benchmark of Hariharan & Girshick (ICCV 2017) over an ILSVRC-2012 tree
(``<imagenet>/train/<wnid>/*``, ``<imagenet>/val/<wnid>/*``: ``scripts/fold_imagenet_val.py`` makes the
val class folders). Its files (downloaded by the user; see docs/lowshot.md):

- ``label_idx.json``: ``label_names`` (the wnids; index k is class k, not sorted by wnid), ``base_classes``
  (= ``base_classes_1`` U ``base_classes_2``), and two setups: validation (``base_classes_1``,
  ``novel_classes_1``) for choosing hyper-parameters, test (``base_classes_2``, ``novel_classes_2``).
- ``splitfile_{1..5}.json``: five trials; per class (index order) indices into the list of training images;
  the n-shot set of a novel class is its first n.
- ``train.json``, the release's list of training images (``image_names``, ``image_labels``) grouped by class
  in ``label_names`` order. Without it the list is rebuilt as each class's files sorted by name: ILSVRC file
  numbers are not zero-padded, so the split files' indices then pick other images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.splits import IMAGE_SUFFIXES, Split, read_split
from utils.errors import DataError

SETUPS = {"val": ("base_classes_1", "novel_classes_1"), "test": ("base_classes_2", "novel_classes_2")}
META_LISTS = ("base_classes", "base_classes_1", "novel_classes_1", "base_classes_2", "novel_classes_2")
DISJOINT_LISTS = (("base_classes_1", "base_classes_2"), ("novel_classes_1", "base_classes"),
                  ("novel_classes_2", "base_classes"), ("novel_classes_1", "novel_classes_2"))
# The training stages' splits of the benchmark: the base classes' training images (stage 1, the
# stage-2 episodes and gallery), the validation setup's novel classes for selection, the test
# setup's novel classes for stage 2's closing episode test (both from the ILSVRC val images).
STAGE_SPLITS = {"train": ("train", "base_classes"), "val": ("val", "novel_classes_1"),
                "test": ("val", "novel_classes_2")}


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON {what} ({exc})") from None


@dataclass(frozen=True)
class LowShotMeta:
    """The class split of ``label_idx.json``: ``label_names`` and index tuples by key (:data:`META_LISTS`)."""

    path: Path
    label_names: tuple[str, ...]
    lists: dict[str, tuple[int, ...]]

    def wnids(self, key: str) -> list[str]:
        """The wnids of list ``key`` (e.g. ``base_classes``), in the file's order."""
        return [self.label_names[k] for k in self.lists[key]]


def read_lowshot_meta(path: Path | str) -> LowShotMeta:
    """Read and check ``label_idx.json`` (``--lowshotmeta``).

    Raises:
        DataError: the file is missing, not JSON, lacks a list, holds an index outside ``label_names``,
            repeats a class, its ``base_classes`` is not ``base_classes_1`` U ``base_classes_2``, or two lists of
            :data:`DISJOINT_LISTS` share a class.
    """
    path = Path(path)
    data = _read_json(path, "low-shot class split (--lowshotmeta)")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with label_names and {', '.join(META_LISTS)}")
    missing = [key for key in ("label_names", *META_LISTS) if key not in data]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    names = data["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: label_names must be a list of wnids")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: label_names repeats a wnid")
    lists = {}
    for key in META_LISTS:
        values = data[key]
        if not _integers(values):
            raise DataError(f"{path}: {key} must be a list of class indices")
        outside = [v for v in values if not 0 <= v < len(names)]
        if outside:
            raise DataError(f"{path}: {key} holds index {outside[0]}, outside the {len(names)} label_names")
        if len(set(values)) != len(values):
            raise DataError(f"{path}: {key} repeats a class")
        lists[key] = tuple(values)
    if set(lists["base_classes"]) != set(lists["base_classes_1"]) | set(lists["base_classes_2"]):
        raise DataError(f"{path}: base_classes is not the union of base_classes_1 and base_classes_2")
    for first, second in DISJOINT_LISTS:
        shared = set(lists[first]) & set(lists[second])
        if shared:
            raise DataError(f"{path}: class {min(shared)} is in both {first} and {second}")
    return LowShotMeta(path, tuple(names), lists)


def _integers(values: object) -> bool:
    """Whether ``values`` is a list of integers (not booleans)."""
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _class_folder(root: Path, wnid: str, meta: LowShotMeta) -> Path:
    folder = root / wnid
    if not folder.is_dir():
        if root.name == "val" and _class_files(root):
            raise DataError(f"{root}: the ILSVRC val images lie flat, not in <wnid>/ class folders; fold them with "
                            f"python -m scripts.fold_imagenet_val --val {root} --devkit DEVKIT (or --labels FILE)")
        raise DataError(f"{folder}: class {wnid} of {meta.path} is missing from the image folder")
    return folder


@dataclass(frozen=True)
class TrainList:
    """The benchmark's training images ``files``, class by class in ``label_names`` order (class k's:
    ``files[starts[k]:starts[k+1]]``); ``source``: the release's list it was read from, or how it was
    rebuilt (``reconstructed``: from the folder, the within-class order unconfirmed)."""

    files: tuple[Path, ...]
    starts: tuple[int, ...]
    source: str
    reconstructed: bool

    def class_files(self, k: int) -> tuple[Path, ...]:
        return self.files[self.starts[k]:self.starts[k + 1]]


RECONSTRUCTION_WARNING = ("no --trainlist (the release's train.json): the training list is rebuilt with each class's "
                          "files sorted by name, not the release's order, so the split files pick other images and "
                          "the shots differ from the benchmark's")


def rebuild_train_list(train_dir: Path | str, meta: LowShotMeta) -> TrainList:
    """The list as each class's image files sorted by name, classes in ``label_names`` order."""
    train_dir = Path(train_dir)
    files, starts = [], [0]
    for wnid in meta.label_names:
        files.extend(_class_files(_class_folder(train_dir, wnid, meta)))
        starts.append(len(files))
    return TrainList(tuple(files), tuple(starts), f"reconstructed from {train_dir}: each class's files sorted by name "
                     "(the release's within-class order is unconfirmed)", True)


def read_train_list(path: Path | str, train_dir: Path | str, meta: LowShotMeta) -> TrainList:
    """The release's ``train.json`` (``image_names``, ``image_labels``), checked against the folder:
    labels grouped in class order, each name ``.../<wnid>/<file>`` of its label's wnid, every file
    present under ``train_dir/<wnid>/``."""
    path, train_dir = Path(path), Path(train_dir)
    data = _read_json(path, "training image list (--trainlist)")
    if not isinstance(data, dict) or not {"image_names", "image_labels"} <= set(data):
        raise DataError(f"{path}: expected a JSON object with image_names and image_labels")
    names, labels = data["image_names"], data["image_labels"]
    if len(names) != len(labels):
        raise DataError(f"{path}: {len(names)} image_names but {len(labels)} image_labels")
    if not _integers(labels):
        raise DataError(f"{path}: image_labels must be integer class indices")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(meta.label_names)):
        raise DataError(f"{path}: image_labels must be class indices 0..{len(meta.label_names) - 1}")
    if np.any(np.diff(labels) < 0):
        raise DataError(f"{path}: images are not grouped by class in label_names order")
    starts = np.searchsorted(labels, np.arange(len(meta.label_names) + 1))
    files = []
    for k, wnid in enumerate(meta.label_names):
        folder = _class_folder(train_dir, wnid, meta)
        present = {p.name for p in _class_files(folder)}
        for i in range(starts[k], starts[k + 1]):
            parts = Path(names[i]).parts
            if len(parts) > 1 and parts[-2] != wnid:
                raise DataError(f"{path}: image {i} ({names[i]}) is labelled {wnid} but lies in folder {parts[-2]}")
            if parts[-1] not in present:
                raise DataError(f"{path}: image {i} ({names[i]}) is not in {folder}")
            files.append(folder / parts[-1])
    return TrainList(tuple(files), tuple(int(s) for s in starts), f"release list {path}", False)


def read_trial(path: Path | str, meta: LowShotMeta, images: TrainList, examples: int) -> np.ndarray:
    """One trial's split file -> ``[C, examples]`` int64 indices into ``images`` (row k: class k). Every
    index of a row is checked, also those past ``examples``.

    Raises:
        DataError: not JSON, a length other than ``len(label_names)``, a row with fewer than ``examples``
            indices, one that is not all integers, repeats an index or holds one outside its class's images.
    """
    path = Path(path)
    data = _read_json(path, "trial split file (--experimentpath)")
    classes = len(meta.label_names)
    if not isinstance(data, list) or len(data) != classes:
        found = len(data) if isinstance(data, list) else type(data).__name__
        raise DataError(f"{path}: expected a list of {classes} per-class index lists (one per label_names entry "
                        f"of {meta.path}), found {found}")
    rows = np.zeros((classes, examples), dtype=np.int64)
    for k, row in enumerate(data):
        name = f"{path}: class {k} ({meta.label_names[k]})"
        if not _integers(row):
            raise DataError(f"{name}: expected a list of integer image indices")
        if len(row) < examples:
            raise DataError(f"{name}: {len(row)} image indices, fewer than the {examples} the largest --lowshotn needs")
        if len(set(row)) != len(row):
            repeated = next(i for j, i in enumerate(row) if i in row[:j])
            raise DataError(f"{name}: index {repeated} is listed more than once (the n-shot sets need distinct images)")
        start, end = images.starts[k], images.starts[k + 1]
        outside = [i for i in row if not start <= i < end]
        if outside:
            raise DataError(f"{name}: index {outside[0]} lies outside its {end - start} training images "
                            f"(indices {start}..{end - 1} of {images.source})")
        rows[k] = row[:examples]
    return rows


def shot_indices(trial: np.ndarray, classes: tuple[int, ...] | list[int], n: int) -> np.ndarray:
    """The n-shot sets: ``[len(classes), n]``, the first ``n`` indices of each class's row."""
    return trial[list(classes), :n]


def class_images(root: Path | str, wnids: list[str], meta: LowShotMeta) -> tuple[tuple[Path, ...], ...]:
    """Each class's image files under ``root/<wnid>/``, sorted by name, in the order of ``wnids``."""
    root = Path(root)
    out = []
    for wnid in wnids:
        files = _class_files(_class_folder(root, wnid, meta))
        if not files:
            raise DataError(f"{root / wnid}: no images")
        out.append(tuple(files))
    return tuple(out)


def benchmark_split(imagenet: Path | str, meta: LowShotMeta, split: str) -> Split:
    """A split of the benchmark for the training stages (:data:`STAGE_SPLITS`), classes sorted by wnid."""
    folder, key = STAGE_SPLITS[split]
    root = Path(imagenet) / folder
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (--dataroot must hold train/ and val/ class folders "
                        f"with --lowshotmeta)")
    wnids = sorted(meta.wnids(key))
    return Split(split, tuple(wnids), class_images(root, wnids, meta), "lowshot")


def read_stage_split(root: Path | str, split: str, lowshotmeta: str | None = None) -> Split:
    """The training stages' split: the benchmark's with ``--lowshotmeta``, else ``read_split``'s."""
    if lowshotmeta:
        return benchmark_split(root, read_lowshot_meta(lowshotmeta), split)
    return read_split(root, split)
