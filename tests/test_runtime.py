"""Process settings both scripts put in place before torch loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.runtime import PROCESS_ENV

REPO = Path(__file__).resolve().parent.parent


def env_after_import(module: str, preset: dict[str, str]) -> dict[str, str]:
    """The PROCESS_ENV variables as seen inside a fresh interpreter after ``import module``."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV} | preset
    code = f"import json, os, {module}; print(json.dumps({{k: os.environ.get(k) for k in {sorted(PROCESS_ENV)!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["onlyBasetwoLoss", "classification"])
def test_scripts_set_the_process_env_unless_the_user_did(module: str) -> None:
    assert env_after_import(module, {}) == PROCESS_ENV
    mine = {name: "mine" for name in PROCESS_ENV}
    assert env_after_import(module, mine) == mine
