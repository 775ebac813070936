"""The import graph keeps its layers: utils/ -> datasets/, models/ -> engine/ -> the scripts,
benchmarks/, scripts/ and tests/; nothing imports a training script (tests run a script's ``main``
through ``tests.scripts_helpers.load_script``, which loads it from its file as ``python`` does)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts_helpers import project_imports

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"classification", "onlyBasetwoLoss", "lowshot_imagenet"}
# Packages each package may import from (besides itself, the standard library and third parties).
ALLOWED = {
    "utils": set(),
    "datasets": {"utils"},
    "models": {"utils"},
    "engine": {"utils", "datasets", "models"},
}
TOP = {"utils", "datasets", "models", "engine"}  # what the top layer (scripts, benchmarks, tests) may import


def python_files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_library_imports_only_the_layers_below(package: str) -> None:
    """Each library imports the layers below it and no other; it does import every one of them, so the
    graph checked here is the one the code has (a check that saw no import would fail)."""
    allowed = ALLOWED[package] | {package}
    imported = {(path, name) for path in python_files(package) for name in project_imports(path)}
    wrong = sorted(f"{path.relative_to(REPO)} imports {name}" for path, name in imported
                   if name.split(".")[0] not in allowed)
    assert not wrong, wrong
    assert {name.split(".")[0] for _, name in imported} == allowed


@pytest.mark.parametrize("folder", ["benchmarks", "scripts", "tests", "."])
def test_nothing_imports_a_training_script(folder: str) -> None:
    paths = python_files(folder) if folder != "." else sorted(REPO.glob("*.py"))
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in paths for name in project_imports(path)
             if name.split(".")[0] in SCRIPTS]
    assert not wrong, wrong


def test_the_top_layer_imports_libraries_and_the_engine_only() -> None:
    paths = python_files("benchmarks") + python_files("scripts") + [REPO / f"{name}.py" for name in SCRIPTS]
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in paths for name in project_imports(path)
             if name.split(".")[0] not in TOP | {"benchmarks"}]
    assert not wrong, wrong


def test_every_training_script_at_the_top_is_covered() -> None:
    """A script at the repository's top (one with a ``__main__`` block) is in SCRIPTS, so the checks above
    see imports of it and its own imports."""
    scripts = {path.stem for path in REPO.glob("*.py") if "__main__" in path.read_text()}
    assert scripts == SCRIPTS
