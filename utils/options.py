"""Flags and checks shared by both scripts; one-line errors with exit status 2."""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from utils.errors import InputError, OptionError, TrainingDiverged


def add_common_args(parser: argparse.ArgumentParser, batch_default: int | None = 128,
                    batch_help: str = "images per batch") -> None:
    """Flags both training scripts share (``--batchSize`` with each script's default and meaning)."""
    parser.add_argument("--dataroot", default="data/miniImageNet", help="dataset root: images/ plus train/val/test.csv, "
                        "images/ alone (classes from datasplit/), or <split>/<wnid>/ folders")
    parser.add_argument("--imageSize", type=int, default=224, help="image side S in pixels (84 and 224 are usual)")
    parser.add_argument("--Fang", type=int, default=3, help="the patch grid is Fang x Fang")
    parser.add_argument("--tensorname", required=True, help="name of the run: models/<name>.t7 and runs/<name>/")
    parser.add_argument("--network", default="None", help="stage-1 checkpoint to start from (models/<name>.t7), or None")
    parser.add_argument("--LR", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--batchSize", type=int, default=batch_default, help=batch_help)
    parser.add_argument("--nthreads", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers and image-decoding threads")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run")
    parser.add_argument("--amp", type=int, default=0, choices=(0, 1), help="mixed precision (bfloat16 autocast) on CUDA")
    parser.add_argument("--deterministic", type=int, default=0, choices=(0, 1),
                        help="deterministic CUDA kernels (cudnn.deterministic, no benchmark)")
    parser.add_argument("--resume", action="store_true", help="continue the run from runs/<tensorname>/resume.pt")
    parser.add_argument("--overwrite", action="store_true", help="start anew even if runs/<tensorname>/ holds a run")
    parser.add_argument("--skipBadImages", action="store_true",
                        help="leave unreadable or truncated images out (reported) instead of stopping")
    parser.add_argument("--progress", type=int, default=1, choices=(0, 1), help="show progress bars")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise OptionError(f"--{name} must be at least 1, got {getattr(args, name)}")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device from ``--device`` (cuda when available by default); checks ``--amp`` too."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise OptionError(f"--device {name}: only cpu and cuda are supported")
    if args.amp and device.type != "cuda":
        raise OptionError(f"--amp 1 needs a CUDA device; --device is {device}")
    if args.amp and not torch.cuda.is_bf16_supported():
        raise OptionError(f"--amp 1: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return device


def configure_backend(device: torch.device, deterministic: bool, seed: int) -> None:
    """Seed the global generators and set the cuDNN flags for speed or determinism."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse flags, run ``main``; bad input becomes ``error: <message>`` on stderr and status 2,
    a diverged run status 3."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
