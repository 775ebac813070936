"""Running the training scripts in a scratch folder, as a user would: as a process (``run_script``,
for the end-to-end tests marked slow) or through the script's own ``main`` in this process
(``run_main``: the same code path from the parsed flags on, without starting an interpreter); what a
file of the repository imports from it (``project_imports``)."""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from datasets.toy import generate
from models import EmbeddingNet
from utils.files import read_csv

REPO = Path(__file__).resolve().parent.parent


def project_imports(path: Path) -> list[str]:
    """Top-level names of the modules ``path`` imports that belong to the project (absolute imports)."""
    local = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [name for name in names if name.split(".")[0] in local]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the rendezvous of processes a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env(cuda: bool = False) -> dict[str, str]:
    """The environment of a script started by a test: the repository importable, one OpenMP thread,
    this interpreter's folder first on PATH, so that the shell scripts' ``python`` and ``torchrun``
    are those of the test environment (as in a user's activated virtual environment), and no GPU
    visible unless ``cuda`` (the tests' numbers and timings are the CPU's, also on a GPU machine)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
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
    """``python <repo>/<script> args...`` in ``cwd`` (a tool of a package folder as its module, ``python -m
    scripts.NAME``, as users run it); output captured as text."""
    parts = Path(script).with_suffix("").parts
    command = ["-m", ".".join(parts)] if parts[0] in ("scripts", "benchmarks", "datasets") else [str(REPO / script)]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=script_env())


def load_script(script: str) -> ModuleType:
    """A script (``onlyBasetwoLoss.py``, ``scripts/precise_bn.py``, ``benchmarks/outcome.py``, ...) loaded
    from its file, as ``python <script>`` or ``python -m scripts.NAME`` loads it (without running its
    ``__main__`` block). Tests never import a script (tests/test_layers.py): they run its ``main`` through
    this. The script's process settings (``utils.runtime``) are undone."""
    name = f"script_{Path(script).stem}"
    if name not in sys.modules:
        environ = dict(os.environ)
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: a dataclass in it looks its module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            os.environ.clear()
            os.environ.update(environ)
    return sys.modules[name]


def run_main(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``python <script> args...`` in ``cwd`` run in this process through the script's ``main`` and
    ``utils.options.run_cli`` (its exit status, one-line errors included); output captured as text."""
    from utils.options import run_cli

    module = load_script(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = run_cli(module.main, module.get_args_parser(), list(args))
            except SystemExit as exit_:  # argparse's own errors
                status = exit_.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], status, stdout.getvalue(), stderr.getvalue())


def popen_script(cwd: Path, script: str, *args: str) -> subprocess.Popen:
    """Start a script in the background with line-buffered text output on stdout (stderr merged)."""
    return subprocess.Popen([sys.executable, "-u", str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=script_env())


TIMING = ("images_per_s", "episodes_per_s")  # metrics.csv columns that measure speed, not the run


def read_metrics(path: Path, timing: bool = True) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as text; without the TIMING columns when ``timing`` is false
    (two runs that computed the same numbers differ only there)."""
    return [{key: value for key, value in row.items() if timing or key not in TIMING} for row in read_csv(path)]


def stage2_test_config(workdir: Path, **flags):
    """Stage 2's configuration for in-process tests on ``workdir`` (:func:`make_workdir`): 32 px,
    1-shot, 3 queries, 2 deformed copies from a shortlist of 3, 2 gallery images per class, CPU;
    ``flags`` (by flag name) on top."""
    from engine.options import stage2_config

    return stage2_config(torch.device("cpu"), **{
        "dataroot": str(workdir / "toy"), "tensorname": "inprocess", "network": str(workdir / "models/stage1.t7"),
        "imageSize": 32, "shots": 1, "test_num": 3, "augnum": 2, "chooseNum": 3, "galleryNum": 2, "nthreads": 0,
        "progress": 0, "device": "cpu", **flags})
