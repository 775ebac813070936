"""pyproject.toml's dependency lists are requirements.txt's and requirements-test.txt's (the README installs
from the requirement files; the two must not drift apart); the tools run as modules, and one started as a
file says so."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts_helpers import project_imports

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parent.parent


def requirements(name: str) -> list[str]:
    """The requirement specifiers of a requirements file, comments and blank lines left out."""
    lines = (re.sub(r"#.*", "", line).strip() for line in (REPO / name).read_text().splitlines())
    return [line for line in lines if line]


def test_pyproject_lists_the_requirement_files() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirements("requirements.txt")
    assert project["optional-dependencies"]["test"] == requirements("requirements-test.txt")


TOOL_FOLDERS = ("scripts", "benchmarks", "datasets")
TOOLS = sorted(str(path.relative_to(REPO)) for folder in TOOL_FOLDERS for path in (REPO / folder).glob("*.py")
               if 'if __name__ == "__main__"' in path.read_text())


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_started_as_a_file_names_the_module_command_or_runs(tool: str, tmp_path: Path) -> None:
    """``python scripts/gpu_check.py`` cannot import the repository's packages (no ``sys.path`` edits): one
    line naming ``python -m scripts.gpu_check``, status 2, nothing written; a tool that needs none runs."""
    done = subprocess.run([sys.executable, str(REPO / tool), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    if project_imports(REPO / tool):
        module = tool.removesuffix(".py").replace("/", ".")
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines() == [f"{REPO / tool}: run it from the repository root as python -m {module}"]
        assert not any(tmp_path.iterdir())
    else:
        assert done.returncode == 0 and "usage:" in done.stdout
