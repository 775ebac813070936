"""pyproject.toml's dependency lists are requirements.txt's and requirements-test.txt's (the README installs
from the requirement files; the two must not drift apart)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

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
