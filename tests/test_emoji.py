"""The emoji dataset (``datasets/emoji.py``): its classes and splits, determinism, and the layout the
loaders read. Needs Debian's fonts-noto-color-emoji (CI installs it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import emoji
from datasets.splits import read_split

needs_font = pytest.mark.skipif(not emoji.FONT.is_file(), reason=f"{emoji.FONT} not installed "
                                "(Debian's fonts-noto-color-emoji)")


@needs_font
def test_classes_are_fixed_disjoint_and_split_64_16_20() -> None:
    classes, distractors = emoji.class_plan()
    assert [split for split, _ in classes] == ["train"] * 64 + ["val"] * 16 + ["test"] * 20
    codepoints = [cp for _, cp in classes]
    assert len(set(codepoints)) == 100 and not set(codepoints) & set(distractors)
    assert len(distractors) >= 20
    assert all(emoji.glyph(cp) is not None for cp in codepoints + distractors)
    assert emoji.class_plan() == (classes, distractors)


@needs_font
def test_dataset_is_a_pure_function_of_the_seed_and_reads_as_a_split(tmp_path: Path) -> None:
    counts = emoji.generate(tmp_path / "a", per_class=2, size=32, seed=3)
    assert counts == {"train": 128, "val": 32, "test": 40}
    emoji.generate(tmp_path / "b", per_class=2, size=32, seed=3)
    emoji.generate(tmp_path / "c", per_class=2, size=32, seed=4)
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(names) == 200
    same = [(tmp_path / "a/images" / n).read_bytes() == (tmp_path / "b/images" / n).read_bytes() for n in names]
    other = [(tmp_path / "a/images" / n).read_bytes() == (tmp_path / "c/images" / n).read_bytes() for n in names]
    assert all(same) and not any(other)
    split = read_split(tmp_path / "a", "val")
    assert split.num_classes == 16 and split.min_class_size() == 2
    with Image.open(split.files[0][0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.asarray(image).std() > 10  # a scene, not a blank


@needs_font
def test_regenerating_smaller_removes_stale_images(tmp_path: Path) -> None:
    emoji.generate(tmp_path, per_class=2, size=24, seed=0)
    emoji.generate(tmp_path, per_class=1, size=24, seed=0)
    assert len(list((tmp_path / "images").iterdir())) == 100


def test_missing_font_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert emoji.main(["--out", str(tmp_path / "x"), "--font", str(tmp_path / "none.ttf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fonts-noto-color-emoji" in err[0] and "none.ttf" in err[0]
    assert not (tmp_path / "x").exists()


def test_a_bad_flag_is_named_in_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert emoji.main(["--out", str(tmp_path / "x"), "--perClass", "0"]) == 2
    assert capsys.readouterr().err == "error: --perClass must be >= 1, got 0\n"
    assert not (tmp_path / "x").exists()
