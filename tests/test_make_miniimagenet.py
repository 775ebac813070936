"""Tests for scripts/make_miniimagenet.py on a tiny fake ILSVRC-2012 tree."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.scripts_helpers import load_script

REPO = Path(__file__).resolve().parents[1]

mm = load_script("scripts/make_miniimagenet.py")

PHOTO_SIZE = (40, 30)  # non-square, so --size is visible

# wnid -> {photo number n: (mode, colour, PIL format)}; numbers are chosen so
# that numeric and lexicographic orders of <wnid>_<n>.JPEG differ.
PHOTOS: dict[str, dict[int, tuple[str, object, str]]] = {
    "n01532829": {
        100: ("RGB", (250, 10, 10), "JPEG"),
        2: ("RGB", (10, 250, 10), "JPEG"),
        33: ("RGB", (10, 10, 250), "JPEG"),
        10: ("RGB", (250, 250, 10), "JPEG"),
    },
    "n01558993": {
        12: ("L", 200, "JPEG"),  # greyscale JPEG
        5: ("RGB", (250, 10, 250), "PNG"),  # PNG data named .JPEG
        1: ("CMYK", (0, 200, 200, 0), "JPEG"),  # CMYK JPEG
    },
    "n01704323": {
        700: ("RGB", (10, 250, 250), "JPEG"),
        7: ("RGB", (120, 60, 10), "JPEG"),
        70: ("RGB", (60, 10, 120), "JPEG"),
    },
}
SPLIT_CLASSES = {"train": "n01532829", "val": "n01558993", "test": "n01704323"}


def expected_rgb(wnid: str, position: int) -> tuple[int, int, int]:
    """RGB colour of the photo at 1-based numeric position in a class."""
    number = sorted(PHOTOS[wnid])[position - 1]
    mode, colour, _ = PHOTOS[wnid][number]
    return Image.new(mode, (1, 1), colour).convert("RGB").getpixel((0, 0))


def target(wnid: str, position: int) -> str:
    return f"{wnid}{position:08d}.jpg"


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "filename,label") -> None:
    path.write_text(header + "\n" + "".join(f"{name},{label}\n" for name, label in rows))


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """Fake ILSVRC train folder, split CSVs and an output path."""
    train = tmp_path / "train"
    for wnid, photos in PHOTOS.items():
        (train / wnid).mkdir(parents=True)
        for number, (mode, colour, fmt) in photos.items():
            Image.new(mode, PHOTO_SIZE, colour).save(train / wnid / f"{wnid}_{number}.JPEG", fmt)
    (train / "n01532829" / "notes.txt").write_text("not a photo")
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, wnid in SPLIT_CLASSES.items():
        write_csv(splits / f"{split}.csv",
                  [(target(wnid, p), wnid) for p in range(1, len(PHOTOS[wnid]) + 1)])
    return {"train": train, "splits": splits, "out": tmp_path / "out"}


def command(tree: dict[str, Path], *extra: str) -> list[str]:
    return ["--imagenet", str(tree["train"]), "--splits", str(tree["splits"]), "--out", str(tree["out"]),
            "--nthreads", "2", *extra]


def run(tree: dict[str, Path], *extra: str) -> subprocess.CompletedProcess:
    """The script's ``main`` in this process; its exit status and output as a process would give them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = mm.main(command(tree, *extra))
    return subprocess.CompletedProcess(command(tree, *extra), status, stdout.getvalue(), stderr.getvalue())


def mean_rgb(path: Path) -> tuple[float, ...]:
    with Image.open(path) as image:
        return tuple(ImageStat.Stat(image.convert("RGB")).mean)


def assert_colour(path: Path, wnid: str, position: int) -> None:
    got, want = mean_rgb(path), expected_rgb(wnid, position)
    assert all(abs(g - w) <= 12 for g, w in zip(got, want)), (path.name, got, want)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_parse_target() -> None:
    assert mm.parse_target("n0153282900000005.jpg") == ("n01532829", 5)
    for bad in ("n01532829_5.jpg", "n015328290000005.jpg", "n0153282900000000.jpg",
                "n0153282900000005.JPEG", "../x00000001.jpg"):
        assert mm.parse_target(bad) is None


def test_position_index_sorts_numerically(tree: dict[str, Path]) -> None:
    photos = mm.position_index(tree["train"], "n01532829")
    assert [p.name for p in photos] == [f"n01532829_{n}.JPEG" for n in (2, 10, 33, 100)]
    assert mm.position_index(tree["train"], "n09999999") is None


def test_build_follows_naming_rule(tree: dict[str, Path]) -> None:
    result = run(tree)
    assert result.returncode == 0, result.stderr
    images = tree["out"] / "images"
    expected = {target(w, p) for w in PHOTOS for p in range(1, len(PHOTOS[w]) + 1)}
    assert {p.name for p in images.iterdir()} == expected  # no temp files left
    for wnid, photos in PHOTOS.items():
        for position, number in enumerate(sorted(photos), start=1):
            out = images / target(wnid, position)
            with Image.open(out) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", PHOTO_SIZE)
            assert_colour(out, wnid, position)
            source = tree["train"] / wnid / f"{wnid}_{number}.JPEG"
            mode, _, fmt = photos[number]
            if (mode, fmt) == ("RGB", "JPEG"):  # RGB JPEGs are copied unchanged
                assert out.read_bytes() == source.read_bytes()
    for split in SPLIT_CLASSES:
        assert (tree["out"] / f"{split}.csv").read_bytes() == \
            (tree["splits"] / f"{split}.csv").read_bytes()
    assert "warning: train.csv has 1 classes" in result.stderr


def test_size_resizes_every_image(tree: dict[str, Path]) -> None:
    result = run(tree, "--size", "16")
    assert result.returncode == 0, result.stderr
    outputs = list((tree["out"] / "images").iterdir())
    assert len(outputs) == 10
    for out in outputs:
        with Image.open(out) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (16, 16))
    assert_colour(tree["out"] / "images" / target("n01558993", 1), "n01558993", 1)


def test_rerun_skips_existing_outputs(tree: dict[str, Path]) -> None:
    assert run(tree).returncode == 0
    images = tree["out"] / "images"
    kept, removed = images / target("n01532829", 1), images / target("n01704323", 3)
    kept.write_bytes(b"sentinel")
    removed.unlink()
    result = run(tree)
    assert result.returncode == 0, result.stderr
    assert kept.read_bytes() == b"sentinel"
    assert_colour(removed, "n01704323", 3)
    assert "1 written, 9 already present" in result.stdout


def test_missing_position_and_class_reported(tree: dict[str, Path]) -> None:
    write_csv(tree["splits"] / "train.csv",
              [(target("n01532829", 1), "n01532829"), (target("n01532829", 5), "n01532829"),
               (target("n09999999", 1), "n09999999"), (target("n01704323", 1), "n01532829")])
    result = run(tree)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    position = [line for line in lines if "position beyond" in line]
    assert len(position) == 1 and "1 row(s)" in position[0]
    assert target("n01532829", 5) in position[0] and "class has 4" in position[0]
    assert any("class folder absent" in line and "n0999999900000001.jpg" in line for line in lines)
    assert any("does not start with its label" in line for line in lines)
    assert (tree["out"] / "images" / target("n01532829", 1)).is_file()
    assert (tree["out"] / "images" / target("n01558993", 3)).is_file()


def test_missing_column_exits_2(tree: dict[str, Path]) -> None:
    write_csv(tree["splits"] / "val.csv", [("n0155899300000001.jpg", "x")], header="file,class")
    result = run(tree)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "val.csv" in errors[0] and "filename,label" in errors[0]
    assert not (tree["out"] / "images").exists()


def test_missing_csv_exits_2(tree: dict[str, Path]) -> None:
    (tree["splits"] / "test.csv").unlink()
    result = run(tree)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "test.csv" in errors[0]


@pytest.mark.parametrize("key,flag", [("train", "--imagenet"), ("splits", "--splits")])
def test_missing_dir_exits_2(tree: dict[str, Path], key: str, flag: str) -> None:
    tree[key] = tree[key].with_name("absent")
    result = run(tree)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and flag in errors[0] and "absent" in errors[0]


@pytest.mark.slow
def test_the_script_runs_as_a_command(tree: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "scripts.make_miniimagenet", *command(tree)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "images: 10 listed, 10 present" in result.stdout
    assert "csv: copied train.csv, val.csv, test.csv" in result.stdout
