"""Tests for scripts/fold_imagenet_val.py on a tiny flat validation folder.

The script never opens an image, so the images are small files holding their own name
(what a move or link must carry along), named like the real ones.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.scripts_helpers import load_script

REPO = Path(__file__).resolve().parents[1]

fold = load_script("scripts/fold_imagenet_val.py")

# Image k's class, interleaved as in the real set: 3 classes of 3, 2 and 3 images.
CLASSES = ["n01440764", "n01443537", "n01484850", "n01440764", "n01484850",
           "n01443537", "n01440764", "n01484850"]
LABELS = {f"ILSVRC2012_val_{k:08d}.JPEG": wnid for k, wnid in enumerate(CLASSES, start=1)}
ILSVRC_IDS = {"n01440764": 449, "n01443537": 450, "n01484850": 442}  # the devkit's class numbers


def write_text_labels(path: Path, labels: dict[str, str]) -> Path:
    path.write_text("".join(f"{name} {wnid}\n" for name, wnid in labels.items()))
    return path


def write_csv_labels(path: Path, labels: dict[str, str]) -> Path:
    path.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(name).stem},{wnid} 12 34 200 180 {wnid} 5 6 70 80 \n" for name, wnid in labels.items()))
    return path


def write_devkit(root: Path, meta: bytes) -> Path:
    """An ``ILSVRC2012_devkit_t12/`` folder with the ground truth of LABELS and ``meta``."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ILSVRC_IDS[wnid]}\n" for wnid in LABELS.values()))
    (data / "meta.mat").write_bytes(meta)
    return data.parent


@pytest.fixture
def val(tmp_path: Path) -> Path:
    folder = tmp_path / "val"
    folder.mkdir()
    for name in LABELS:
        (folder / name).write_text(name)
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    status = fold.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_folded(root: Path) -> None:
    for name, wnid in LABELS.items():
        assert (root / wnid / name).read_text() == name


@pytest.mark.parametrize("write", [write_text_labels, write_csv_labels], ids=["text", "csv"])
def test_fold_in_place(val: Path, tmp_path: Path, capsys, write: Callable) -> None:
    labels = write(tmp_path / "labels.txt", LABELS)
    status, out, _ = run(capsys, "--val", val, "--labels", labels)
    assert status == 0
    assert_folded(val)
    assert sorted(p.name for p in val.iterdir()) == sorted(set(CLASSES))  # nothing left flat
    assert "note: not the 1000 classes x 50 images" in out
    assert "done: moved 8 images, 0 were already in place; 3 classes, 8 images, 2-3 images per class" in out


def test_link_to_out_keeps_originals(val: Path, tmp_path: Path, capsys) -> None:
    labels = write_text_labels(tmp_path / "labels.txt", LABELS)
    before = snapshot(val)
    status, out, _ = run(capsys, "--val", val, "--labels", labels, "--out", tmp_path / "out", "--link")
    assert status == 0
    assert snapshot(val) == before
    assert_folded(tmp_path / "out")
    for name, wnid in LABELS.items():
        assert (tmp_path / "out" / wnid / name).stat().st_ino == (val / name).stat().st_ino
    assert "done: linked 8 images, 0 were" in out


def test_link_falls_back_to_symlinks(val: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_hard_links(*_args, **_kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    labels = write_text_labels(tmp_path / "labels.txt", LABELS)
    status, out, _ = run(capsys, "--val", val, "--labels", labels, "--out", tmp_path / "out", "--link")
    assert status == 0
    assert_folded(tmp_path / "out")
    assert all((tmp_path / "out" / wnid / name).is_symlink() for name, wnid in LABELS.items())
    assert "linked 8 images (8 as symbolic links)" in out


def test_dry_run_changes_nothing(val: Path, tmp_path: Path, capsys) -> None:
    labels = write_text_labels(tmp_path / "labels.txt", LABELS)
    before = snapshot(tmp_path)
    status, out, _ = run(capsys, "--val", val, "--labels", labels, "--dryRun")
    assert status == 0
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    move = f"would move {val / 'ILSVRC2012_val_00000002.JPEG'} -> {val / 'n01443537/ILSVRC2012_val_00000002.JPEG'}"
    assert move in out
    assert sum(line.startswith("would move") for line in out.splitlines()) == 8
    assert "nothing changed" in out


@pytest.mark.parametrize("extra", [(), ("--link",)], ids=["move", "link"])
def test_rerun_is_a_noop(val: Path, tmp_path: Path, capsys, extra: tuple[str, ...]) -> None:
    labels = write_csv_labels(tmp_path / "labels.csv", LABELS)
    args = ("--val", val, "--labels", labels, "--out", tmp_path / "out", *extra)
    assert run(capsys, *args)[0] == 0
    before = snapshot(tmp_path)
    status, out, _ = run(capsys, *args)
    assert status == 0 and snapshot(tmp_path) == before
    assert "nothing to do: every image is already in its class folder" in out


def test_resume_after_partial_move(val: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    labels = write_text_labels(tmp_path / "labels.txt", LABELS)
    rename, calls = os.rename, []

    def fail_third(source, target):
        calls.append(source)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", fail_third)
        status, _, err = run(capsys, "--val", val, "--labels", labels)
    assert status == 1
    assert "No space left on device" in err and "2 of 8 done, run the same command again to finish" in err
    status, out, _ = run(capsys, "--val", val, "--labels", labels)
    assert status == 0
    assert_folded(val)
    assert "moved 6 images, 2 were already in place" in out


def test_devkit_with_meta_mat(val: Path, tmp_path: Path, capsys) -> None:
    """Form (a) read end to end: a meta.mat written by scipy, as a folder and as a .tar.gz. scipy is a
    test requirement (requirements-test.txt), so this runs wherever the suite is installed as the
    README says."""
    import scipy.io as scipy_io
    synsets = np.array([(449, "n01440764", 0), (1001, "n00001740", 2), (450, "n01443537", 0),
                        (442, "n01484850", 0)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": synsets.reshape(-1, 1)})
    devkit = write_devkit(tmp_path / "kit", meta.getvalue())
    archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(devkit, arcname=devkit.name)

    status, out, _ = run(capsys, "--val", val, "--devkit", archive, "--out", tmp_path / "out", "--link")
    assert status == 0, out
    assert_folded(tmp_path / "out")
    assert run(capsys, "--val", val, "--devkit", devkit)[0] == 0
    assert_folded(val)

    (devkit / "data/ILSVRC2012_validation_ground_truth.txt").write_text("449\n1001\n")
    status, _, err = run(capsys, "--val", tmp_path / "out", "--devkit", devkit)
    assert status == 2 and "line 2: ILSVRC2012_ID 1001 is not a leaf class" in err


def drop_label(root: Path) -> tuple[tuple, tuple[str, ...]]:
    labels = dict(LABELS)
    del labels["ILSVRC2012_val_00000005.JPEG"], labels["ILSVRC2012_val_00000006.JPEG"]
    return ("--labels", write_text_labels(root / "labels.txt", labels)), \
        ("val/ILSVRC2012_val_00000005.JPEG: no label in", "labels.txt", "(and 1 more images without a label)")


def drop_image(root: Path) -> tuple[tuple, tuple[str, ...]]:
    (root / "val/ILSVRC2012_val_00000003.JPEG").unlink()
    return ("--labels", write_csv_labels(root / "labels.csv", LABELS)), \
        ("labels.csv: labels ILSVRC2012_val_00000003.JPEG, which is neither in",)


def short_line(root: Path) -> tuple[tuple, tuple[str, ...]]:
    path = write_text_labels(root / "labels.txt", LABELS)
    lines = path.read_text().splitlines()
    lines[3] = "ILSVRC2012_val_00000004.JPEG"
    path.write_text("\n".join(lines) + "\n")
    return ("--labels", path), ("labels.txt: line 4: expected 'filename wnid'",)


def bad_wnid(root: Path) -> tuple[tuple, tuple[str, ...]]:
    path = write_csv_labels(root / "labels.csv", {**LABELS, "ILSVRC2012_val_00000002.JPEG": "x01443537"})
    return ("--labels", path), ("labels.csv: line 3: 'x01443537' is not a wnid",)


def empty_prediction(root: Path) -> tuple[tuple, tuple[str, ...]]:
    path = write_csv_labels(root / "labels.csv", LABELS)
    path.write_text(path.read_text() + "ILSVRC2012_val_00000009,\n")
    return ("--labels", path), ("labels.csv: line 10: expected 2 columns with a non-empty PredictionString",)


def twice(root: Path) -> tuple[tuple, tuple[str, ...]]:
    path = write_text_labels(root / "labels.txt", LABELS)
    path.write_text(path.read_text() + "ILSVRC2012_val_00000001.JPEG n01443537\n")
    return ("--labels", path), ("labels.txt: line 9: ILSVRC2012_val_00000001.JPEG is labelled a second time",)


def wrong_folder(root: Path) -> tuple[tuple, tuple[str, ...]]:
    (root / "val/n01443537").mkdir()
    (root / "val/ILSVRC2012_val_00000001.JPEG").rename(root / "val/n01443537/ILSVRC2012_val_00000001.JPEG")
    return ("--labels", write_text_labels(root / "labels.txt", LABELS)), \
        ("n01443537/ILSVRC2012_val_00000001.JPEG: in the wrong class folder", "labels it n01440764")


def no_val(root: Path) -> tuple[tuple, tuple[str, ...]]:
    return ("--val", root / "absent", "--labels", write_text_labels(root / "labels.txt", LABELS)), \
        ("--val", "absent: no such directory")


def no_labels_file(root: Path) -> tuple[tuple, tuple[str, ...]]:
    return ("--labels", root / "absent.txt"), ("--labels", "absent.txt: cannot read")


def link_without_out(root: Path) -> tuple[tuple, tuple[str, ...]]:
    return ("--labels", write_text_labels(root / "labels.txt", LABELS), "--link"), ("--link needs --out",)


def devkit_bad_line(root: Path) -> tuple[tuple, tuple[str, ...]]:
    devkit = write_devkit(root, b"never read")
    (devkit / "data/ILSVRC2012_validation_ground_truth.txt").write_text("449\n44 9\n450\n")
    return ("--devkit", devkit), ("ILSVRC2012_validation_ground_truth.txt line 2: expected one ILSVRC2012_ID",)


def devkit_no_meta(root: Path) -> tuple[tuple, tuple[str, ...]]:
    devkit = write_devkit(root, b"")
    (devkit / "data/meta.mat").unlink()
    return ("--devkit", devkit), ("ILSVRC2012_devkit_t12: no data/meta.mat",)


BAD_INPUTS = [drop_label, drop_image, short_line, bad_wnid, empty_prediction, twice, wrong_folder, no_val,
              no_labels_file, link_without_out, devkit_bad_line, devkit_no_meta]


@pytest.mark.parametrize("damage", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_exits_2_and_moves_nothing(val: Path, tmp_path: Path, capsys, damage: Callable) -> None:
    args, expected = damage(tmp_path)
    args = args if "--val" in args else ("--val", val, *args)
    before = snapshot(tmp_path)
    status, out, err = run(capsys, *args)
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(text in err for text in expected), err
    assert snapshot(tmp_path) == before and not out


def test_devkit_without_scipy_says_what_to_do(val: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    for name in ("scipy", "scipy.io", "scipy.io.matlab"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if scipy were absent
    devkit = write_devkit(tmp_path, b"never read")
    before = snapshot(tmp_path)
    status, _, err = run(capsys, "--val", val, "--devkit", devkit)
    assert status == 2 and snapshot(tmp_path) == before
    assert err.count("\n") == 1 and "pip install scipy" in err and "--labels" in err


def test_a_missing_val_folder_is_one_line_and_status_2(tmp_path: Path, capsys) -> None:
    status, out, err = run(capsys, "--val", tmp_path / "absent", "--labels", "x.txt")
    assert status == 2 and not out
    assert err.splitlines() == [f"error: --val {tmp_path / 'absent'}: no such directory"]


@pytest.mark.slow
def test_command_line_exit_status(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "scripts.fold_imagenet_val", "--val", str(tmp_path / "absent"),
                             "--labels", "x.txt"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --val {tmp_path / 'absent'}: no such directory"]
