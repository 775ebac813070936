"""``python -m datasets.check``: what it prints and its exit status for each kind of folder (its ``main``
in this process; one slow test runs it as a process)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import csv_rows
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


def test_full_lists_every_bad_image_of_every_split_with_status_2(writable_toy, capsys):
    train_bad = writable_toy / "images" / csv_rows(writable_toy, "train")[3][0]
    test_bad = writable_toy / "images" / csv_rows(writable_toy, "test")[-1][0]
    data = train_bad.read_bytes()
    train_bad.write_bytes(data[: len(data) // 2])
    test_good = test_bad.read_bytes()
    test_bad.write_text("not an image\n")
    status, out, err = run_check(capsys, "--dataroot", str(writable_toy), "--full", "--nthreads", "2")
    assert status == 2
    lines = (out + err).splitlines()
    assert [line for line in lines if str(train_bad) in line] == \
        [f"    {train_bad}: truncated JPEG (no end-of-image marker)"]
    assert len([line for line in lines if str(test_bad) in line]) == 1
    assert "  train: 1 unreadable or truncated image(s)" in lines
    assert "  test: 1 unreadable or truncated image(s)" in lines
    assert "  val: all images readable" in lines
    assert "--skipBadImages" not in out + err
    test_bad.write_bytes(test_good)
    # the bad train image alone still gives 2, not the later warnings' 1
    assert run_check(capsys, "--dataroot", str(writable_toy), "--full", "--nthreads", "2")[0] == 2


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
