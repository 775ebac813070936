"""``python -m datasets.check``: what it prints and its exit status for each kind of folder (its ``main``
in this process; one slow test runs it as a process)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from datasets import check
from tests.scripts_helpers import REPO, script_env


def run_check(capsys, *args: str) -> tuple[int, str, str]:
    status = check.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_reports_layout_and_counts_and_warns_about_a_small_dataset(toy_root, capsys):
    status, out, _ = run_check(capsys, "--dataroot", str(toy_root), "--full", "--nthreads", "2")
    assert status == 1
    assert "layout flat+csv" in out
    assert "train: 64 classes" in out and "val: 16 classes" in out
    assert "test: 20 classes" in out
    assert "do not all have 600 images" in out
    assert out.count("all images readable") == 3


def test_reads_the_folders_layout(folders_root, capsys):
    status, out, _ = run_check(capsys, "--dataroot", str(folders_root))
    assert status == 1 and "layout folders" in out


def test_names_a_missing_root_with_status_2(tmp_path, capsys):
    status, _, err = run_check(capsys, "--dataroot", str(tmp_path / "absent"))
    assert status == 2
    assert err.strip() == f"error: {tmp_path / 'absent'}: dataset root not found (--dataroot)"


@pytest.mark.slow
def test_the_module_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datasets.check", "--dataroot", str(tmp_path / "absent")],
                            cwd=REPO, capture_output=True, text=True, env=script_env(), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'absent'}: dataset root not found (--dataroot)"
