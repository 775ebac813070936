"""Decoding images, and a quick scan that finds unreadable or truncated files before a run."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from datasets.splits import Split
from utils.errors import DataError


def load_rgb(path: Path) -> Image.Image:
    """Decode one image as RGB; a missing, truncated or non-image file raises DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or None. Reads the header and, for JPEG, the end marker."""
    try:
        with Image.open(path) as image, open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 64))
            if image.format == "JPEG" and not handle.read().rstrip(b"\x00").endswith(b"\xff\xd9"):
                return "truncated JPEG (no end-of-image marker)"
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({exc})"
    return None


def bad_images(split: Split, workers: int = 8) -> list[tuple[Path, str]]:
    """``(path, problem)`` for every unusable file of a split, in the split's order."""
    flat = [p for files in split.files for p in files]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = pool.map(image_problem, flat)
    return [(path, problem) for path, problem in zip(flat, problems) if problem is not None]


def scan_split(split: Split, skip_bad: bool = False, workers: int = 8) -> tuple[Split, int]:
    """``(split, files dropped)``: raise DataError on the first bad file, or with ``skip_bad`` drop them."""
    bad = bad_images(split, workers)
    if not bad:
        return split, 0
    if not skip_bad:
        (path, problem), more = bad[0], f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{path}: {problem}{more}; pass --skipBadImages to leave such files out")
    bad_set = {path for path, _ in bad}
    kept = tuple(tuple(p for p in files if p not in bad_set) for files in split.files)
    for wnid, files in zip(split.classes, kept):
        if not files:
            raise DataError(f"class {wnid} of split {split.name} has no readable image left")
    return replace(split, files=kept), len(bad)
