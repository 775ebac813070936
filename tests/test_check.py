"""``python -m datasets.check``: what it prints and its exit status for each kind of folder."""
from __future__ import annotations

import subprocess
import sys

from tests.scripts_helpers import REPO, script_env


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datasets.check", *args], cwd=REPO, capture_output=True, text=True,
                          env=script_env(), timeout=300)


def test_reports_layout_and_counts_and_warns_about_a_small_dataset(toy_root):
    result = check("--dataroot", str(toy_root), "--full")
    assert result.returncode == 1, result.stderr
    assert "layout flat+csv" in result.stdout
    assert "train: 64 classes" in result.stdout and "val: 16 classes" in result.stdout
    assert "test: 20 classes" in result.stdout
    assert "do not all have 600 images" in result.stdout
    assert result.stdout.count("all images readable") == 3


def test_reads_the_folders_layout(folders_root):
    result = check("--dataroot", str(folders_root))
    assert result.returncode == 1 and "layout folders" in result.stdout


def test_names_a_missing_root_with_status_2(tmp_path):
    result = check("--dataroot", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'absent'}: dataset root not found (--dataroot)"
