"""Running the two training scripts in a scratch folder, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"  # tiny images: one thread is fastest, and several tests may share the CPU
    return env


def run_script(cwd: Path, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <repo>/<script> args...`` in ``cwd``; output captured as text."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=script_env())


def popen_script(cwd: Path, script: str, *args: str) -> subprocess.Popen:
    """Start a script in the background with line-buffered text output on stdout (stderr merged)."""
    return subprocess.Popen([sys.executable, "-u", str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=script_env())
