"""Fold the flat ILSVRC-2012 validation folder into class folders ``<wnid>/``.

    python -m scripts.fold_imagenet_val --val VAL_DIR (--devkit PATH | --labels FILE) \
        [--out OUT_DIR [--link]] [--dryRun]

Labels: ``--devkit``, the ``ILSVRC2012_devkit_t12/`` folder or ``.tar.gz`` (line k of
``data/ILSVRC2012_validation_ground_truth.txt``: the ILSVRC2012_ID of image k; ``data/meta.mat``:
ILSVRC2012_ID -> WNID of the leaf synsets, ``num_children`` 0; needs scipy), or ``--labels``: Kaggle's
``LOC_val_solution.csv`` (``ImageId,PredictionString``: the name without extension, the wnid first) or
``filename wnid`` lines.

``VAL_DIR/ILSVRC2012_val_<8 digits>.JPEG`` move to ``<wnid>/`` under ``OUT_DIR`` (default ``VAL_DIR``;
renames, so on its filesystem), or with ``--link`` are hard-linked there (symbolic links where that
fails). No image is opened. Everything is checked before anything moves (every labelled file present,
every ``.JPEG``/``.jpg``/``.png`` of the flat folder labelled, wnids ``n`` + 8 digits, no file in another
class's folder; counts other than 1000 x 50 only print a note); files already in their class folder
count as done, so a run resumes and a finished one is a no-op.

Exit status: 0 done or nothing to do; 1 a move or link failed part-way (run again to finish);
2 bad input or flags (one line naming the file, nothing moved); 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.fold_imagenet_val\n")
    sys.exit(2)

from utils.errors import DataError, OptionError
from utils.options import run_cli

GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
STANDARD_CLASSES, STANDARD_PER_CLASS = 1000, 50
WNID = re.compile(r"n\d{8}")


def add_label(labels: dict[str, str], where: str, name: str, wnid: str) -> None:
    """Record ``name -> wnid``; raise ``DataError`` naming ``where`` for a bad name, wnid or repeat."""
    if not name or Path(name).name != name or name.startswith("."):
        raise DataError(f"{where}: {name!r} is not a plain file name")
    if not WNID.fullmatch(wnid):
        raise DataError(f"{where}: {wnid!r} is not a wnid (n + 8 digits)")
    if name in labels:
        raise DataError(f"{where}: {name} is labelled a second time")
    labels[name] = wnid


def read_labels(path: Path) -> dict[str, str]:
    """File name -> wnid from a CSV with header ``ImageId,PredictionString`` or ``filename wnid`` lines."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--labels {path}: cannot read ({error})") from None
    labels: dict[str, str] = {}
    kaggle = bool(lines) and lines[0].startswith("ImageId")
    if kaggle:
        header = [column.strip() for column in next(csv.reader(lines[:1]))]
        if "PredictionString" not in header:
            raise DataError(f"{path}: line 1: header has no PredictionString column")
    for number, line in enumerate(lines[kaggle:], start=1 + kaggle):
        where = f"{path}: line {number}"
        if not line.strip():
            continue
        if kaggle:
            row = next(csv.reader([line]))
            tokens = row[header.index("PredictionString")].split() if len(row) == len(header) else []
            if not tokens:
                raise DataError(f"{where}: expected {len(header)} columns with a non-empty PredictionString")
            add_label(labels, where, row[header.index("ImageId")].strip() + ".JPEG", tokens[0])
        elif len(line.split()) != 2:
            raise DataError(f"{where}: expected 'filename wnid', got {line.strip()!r}")
        else:
            add_label(labels, where, *line.split())
    if not labels:
        raise DataError(f"--labels {path}: no labels in the file")
    return labels


def devkit_file(devkit: Path, member: str) -> bytes:
    """One file of the devkit, from its folder or its archive."""
    if devkit.is_dir():
        if not (devkit / member).is_file():
            raise DataError(f"--devkit {devkit}: no {member}")
        return (devkit / member).read_bytes()
    if not devkit.is_file():
        raise DataError(f"--devkit {devkit}: no such folder or archive")
    try:
        with tarfile.open(devkit) as archive:
            for info in archive:
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    return archive.extractfile(info).read()
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"--devkit {devkit}: not a readable archive ({error})") from None
    raise DataError(f"--devkit {devkit}: no {member} in the archive")


def leaf_wnids(devkit: Path, meta: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the leaf synsets (``num_children`` 0) of ``meta.mat``."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise OptionError(f"--devkit needs scipy to read {META}: pip install scipy, or use --labels "
                          f"with LOC_val_solution.csv or a 'filename wnid' text file") from None
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        return {int(ident): str(wnid) for ident, wnid, children
                in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]) if int(children) == 0}
    except (MatReadError, KeyError, ValueError, TypeError) as error:
        raise DataError(f"--devkit {devkit}: {META} has no usable synsets table ({error})") from None


def read_devkit(devkit: Path) -> dict[str, str]:
    """File name -> wnid from the devkit's ground truth and ``meta.mat``."""
    where = f"{devkit}: {GROUND_TRUTH}"
    try:
        lines = devkit_file(devkit, GROUND_TRUTH).decode("ascii").rstrip().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{where}: not a text file") from None
    if not lines:
        raise DataError(f"{where}: empty")
    for number, line in enumerate(lines, start=1):
        if not line.strip().isdigit():
            raise DataError(f"{where} line {number}: expected one ILSVRC2012_ID, got {line.strip()!r}")
    leaves = leaf_wnids(devkit, devkit_file(devkit, META))
    labels: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if int(line) not in leaves:
            raise DataError(f"{where} line {number}: ILSVRC2012_ID {int(line)} is not a leaf class of {META}")
        add_label(labels, f"{where} line {number}", f"ILSVRC2012_val_{number:08d}.JPEG", leaves[int(line)])
    return labels


def check_folders(val: Path, out: Path | None, link: bool) -> Path:
    """Check the folders and flags; return where the class folders go."""
    if not val.is_dir():
        raise DataError(f"--val {val}: no such directory")
    if link and out is None:
        raise OptionError("--link needs --out: the class folders of links go there")
    if out is None:
        return val
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not link and existing.stat().st_dev != val.stat().st_dev:
        raise OptionError(f"--out {out} is on another filesystem than --val {val}: moving would copy "
                          f"every image; use --link, or fold in place without --out")
    return out


def first_problem(problems: list[str], what: str) -> None:
    """Raise ``DataError`` with the first problem and how many ``what`` share it."""
    if problems:
        more = f" (and {len(problems) - 1} more {what})" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def plan(val: Path, dest: Path, labels: dict[str, str], source: Path, link: bool) -> list[tuple[Path, Path]]:
    """The ``(flat file, class-folder file)`` pairs still to do; raise ``DataError`` before any."""
    flat = {entry.name for entry in os.scandir(val) if entry.is_file()}
    placed: dict[str, list[str]] = defaultdict(list)  # file name -> the class folders under dest holding it
    for folder in sorted(dest.iterdir()) if dest.is_dir() else []:
        if folder.is_dir() and WNID.fullmatch(folder.name):
            for entry in os.scandir(folder):
                placed[entry.name].append(folder.name)
    first_problem([f"{val / name}: no label in {source}" for name in sorted(flat)
                   if name.lower().endswith(IMAGE_SUFFIXES) and name not in labels], "images without a label")
    todo, missing, misplaced, twice = [], [], [], []
    for name, wnid in sorted(labels.items()):
        folders = placed.get(name, [])
        wrong = [folder for folder in folders if folder != wnid]
        if wrong:
            misplaced.append(f"{dest / wrong[0] / name}: in the wrong class folder, {source} labels it {wnid}")
        elif folders and name in flat and not link:
            twice.append(f"{val / name}: also in {dest / wnid}; remove one of the two")
        elif name in flat and not folders:
            todo.append((val / name, dest / wnid / name))
        elif not folders:
            missing.append(f"{source}: labels {name}, which is neither in {val} nor in {dest / wnid}")
    first_problem(missing, "labelled files missing")
    first_problem(misplaced, "files in the wrong class folder")
    first_problem(twice, "files in both places")
    return todo


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", type=Path, required=True, metavar="DIR",
                   help="the flat folder of ILSVRC2012_val_<8 digits>.JPEG")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="put the class folders here (default: fold --val in place)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", type=Path, metavar="PATH",
                        help="ILSVRC2012_devkit_t12/ folder or .tar.gz (needs scipy)")
    labels.add_argument("--labels", type=Path, metavar="FILE",
                        help="LOC_val_solution.csv, or a text file of 'filename wnid' lines")
    p.add_argument("--link", action="store_true",
                   help="hard-link (else symlink) into --out and keep --val as it is, instead of moving")
    p.add_argument("--dryRun", action="store_true", help="print what would be done and change nothing")
    return p


def fold(args: argparse.Namespace) -> int:
    """Check everything (bad input raises an InputError), then move or link; the exit status."""
    dest = check_folders(args.val, args.out, args.link)
    labels = read_devkit(args.devkit) if args.devkit else read_labels(args.labels)
    todo = plan(args.val, dest, labels, args.devkit or args.labels, args.link)
    per_class = Counter(labels.values()).values()
    counts = (f"{len(per_class)} classes, {len(labels)} images, "
              f"{min(per_class)}-{max(per_class)} images per class (min-max)")
    if len(per_class) != STANDARD_CLASSES or set(per_class) != {STANDARD_PER_CLASS}:
        print(f"note: not the {STANDARD_CLASSES} classes x {STANDARD_PER_CLASS} images "
              f"of the ILSVRC-2012 validation set")
    verb, past = ("link", "linked") if args.link else ("move", "moved")
    if not todo:
        print(f"nothing to do: every image is already in its class folder under {dest}; {counts}")
        return 0
    if args.dryRun:
        for flat_file, target in todo:
            print(f"would {verb} {flat_file} -> {target}")
        print(f"dry run: would {verb} {len(todo)} images, {len(labels) - len(todo)} are already in place; "
              f"{counts}; nothing changed")
        return 0
    done = symlinks = 0
    try:
        for flat_file, target in tqdm(todo, desc=verb, unit="img"):
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.link:
                try:
                    os.link(flat_file, target)
                except OSError:  # a symbolic link where a hard one fails
                    os.symlink(flat_file.resolve(), target)
                    symlinks += 1
            else:
                os.rename(flat_file, target)
            done += 1
    except OSError as error:
        print(f"error: {verb} {flat_file} -> {target} failed ({error}); {done} of {len(todo)} done, "
              f"run the same command again to finish", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {done} of {len(todo)} done; run the same command again to finish", file=sys.stderr)
        return 130
    kind = f" ({symlinks} as symbolic links)" if symlinks else ""
    print(f"done: {past} {done} images{kind}, {len(labels) - done} were already in place; {counts}, under {dest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line tool and return its exit status (bad input: one line, status 2)."""
    return run_cli(fold, get_args_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
