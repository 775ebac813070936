"""Process settings the scripts put in place before torch loads."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import runtime
from utils.runtime import MIN_VERSIONS, PROCESS_ENV, check_versions, set_process_env, version_problem

REPO = Path(__file__).resolve().parent.parent
# Every entry point that loads torch: the training scripts, the benchmarks and the tools of scripts/ that do.
ENTRY_POINTS = ["classification.py", "onlyBasetwoLoss.py", "lowshot_imagenet.py", "benchmarks/episode.py",
                "benchmarks/ops.py", "benchmarks/outcome.py", "benchmarks/stage1.py", "benchmarks/study.py",
                "scripts/demo_estimate.py", "scripts/gpu_check.py", "scripts/precise_bn.py"]


def test_set_process_env_fills_in_what_the_user_did_not_set(monkeypatch) -> None:
    first, *others = sorted(PROCESS_ENV)
    for name in PROCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(first, "mine")
    set_process_env()
    assert os.environ[first] == "mine"
    assert all(os.environ[name] == PROCESS_ENV[name] for name in others)


def test_requirements_state_the_version_floor_the_code_checks() -> None:
    """requirements.txt's lower bounds for torch and torchvision are the floor check_versions enforces."""
    floors = dict(re.findall(r"^(torch|torchvision)>=([\d.]+)", (REPO / "requirements.txt").read_text(), re.M))
    assert {name: tuple(map(int, floor.split("."))) for name, floor in floors.items()} == MIN_VERSIONS


def test_the_floor_holds_the_apis_the_code_calls() -> None:
    """torch.amp.GradScaler (2.3) and torch.is_autocast_enabled("cuda") (2.4) are under the floor."""
    assert MIN_VERSIONS["torch"] >= (2, 4) and MIN_VERSIONS["torchvision"] >= (0, 19)
    assert version_problem("torch", "2.3.1+cu121") and version_problem("torchvision", "0.18.0")
    assert version_problem("torch", "2.4.0") is None and version_problem("torch", "2.10.0a0+git1234") is None


def test_too_old_a_torch_is_refused_with_one_line(monkeypatch, capsys) -> None:
    versions = {"torch": "2.1.2", "torchvision": "0.19.0"}
    monkeypatch.setattr(runtime.importlib.metadata, "version", versions.__getitem__)
    with pytest.raises(SystemExit) as stopped:
        check_versions()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "torch 2.1.2" in err and "torch >= 2.4" in err


# Run in a fresh interpreter: load an entry point's top level (not its __main__ block) as users start it (a
# script at the top as a file, a tool of a package as a module) and stop at the first import of anything
# besides the standard library, utils.runtime and the tool itself with its (empty) package, printing that
# module's name and the PROCESS_ENV variables at that moment. Prints nothing if there is no such import.
FIRST_IMPORT = """
import json, os, runpy, sys

class FirstImport:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in sys.stdlib_module_names or name in ("utils", "utils.runtime", PACKAGE, MODULE):
            return None
        print(json.dumps({"module": name, "env": {key: os.environ.get(key) for key in KEYS}}), flush=True)
        os._exit(0)

sys.meta_path.insert(0, FirstImport())
if PACKAGE:
    runpy.run_module(MODULE, run_name="entry_point")
else:
    runpy.run_path(SCRIPT, run_name="entry_point")
"""


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_each_entry_point_sets_the_process_env_before_anything_else_loads(script: str) -> None:
    """When an entry point first imports anything besides the standard library and utils.runtime (torch,
    numpy, the project's packages), PROCESS_ENV is already in the environment, so torch reads it when it
    loads."""
    env = {key: value for key, value in os.environ.items() if key not in PROCESS_ENV}
    package, module = str(Path(script).parent).strip("."), script.removesuffix(".py").replace("/", ".")
    code = (f"KEYS = {sorted(PROCESS_ENV)!r}\nSCRIPT = {str(REPO / script)!r}\nPACKAGE = {package!r}\n"
            f"MODULE = {module!r}\n{FIRST_IMPORT}")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
    first = json.loads(out.stdout.strip().splitlines()[-1])
    assert first["env"] == PROCESS_ENV, first


def env_after_import(module: str, preset: dict[str, str]) -> dict[str, str]:
    """The PROCESS_ENV variables as seen inside a fresh interpreter after ``import module``."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV} | preset
    code = f"import json, os, {module}; print(json.dumps({{k: os.environ.get(k) for k in {sorted(PROCESS_ENV)!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("module", ["onlyBasetwoLoss", "classification", "lowshot_imagenet"])
def test_scripts_set_the_process_env_unless_the_user_did(module: str) -> None:
    assert env_after_import(module, {}) == PROCESS_ENV
    mine = {name: "mine" for name in PROCESS_ENV}
    assert env_after_import(module, mine) == mine
