"""Device, backend and the command-line wrapper both scripts share; one-line errors with exit status 2."""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections.abc import Callable

import numpy as np
import torch

from utils.cpus import usable_cpus
from utils.errors import InputError, OptionError, TrainingDiverged
from utils.forward import DEFAULT_MEMORY_FORMAT, set_memory_format
from utils.interrupt import INTERRUPTED_EXIT, StopNow, stopped_at_once_line

_STATED_DEFAULT = re.compile(r"\(default: ([^()]*)\)")


def displayed_default(action: argparse.Action) -> str | None:
    """The one default ``--help`` shows for a flag: ``required``, the ``(default: ...)`` its help states, the
    parser's default, or None (a switch or a flag without a default)."""
    if action.required:
        return "required"
    stated = _STATED_DEFAULT.search(action.help or "")
    if stated:
        return stated.group(1)
    if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
        return None
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default))
    return str(action.default)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with one default per flag (:func:`displayed_default`), added unless the help states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, shown = action.help or "", displayed_default(action)
        if shown is None or _STATED_DEFAULT.search(text):
            return text
        return f"{text} (required)" if shown == "required" else f"{text} (default: {shown})"


# --- flags declared once (engine.options adds the engine's): each script gives its default and use ---

def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """``--device`` (read by :func:`resolve_device`)."""
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")


def add_amp_flag(parser: argparse.ArgumentParser) -> None:
    """``--amp`` 0/1 (checked by :func:`resolve_device`)."""
    parser.add_argument("--amp", type=int, default=0, choices=(0, 1),
                        help="mixed precision on CUDA: bfloat16 autocast on GPUs of compute capability 8.0+ (A100, "
                        "RTX 30xx, H100), float16 with loss scaling on older ones (V100, T4, RTX 20xx)")


def add_threads_flag(parser: argparse.ArgumentParser, default: int | None = None, at_most: int | None = None,
                     use: str = "DataLoader workers and image-decoding threads", type: Callable[[str], int] = int,
                     metavar: str | None = None) -> None:
    """``--nthreads``: ``default``, or the CPU cores this process may use (at most ``at_most``)."""
    if default is None:
        count = usable_cpus()
        default = count if at_most is None else min(at_most, count)
        use += (" (default: the CPU cores this process may use)" if at_most is None else
                f" (default: {at_most}, or the CPU cores this process may use when fewer)")
    parser.add_argument("--nthreads", type=type, default=default, metavar=metavar, help=use)


def add_seed_flag(parser: argparse.ArgumentParser, of: str = "every random draw of the run") -> None:
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {of}")


def add_runtime_flags(parser: argparse.ArgumentParser, seed_of: str) -> None:
    """Workers, device, seed, precision and CUDA kernels (read by :func:`resolve_device`, :func:`configure_backend`)."""
    add_threads_flag(parser, at_most=4)
    add_device_flag(parser)
    add_seed_flag(parser, seed_of)
    add_amp_flag(parser)
    parser.add_argument("--deterministic", type=int, default=0, choices=(0, 1),
                        help="deterministic CUDA kernels (cudnn.deterministic, no benchmark, no TF32, a fixed "
                        "cuBLAS workspace)")
    parser.add_argument("--tf32", type=int, default=1, choices=(0, 1),
                        help="TensorFloat-32 cuDNN convolutions on Ampere and later GPUs (off with --deterministic 1; "
                        "matrix products stay in full float32)")


def add_dataroot_flag(parser: argparse.ArgumentParser, default: str | None = "data/miniImageNet",
                      use: str = "dataset root: images/ plus train/val/test.csv, images/ alone (classes from "
                      "datasplit/), or <split>/<wnid>/ folders", required: bool = False) -> None:
    parser.add_argument("--dataroot", default=default, required=required, help=use)


def add_progress_flag(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--progress`` 0/1; by default (None, resolved by :func:`run_cli`) bars only when stderr is a terminal."""
    stated = " (default: 1 when stderr is a terminal, else 0)" if default is None else ""
    parser.add_argument("--progress", type=int, default=default, choices=(0, 1), help=f"show progress bars{stated}")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise OptionError(f"--{name} must be at least 1, got {getattr(args, name)}")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """``--device`` (cuda when available by default) with its index, made the current CUDA device so that
    everything without an explicit device lands on it; checks ``--amp`` too."""
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
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise OptionError(f"--device {name}: only cpu and cuda are supported")
    if args.amp and device.type != "cuda":
        raise OptionError(f"--amp 1 needs a CUDA device; --device is {device}")
    return device


def configure_backend(device: torch.device, deterministic: bool, seed: int,
                      memory_format: str = DEFAULT_MEMORY_FORMAT, tf32: bool = True) -> None:
    """Seed the global generators, set the memory format and the CUDA flags: cuDNN autotuning and (with
    ``tf32``, on Ampere and later) TF32 convolutions unless ``deterministic``; matrix products in float32."""
    set_memory_format(memory_format)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = bool(tf32 and not deterministic
                                               and tuple(torch.cuda.get_device_capability(device)) >= (8, 0))
        if deterministic:  # cuBLAS needs a fixed workspace, set before its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse flags, run ``main``; bad input becomes ``error: <message>`` on stderr and status 2,
    a diverged run status 3, a second interrupt one line and status 130."""
    args = parser.parse_args(argv)
    if getattr(args, "progress", 0) is None:  # --progress's default: bars only for a person watching
        args.progress = int(sys.stderr.isatty())
    try:
        return main(args) or 0
    except (InputError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, TrainingDiverged) else 2
    except StopNow as signal_name:
        print("\n" + stopped_at_once_line(str(signal_name)), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
