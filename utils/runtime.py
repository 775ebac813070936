"""Process settings that torch reads when it loads: call :func:`set_process_env` before ``import torch``.

This module imports nothing heavy, so the scripts and benchmarks can call it first.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys

# Values already in the environment win, so a user can still override each one.
PROCESS_ENV = {
    # Idle OpenMP threads sleep instead of spinning, so DataLoader workers and the compute threads
    # can share a small CPU (3-8x faster on a loaded two-core machine).
    "OMP_WAIT_POLICY": "PASSIVE",
    # Large CPU tensors on transparent huge pages: a 224-px episode allocates gigabytes of fresh
    # activations, and 2 MB pages fault 512x less often than 4 kB ones (about 10-25% faster
    # training episodes on a two-core CPU). No effect where the kernel has THP disabled.
    "THP_MEM_ALLOC_ENABLE": "1",
}

# The oldest releases the code runs on, as requirements.txt states them: torch.amp.GradScaler("cuda")
# (every run, utils/forward.py) needs torch 2.3 and torch.is_autocast_enabled("cuda") 2.4;
# torchvision 0.19 is the release built for torch 2.4.
MIN_VERSIONS = {"torch": (2, 4), "torchvision": (0, 19)}


def version_problem(name: str, version: str) -> str | None:
    """One line saying why ``version`` of package ``name`` is too old for :data:`MIN_VERSIONS`, else None."""
    floor = MIN_VERSIONS[name]
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found >= floor:
        return None
    return (f"{name} {version} is installed, this code needs {name} >= {'.'.join(map(str, floor))} "
            "(pip install -r requirements.txt)")


def check_versions() -> None:
    """Exit with one line on stderr and status 2 when an installed torch or torchvision is older than
    :data:`MIN_VERSIONS` (read from the package metadata, without importing either)."""
    for name in MIN_VERSIONS:
        try:
            problem = version_problem(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            problem = f"{name} is not installed (pip install -r requirements.txt)"
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)


def set_process_env() -> None:
    """Refuse too old a torch or torchvision (:func:`check_versions`), then put :data:`PROCESS_ENV` into
    ``os.environ`` where not already set."""
    check_versions()
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
