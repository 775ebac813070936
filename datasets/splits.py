"""A miniImageNet split from ``flat+csv`` (``images/*.jpg``, ``<split>.csv``: ``filename,label``), ``flat`` (the
classes of ``datasplit/<split>.txt``, files named after their wnid) or ``folders`` (``<split>/<wnid>/*.jpg``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.errors import DataError

SPLITS = ("train", "val", "test")
DATASPLIT_DIR = Path(__file__).resolve().parent.parent / "datasplit"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Split:
    """One split: classes sorted by wnid (numbered 0..C-1) and each class's files in order."""

    name: str
    classes: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]
    layout: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    def min_class_size(self) -> int:
        return min(len(f) for f in self.files)


def class_list(split: str) -> list[str]:
    """The wnids of a Ravi & Larochelle split, from ``datasplit/<split>.txt``."""
    path = DATASPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split class list not found")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{path}: split class list is empty")
    return wnids


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_csv(root: Path, split: str) -> Split:
    csv = root / f"{split}.csv"
    images = root / "images"
    if not csv.is_file():
        raise DataError(f"{csv}: split CSV not found")
    try:
        table = pd.read_csv(csv, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv}: not a readable CSV ({exc})") from None
    if list(table.columns[:2]) != ["filename", "label"] or len(table.columns) != 2:
        raise DataError(f"{csv}: expected the two columns 'filename,label', found {','.join(map(str, table.columns))}")
    if table.isna().any().any():
        raise DataError(f"{csv}: empty cells")
    if table.empty:
        raise DataError(f"{csv}: no images listed")
    by_class: dict[str, list[Path]] = {}
    for filename, label in zip(table["filename"], table["label"]):
        by_class.setdefault(label, []).append(images / filename)
    classes = tuple(sorted(by_class))
    return Split(split, classes, tuple(tuple(by_class[c]) for c in classes), "flat+csv")


def _nonempty(files: tuple[Path, ...], problem: str) -> tuple[Path, ...]:
    if not files:
        raise DataError(problem)
    return files


def _read_flat(root: Path, split: str) -> Split:
    images = root / "images"
    names = sorted(p.name for p in images.iterdir() if _is_image(p))
    classes = tuple(sorted(class_list(split)))
    files = tuple(_nonempty(tuple(images / n for n in names if n.startswith(wnid)),
                            f"{images}: no images of class {wnid} (split {split})") for wnid in classes)
    return Split(split, classes, files, "flat")


def _read_folders(root: Path, split: str) -> Split:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(f"{folder}: no class folders")
    files = tuple(_nonempty(tuple(sorted(p for p in (folder / wnid).iterdir() if _is_image(p))),
                            f"{folder / wnid}: no images") for wnid in classes)
    return Split(split, classes, files, "folders")


READERS = {"flat+csv": _read_csv, "flat": _read_flat, "folders": _read_folders}


def detect_layout(root: Path | str) -> str:
    """Which of the three layouts ``root`` holds: ``flat+csv``, ``flat`` or ``folders``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found (--dataroot)")
    if (root / "images").is_dir():
        return "flat+csv" if any((root / f"{s}.csv").is_file() for s in SPLITS) else "flat"
    if any((root / s).is_dir() for s in SPLITS):
        return "folders"
    raise DataError(f"{root}: no images/ folder and no {'/'.join(SPLITS)} class folders (--dataroot)")


def read_split(root: Path | str, split: str) -> Split:
    """One split of the dataset under ``root``, whatever its layout (:class:`DataError` when unusable)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return READERS[detect_layout(root)](Path(root), split)
