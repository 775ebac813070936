#!/usr/bin/env python3
"""Build the flat miniImageNet folder from ILSVRC-2012 training photos.

Usage::

    python scripts/make_miniimagenet.py --imagenet TRAIN_DIR --splits CSV_DIR \
        --out OUT_DIR [--size N] [--nthreads K]

Inputs
    ``TRAIN_DIR/<wnid>/<wnid>_<n>.JPEG``  ILSVRC-2012 training photos.
    ``CSV_DIR/{train,val,test}.csv``      Ravi & Larochelle split files with
                                          header ``filename,label`` and rows
                                          like ``n0153282900000005.jpg,n01532829``.

Naming rule
    In ``<wnid><8 digits>.jpg`` the eight-digit number is the 1-based position
    of the source photo among the class's ``<wnid>_<n>.JPEG`` files sorted by
    the integer ``<n>`` (numeric, not lexicographic, order).

Output
    ``OUT_DIR/images/<wnid><8 digits>.jpg`` (RGB JPEG) and byte copies of the
    three split CSVs as ``OUT_DIR/{train,val,test}.csv``.

    Without ``--size`` a source that already is an RGB JPEG is copied byte for
    byte; any other source (CMYK or greyscale JPEG, PNG data named ``.JPEG``)
    is converted to RGB and saved as JPEG (quality ``JPEG_QUALITY``). With
    ``--size N`` every photo is converted to RGB and resized to N x N with a
    plain (aspect-ratio-ignoring) PIL resize using LANCZOS resampling, the
    usual miniImageNet practice with N = 84.

    Existing outputs are skipped, so an interrupted run can be resumed; every
    file is written to a temporary file in the destination folder and moved
    into place with ``os.replace``.

Exit status
    0  every row listed in the CSVs has its image in ``OUT_DIR/images``;
    1  some rows could not be produced (problems are listed on stderr);
    2  fatal input problem (missing ``--imagenet``/``--splits`` folder, a
       missing split CSV or one lacking the ``filename,label`` columns), or
       invalid command-line arguments.

Class/row counts that differ from the standard 64/16/20 classes x 600 rows
only produce warnings, so small test trees build fine.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.errors import DataError, InputError  # noqa: E402  (the repository root is on the path only from here)
from utils.options import add_threads_flag  # noqa: E402

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXPECTED_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
EXPECTED_ROWS_PER_CLASS = 600
REQUIRED_COLUMNS: tuple[str, ...] = ("filename", "label")
JPEG_QUALITY = 95
MAX_EXAMPLES = 3

_TARGET_RE = re.compile(r"^(?P<wnid>n\d{8})(?P<position>\d{8})\.jpg$")


@dataclass(frozen=True)
class Row:
    """One data row of a split CSV."""

    split: str
    filename: str
    label: str


@dataclass(frozen=True)
class Job:
    """One output image to produce from one source photo."""

    source: Path
    target: Path


def parse_target(filename: str) -> tuple[str, int]:
    """Split a miniImageNet file name ``<wnid><8 digits>.jpg``.

    ``wnid`` is a WordNet id ``n`` + 8 digits, as all ILSVRC class ids are.

    Returns ``(wnid, position)`` where ``position`` is the 1-based index of
    the source photo in numeric order. Raises ``ValueError`` for names that do
    not follow the pattern or carry position 0.
    """
    match = _TARGET_RE.match(filename)
    if match is None:
        raise ValueError(f"not of the form n<8 digits><8 digits>.jpg: {filename!r}")
    position = int(match.group("position"))
    if position < 1:
        raise ValueError(f"position must be >= 1: {filename!r}")
    return match.group("wnid"), position


def photo_number(path: Path, wnid: str) -> int | None:
    """Return ``<n>`` of an ILSVRC photo ``<wnid>_<n>.JPEG``, else ``None``.

    The extension is matched case-insensitively; other files are ignored.
    """
    match = re.fullmatch(re.escape(wnid) + r"_(\d+)\.jpeg", path.name, re.IGNORECASE)
    return int(match.group(1)) if match else None


def position_index(train_dir: Path, wnid: str) -> list[Path]:
    """Return the class's ILSVRC photos sorted by their integer ``<n>``.

    Element ``i`` is the photo at 1-based position ``i + 1``. Raises
    ``FileNotFoundError`` when ``train_dir/wnid`` is not a directory.
    """
    class_dir = Path(train_dir) / wnid
    if not class_dir.is_dir():
        raise FileNotFoundError(f"class folder not found: {class_dir}")
    numbered = []
    for path in class_dir.iterdir():
        number = photo_number(path, wnid)
        if number is not None:
            numbered.append((number, path))
    numbered.sort()
    return [path for _, path in numbered]


def read_split_csv(csv_path: Path, split: str) -> list[Row]:
    """Read a split CSV; raise ``DataError`` if it lacks the required columns."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if not all(column in columns for column in REQUIRED_COLUMNS):
            raise DataError(
                f"{csv_path}: header must have columns {','.join(REQUIRED_COLUMNS)}"
                f" (found: {','.join(columns) or 'nothing'})"
            )
        reader.fieldnames = columns
        return [
            Row(split, (record["filename"] or "").strip(), (record["label"] or "").strip())
            for record in reader
        ]


def check_inputs(imagenet: Path, splits_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Validate the folders and return the split CSV paths; raise ``DataError``."""
    if not imagenet.is_dir():
        raise DataError(f"--imagenet {imagenet}: no such directory")
    if not splits_dir.is_dir():
        raise DataError(f"--splits {splits_dir}: no such directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a directory")
    csv_paths = {split: splits_dir / f"{split}.csv" for split in SPLITS}
    for csv_path in csv_paths.values():
        if not csv_path.is_file():
            raise DataError(f"--splits {splits_dir}: missing split file {csv_path.name}")
    return csv_paths


def plan_jobs(
    rows: Iterable[Row], train_dir: Path, images_dir: Path
) -> tuple[list[Job], dict[str, list[str]]]:
    """Map CSV rows to jobs, collecting rows that cannot be produced.

    Returns ``(jobs, problems)``: one job per distinct file name whose source
    photo exists, and ``problems`` mapping a problem description to example
    strings (one per affected row).
    """
    indexes: dict[str, list[Path] | None] = {}
    jobs: dict[str, Job] = {}
    problems: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        where = f"{row.filename} ({row.split}.csv)"
        try:
            wnid, position = parse_target(row.filename)
        except ValueError:
            problems["file name not of the form n<8 digits><8 digits>.jpg"].append(where)
            continue
        if wnid != row.label:
            problems["file name does not start with its label"].append(
                f"{where} label {row.label}"
            )
            continue
        if wnid not in indexes:
            try:
                indexes[wnid] = position_index(train_dir, wnid)
            except FileNotFoundError:
                indexes[wnid] = None
        photos = indexes[wnid]
        if photos is None:
            problems["class folder absent from --imagenet"].append(where)
            continue
        if position > len(photos):
            problems["position beyond the number of photos in the class"].append(
                f"{where} class has {len(photos)}"
            )
            continue
        jobs.setdefault(row.filename, Job(photos[position - 1], images_dir / row.filename))
    return list(jobs.values()), problems


def encode_image(source: Path, size: int | None) -> bytes:
    """Return the output JPEG bytes for ``source``.

    RGB JPEG sources are returned unchanged when ``size`` is ``None``;
    otherwise the photo is converted to RGB, optionally resized to
    ``size`` x ``size`` with LANCZOS, and re-encoded as JPEG.
    """
    with Image.open(source) as image:
        if size is None and image.format == "JPEG" and image.mode == "RGB":
            return source.read_bytes()
        rgb = image.convert("RGB")
    if size is not None:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder."""
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def run_job(job: Job, size: int | None) -> str | None:
    """Produce one output unless it exists; return an error message or ``None``."""
    if job.target.exists():
        return None
    try:
        write_atomic(job.target, encode_image(job.source, size))
    except OSError as error:
        return f"{job.target.name} from {job.source}: {error}"
    return None


def count_warnings(rows_by_split: dict[str, list[Row]]) -> list[str]:
    """Return warnings for class/row counts differing from 64/16/20 x 600."""
    warnings = []
    for split, rows in rows_by_split.items():
        per_class = Counter(row.label for row in rows)
        if len(per_class) != EXPECTED_CLASSES[split]:
            warnings.append(
                f"{split}.csv has {len(per_class)} classes"
                f" (standard miniImageNet: {EXPECTED_CLASSES[split]})"
            )
        odd = [f"{label} ({n})" for label, n in sorted(per_class.items())
               if n != EXPECTED_ROWS_PER_CLASS]
        if odd:
            warnings.append(
                f"{split}.csv: {len(odd)} of {len(per_class)} classes do not have"
                f" {EXPECTED_ROWS_PER_CLASS} rows, e.g. {', '.join(odd[:MAX_EXAMPLES])}"
            )
    return warnings


def summarize(kind: str, examples: Sequence[str]) -> str:
    """Format one problem kind as a single line with a count and examples."""
    shown = "; ".join(examples[:MAX_EXAMPLES])
    more = ", ..." if len(examples) > MAX_EXAMPLES else ""
    return f"missing: {kind}: {len(examples)} row(s), e.g. {shown}{more}"


def positive_int(text: str) -> int:
    """argparse type for a strictly positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build OUT_DIR/images/<wnid><8 digits>.jpg and the split CSVs "
        "of miniImageNet from an ILSVRC-2012 training folder."
    )
    parser.add_argument("--imagenet", type=Path, required=True, metavar="TRAIN_DIR",
                        help="ILSVRC-2012 train folder holding <wnid>/<wnid>_<n>.JPEG")
    parser.add_argument("--splits", type=Path, required=True, metavar="CSV_DIR",
                        help="folder holding the Ravi split files train/val/test.csv")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                        help="output folder (created if needed)")
    parser.add_argument("--size", type=positive_int, default=None, metavar="N",
                        help="resize every image to N x N (LANCZOS); default keeps "
                        "the original size")
    add_threads_flag(parser, use="parallel worker threads", type=positive_int, metavar="K")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    return get_args_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line tool and return its exit status."""
    args = parse_args(argv)
    try:
        csv_paths = check_inputs(args.imagenet, args.splits, args.out)
        rows_by_split = {split: read_split_csv(path, split) for split, path in csv_paths.items()}
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    all_rows = [row for rows in rows_by_split.values() for row in rows]
    jobs, problems = plan_jobs(all_rows, args.imagenet, images_dir)

    already = sum(job.target.exists() for job in jobs)
    with ThreadPoolExecutor(max_workers=args.nthreads) as pool:
        results = list(tqdm(pool.map(lambda job: run_job(job, args.size), jobs),
                            total=len(jobs), desc="images", unit="img"))
    failures = [message for message in results if message is not None]
    if failures:
        problems["source photo could not be read or converted"].extend(failures)

    for split, path in csv_paths.items():
        write_atomic(args.out / f"{split}.csv", path.read_bytes())

    for warning in count_warnings(rows_by_split):
        print(f"warning: {warning}", file=sys.stderr)
    for kind, examples in problems.items():
        print(summarize(kind, examples), file=sys.stderr)

    expected = {row.filename for row in all_rows}
    produced = sum((images_dir / name).is_file() for name in expected)
    print(f"images: {len(expected)} listed, {produced} present in {images_dir} "
          f"({len(jobs) - already - len(failures)} written, {already} already present)")
    print(f"csv: copied {', '.join(f'{split}.csv' for split in SPLITS)} to {args.out}")
    return 0 if produced == len(expected) and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
