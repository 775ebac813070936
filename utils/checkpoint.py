"""Checkpoints written atomically and read without executing code, the original's Python 2 pickles included."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from utils.errors import CheckpointError
from utils.files import atomic_write

MODELS_DIR = Path("models")


def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through :func:`utils.files.atomic_write` (fsynced, renamed over ``path``)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: Path | str) -> Any:
    """A checkpoint loaded with ``weights_only=True``; :class:`CheckpointError` when missing, corrupt or unsafe."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    last: Exception | None = None
    for kwargs in ({}, {"encoding": "latin1"}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pickle-protocol notes; the refusal is ours to report
                return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
        except (pickle.UnpicklingError, UnicodeDecodeError) as exc:  # then retried as a Python 2 pickle
            if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
                raise CheckpointError(f"{path}: refused, the file holds Python objects other than a plain "
                                      "state dict (we never execute code from a checkpoint)") from None
            last = exc
        except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as exc:
            last = exc
            break
    raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(last).__name__}: {last})")


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A plain state dict (string keys, tensor values) from ``path``, without the ``module.`` segments that
    DataParallel and DistributedDataParallel add to keys."""
    obj = safe_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj \
            or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping from names to tensors)")
    return {".".join(part for part in k.split(".") if part != "module"): v for k, v in obj.items()}


def resolve_checkpoint(name: str, flag: str, models_dir: Path = MODELS_DIR) -> Path:
    """``name`` when it is a file, else ``models/<name>.t7``, else :class:`CheckpointError` naming ``flag``."""
    for path in (Path(name), models_dir / f"{name}.t7"):
        if path.is_file():
            return path
    listing = ", ".join(sorted(p.stem for p in models_dir.glob("*.t7"))) or "none"
    raise CheckpointError(f"{flag} {name}: no file {models_dir / (name + '.t7')} "
                          f"(available in {models_dir}/: {listing})")

