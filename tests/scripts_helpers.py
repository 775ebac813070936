"""Running the two training scripts in a scratch folder, as a user would."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from datasets.toy import generate
from models import EmbeddingNet

REPO = Path(__file__).resolve().parent.parent


def script_env(cuda: bool = False) -> dict[str, str]:
    """The environment of a script run by a test: the repository importable, one CPU thread, and no
    GPU visible unless ``cuda`` (the tests' numbers and timings are the CPU's, also on a GPU machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"  # tiny images: one thread is fastest, and several tests may share the CPU
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def make_workdir(root: Path) -> Path:
    """A scratch folder with a small toy dataset (``toy/``) and a random stage-1 checkpoint
    (``models/stage1.t7``), as a user would have after stage 1."""
    generate(root / "toy", per_class=6, size=36, seed=0)
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(EmbeddingNet(64).state_dict(), root / "models/stage1.t7")
    return root


def run_script(cwd: Path, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <repo>/<script> args...`` in ``cwd``; output captured as text."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=script_env())


def popen_script(cwd: Path, script: str, *args: str) -> subprocess.Popen:
    """Start a script in the background with line-buffered text output on stdout (stderr merged)."""
    return subprocess.Popen([sys.executable, "-u", str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=script_env())


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as text."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
