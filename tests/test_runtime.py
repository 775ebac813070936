"""Process settings the scripts put in place before torch loads."""
from __future__ import annotations

import ast
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import runtime
from utils.runtime import MIN_VERSIONS, PROCESS_ENV, check_versions, set_process_env, version_problem

REPO = Path(__file__).resolve().parent.parent
# Every entry point that imports torch: the training scripts, the benchmarks and the demo's estimate.
ENTRY_POINTS = ["classification.py", "onlyBasetwoLoss.py", "lowshot_imagenet.py", "benchmarks/episode.py",
                "benchmarks/stage1.py", "scripts/demo_estimate.py"]


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


def first_imports_before_the_call(path: Path) -> list[str]:
    """The modules ``path`` imports at its top level before it calls ``set_process_env()``
    (all of them if it never calls it)."""
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "id", None) == "set_process_env":
            return names
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names + ["(set_process_env is never called)"]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_each_entry_point_sets_the_process_env_before_any_other_import(script: str) -> None:
    """Only the standard library and utils.runtime (which imports nothing heavy) come before the call,
    so torch reads the settings when it loads."""
    before = first_imports_before_the_call(REPO / script)
    others = [name for name in before if name != "utils.runtime" and name.split(".")[0] not in sys.stdlib_module_names]
    assert not others and "utils.runtime" in before, before


def test_the_check_sees_a_late_call(tmp_path: Path) -> None:
    late = tmp_path / "late.py"
    late.write_text("from utils.runtime import set_process_env\nimport torch\nset_process_env()\n")
    assert first_imports_before_the_call(late) == ["utils.runtime", "torch"]


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
