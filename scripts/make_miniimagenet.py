"""Build the flat miniImageNet folder from ILSVRC-2012 training photos.

    python -m scripts.make_miniimagenet --imagenet TRAIN_DIR --splits CSV_DIR --out OUT_DIR [--size N] [--nthreads K]

Reads ``TRAIN_DIR/<wnid>/<wnid>_<n>.JPEG`` and the Ravi & Larochelle splits ``CSV_DIR/{train,val,test}.csv``
(header ``filename,label``, rows like ``n0153282900000005.jpg,n01532829``); writes
``OUT_DIR/images/<wnid><8 digits>.jpg`` (RGB JPEG), where the number is the 1-based position of the
source photo among its class's photos sorted by the integer ``<n>``, and byte copies of the CSVs as
``OUT_DIR/{train,val,test}.csv``. Without ``--size`` an RGB JPEG is copied byte for byte and any other
source (CMYK or greyscale JPEG, PNG data named ``.JPEG``) saved as RGB JPEG (quality ``JPEG_QUALITY``);
``--size N`` resizes every photo to N x N (LANCZOS, aspect ratio ignored: the usual miniImageNet
practice with N = 84). Existing outputs are skipped, so a run resumes; each file is written to a
temporary file in its folder and moved into place with ``os.replace``.

Exit status: 0 every row of the CSVs has its image in ``OUT_DIR/images``; 1 some rows could not be
produced (listed on stderr); 2 bad flags, a missing ``--imagenet``/``--splits`` folder or split CSV,
or a CSV without the ``filename,label`` columns. Counts other than 64/16/20 classes x 600 rows only warn.
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
from functools import cache, partial
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.make_miniimagenet\n")
    sys.exit(2)

from datasets.check import EXPECTED, IMAGES_PER_CLASS
from datasets.splits import SPLITS
from utils.errors import DataError
from utils.options import add_threads_flag, run_cli

JPEG_QUALITY = 95
MAX_EXAMPLES = 3
TARGET = re.compile(r"^(n\d{8})(\d{8})\.jpg$")
Row = tuple[str, str, str]  # (split, filename, label): one data row of a split CSV


def parse_target(filename: str) -> tuple[str, int] | None:
    """``(wnid, 1-based position)`` of a name ``<wnid><8 digits>.jpg``; None for another name or position 0."""
    match = TARGET.match(filename)
    return (match.group(1), int(match.group(2))) if match and int(match.group(2)) >= 1 else None


def position_index(train_dir: Path, wnid: str) -> list[Path] | None:
    """The class's photos ``<wnid>_<n>.JPEG`` (any case) sorted by ``<n>``: element i is position i + 1.
    None when ``train_dir/wnid`` is not a folder."""
    class_dir = Path(train_dir) / wnid
    if not class_dir.is_dir():
        return None
    pattern = re.compile(re.escape(wnid) + r"_(\d+)\.jpeg", re.IGNORECASE)
    matches = [(pattern.fullmatch(path.name), path) for path in class_dir.iterdir()]
    return [path for _, path in sorted((int(match.group(1)), path) for match, path in matches if match)]


def read_split_csv(csv_path: Path, split: str) -> list[Row]:
    """The rows of a split CSV; DataError if it lacks the ``filename`` and ``label`` columns."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if not {"filename", "label"} <= set(columns):
            found = ",".join(columns) or "nothing"
            raise DataError(f"{csv_path}: header must have columns filename,label (found: {found})")
        reader.fieldnames = columns
        return [(split, (record["filename"] or "").strip(), (record["label"] or "").strip()) for record in reader]


def plan_jobs(rows: list[Row], train_dir: Path, images_dir: Path) -> tuple[dict[Path, Path], dict[str, list[str]]]:
    """``({output: source photo}`` for each distinct file name whose photo exists, ``{problem: [one
    example per row]})``."""
    photos = cache(partial(position_index, train_dir))  # wnid -> its photos by position, None without a folder
    jobs: dict[Path, Path] = {}
    problems: dict[str, list[str]] = defaultdict(list)
    for split, filename, label in rows:
        where = f"{filename} ({split}.csv)"
        wnid, position = parse_target(filename) or (None, 0)
        found = photos(wnid) if wnid == label else None
        if wnid is None:
            problems["file name not of the form n<8 digits><8 digits>.jpg"].append(where)
        elif wnid != label:
            problems["file name does not start with its label"].append(f"{where} label {label}")
        elif found is None:
            problems["class folder absent from --imagenet"].append(where)
        elif position > len(found):
            problems["position beyond the number of photos in the class"].append(f"{where} class has {len(found)}")
        else:
            jobs.setdefault(images_dir / filename, found[position - 1])
    return jobs, problems


def encode_image(source: Path, size: int | None) -> bytes:
    """The output JPEG of ``source``: its own bytes if an RGB JPEG and no ``size``, else RGB (resized to
    ``size`` x ``size``, LANCZOS) re-encoded."""
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
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def produce(target: Path, source: Path, size: int | None) -> str | None:
    """Write one output unless it exists; the problem, or None."""
    if not target.exists():
        try:
            write_atomic(target, encode_image(source, size))
        except OSError as error:
            return f"{target.name} from {source}: {error}"
    return None


def positive_int(text: str) -> int:
    """argparse type for a strictly positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build OUT_DIR/images/<wnid><8 digits>.jpg and the split CSVs "
                                     "of miniImageNet from an ILSVRC-2012 training folder.")
    parser.add_argument("--imagenet", type=Path, required=True, metavar="TRAIN_DIR",
                        help="ILSVRC-2012 train folder holding <wnid>/<wnid>_<n>.JPEG")
    parser.add_argument("--splits", type=Path, required=True, metavar="CSV_DIR",
                        help="folder holding the Ravi split files train/val/test.csv")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="output folder (created if needed)")
    parser.add_argument("--size", type=positive_int, default=None, metavar="N",
                        help="resize every image to N x N (LANCZOS); default keeps the original size")
    add_threads_flag(parser, use="parallel worker threads", type=positive_int, metavar="K")
    return parser


def build(args: argparse.Namespace) -> int:
    """Check the inputs (DataError), write the images and CSVs, report; the exit status."""
    for flag, folder in (("--imagenet", args.imagenet), ("--splits", args.splits)):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder}: no such directory")
    if args.out.exists() and not args.out.is_dir():
        raise DataError(f"--out {args.out}: exists and is not a directory")
    csv_paths = {split: args.splits / f"{split}.csv" for split in SPLITS}
    for csv_path in csv_paths.values():
        if not csv_path.is_file():
            raise DataError(f"--splits {args.splits}: missing split file {csv_path.name}")
    rows_by_split = {split: read_split_csv(path, split) for split, path in csv_paths.items()}

    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    all_rows = [row for rows in rows_by_split.values() for row in rows]
    jobs, problems = plan_jobs(all_rows, args.imagenet, images_dir)
    already = sum(target.exists() for target in jobs)
    with ThreadPoolExecutor(max_workers=args.nthreads) as pool:
        results = list(tqdm(pool.map(lambda job: produce(*job, args.size), jobs.items()),
                            total=len(jobs), desc="images", unit="img"))
    failures = [message for message in results if message is not None]
    if failures:
        problems["source photo could not be read or converted"].extend(failures)
    for split, path in csv_paths.items():
        write_atomic(args.out / f"{split}.csv", path.read_bytes())

    for split, rows in rows_by_split.items():  # counts other than miniImageNet's only warn
        per_class = Counter(label for _, _, label in rows)
        if len(per_class) != EXPECTED[split]:
            print(f"warning: {split}.csv has {len(per_class)} classes (standard miniImageNet: {EXPECTED[split]})",
                  file=sys.stderr)
        odd = [f"{label} ({n})" for label, n in sorted(per_class.items()) if n != IMAGES_PER_CLASS]
        if odd:
            print(f"warning: {split}.csv: {len(odd)} of {len(per_class)} classes do not have {IMAGES_PER_CLASS} "
                  f"rows, e.g. {', '.join(odd[:MAX_EXAMPLES])}", file=sys.stderr)
    for kind, examples in problems.items():
        more = ", ..." if len(examples) > MAX_EXAMPLES else ""
        print(f"missing: {kind}: {len(examples)} row(s), e.g. {'; '.join(examples[:MAX_EXAMPLES])}{more}",
              file=sys.stderr)
    expected = {filename for _, filename, _ in all_rows}
    produced = sum((images_dir / name).is_file() for name in expected)
    print(f"images: {len(expected)} listed, {produced} present in {images_dir} "
          f"({len(jobs) - already - len(failures)} written, {already} already present)")
    print(f"csv: copied {', '.join(f'{split}.csv' for split in SPLITS)} to {args.out}")
    return 0 if produced == len(expected) and not problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line tool and return its exit status (bad input: one line, status 2)."""
    return run_cli(build, get_args_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
