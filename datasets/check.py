"""Check a dataset folder in any accepted layout and print what was found.

    python -m datasets.check --dataroot DIR [--full]

Exit status 0 when every split reads and (with ``--full``) every image is readable, 1 when
the data deviates from miniImageNet's 64/16/20 classes of 600 images (a warning, the scripts
still run), 2 when a split cannot be read at all or (with ``--full``) an image cannot be read
(the scripts stop on it); ``--full`` lists every such image, one line each.
"""
from __future__ import annotations

import argparse
import sys

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m datasets.check\n")
    sys.exit(2)

from datasets.images import bad_images
from datasets.splits import SPLITS, class_list, detect_layout, read_split
from utils.options import add_dataroot_flag, add_threads_flag, run_cli

EXPECTED = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600


def check(dataroot: str, full: bool, workers: int) -> int:
    """Print one line per split and any deviation; returns the exit status."""
    print(f"{dataroot}: layout {detect_layout(dataroot)}")
    status = 0
    for name in SPLITS:
        split = read_split(dataroot, name)
        sizes = [len(files) for files in split.files]
        print(f"  {name}: {split.num_classes} classes, {len(split)} images ({min(sizes)}-{max(sizes)} per class)")
        official = set(class_list(name))
        if split.num_classes != EXPECTED[name] or set(split.classes) != official:
            foreign = sorted(set(split.classes) - official)
            print(f"  warning: {name} differs from the Ravi & Larochelle split "
                  f"({EXPECTED[name]} classes){'; not in it: ' + ' '.join(foreign[:5]) if foreign else ''}")
            status = max(status, 1)
        if any(size != IMAGES_PER_CLASS for size in sizes):
            print(f"  warning: {name} classes do not all have {IMAGES_PER_CLASS} images")
            status = max(status, 1)
        if full:
            bad = bad_images(split, workers)
            print(f"  {name}: {f'{len(bad)} unreadable or truncated image(s)' if bad else 'all images readable'}")
            for path, problem in bad:
                print(f"    {path}: {problem}")
            status = 2 if bad else status
    return status


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check a miniImageNet folder (any accepted layout)")
    add_dataroot_flag(parser, None, required=True)
    parser.add_argument("--full", action="store_true", help="also open every image (finds truncated files)")
    add_threads_flag(parser, 8, use="image-decoding threads of --full")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check the folder; one that cannot be read is one line on stderr and status 2."""
    return run_cli(lambda args: check(args.dataroot, args.full, args.nthreads), get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
