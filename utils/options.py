"""Device, backend and the command-line wrapper both scripts share; one-line errors with exit status 2."""
from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from utils.errors import InputError, OptionError, TrainingDiverged
from utils.forward import DEFAULT_MEMORY_FORMAT, set_memory_format
from utils.interrupt import INTERRUPTED_EXIT, StopNow, stopped_at_once_line


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


def configure_backend(device: torch.device, deterministic: bool, seed: int,
                      memory_format: str = DEFAULT_MEMORY_FORMAT) -> None:
    """Seed the global generators, set the compute memory format (``--memoryFormat``) and the cuDNN
    flags for speed or determinism."""
    set_memory_format(memory_format)
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
    a diverged run status 3, a second interrupt one line and status 130."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except StopNow as signal_name:
        print("\n" + stopped_at_once_line(str(signal_name)), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
