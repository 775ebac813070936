"""Image decoding, the pre-run scan for bad files, and the transforms of docs/original.md §2.2."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOY_SIZE, csv_rows
from datasets.images import image_problem, load_rgb, scan_split
from datasets.splits import Split
from datasets.transforms import eval_crop, normalize_uint8, resize_size, train_transform
from utils.errors import DataError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture
def files(toy_root: Path, tmp_path: Path) -> dict[str, Path]:
    """A few good images plus damaged ones, in a writable folder."""
    names = [name for name, _ in csv_rows(toy_root, "train")[:4]]
    good = []
    for name in names:
        shutil.copyfile(toy_root / "images" / name, tmp_path / name)
        good.append(tmp_path / name)
    data = good[0].read_bytes()
    truncated = tmp_path / "n0000000100000001.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "n0000000100000002.jpg"
    text.write_text("this is not an image\n")
    empty = tmp_path / "n0000000100000003.jpg"
    empty.write_bytes(b"")
    png = tmp_path / "grey.png"
    Image.new("L", (30, 20), 128).save(png)
    return {"good0": good[0], "good1": good[1], "good2": good[2], "good3": good[3], "truncated": truncated,
            "text": text, "empty": empty, "png": png, "missing": tmp_path / "n0000000100000009.jpg"}


# ---------------------------------------------------------------- load_rgb / image_problem


def test_load_rgb_decodes_good_images_as_rgb(files: dict[str, Path]) -> None:
    image = load_rgb(files["good0"])
    assert image.mode == "RGB"
    assert image.size == (TOY_SIZE, TOY_SIZE)
    grey = load_rgb(files["png"])
    assert grey.mode == "RGB" and grey.size == (30, 20)
    assert np.asarray(grey)[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing"])
def test_load_rgb_raises_data_error_naming_file(files: dict[str, Path], kind: str) -> None:
    with pytest.raises(DataError, match=re.escape(str(files[kind]))):
        load_rgb(files[kind])


def test_image_problem_accepts_good_images(files: dict[str, Path]) -> None:
    for key in ("good0", "good1", "png"):
        assert image_problem(files[key]) is None


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing"])
def test_image_problem_reports_bad_files(files: dict[str, Path], kind: str) -> None:
    problem = image_problem(files[kind])
    assert isinstance(problem, str) and problem


def test_image_problem_names_truncation(files: dict[str, Path]) -> None:
    assert "truncated" in image_problem(files["truncated"]).lower()


def _split(files: dict[str, Path], *groups: tuple[str, ...]) -> Split:
    return Split("train", tuple(f"n{i:08d}" for i in range(len(groups))),
                 tuple(tuple(files[k] for k in group) for group in groups), "flat")


def test_scan_split_passes_clean_split(files: dict[str, Path]) -> None:
    split = _split(files, ("good0", "good1"), ("good2", "good3"))
    scanned, dropped = scan_split(split, workers=2)
    assert dropped == 0
    assert scanned.files == split.files


def test_scan_split_raises_naming_bad_file(files: dict[str, Path]) -> None:
    split = _split(files, ("good0", "truncated"), ("good2", "good3"))
    with pytest.raises(DataError, match=re.escape(str(files["truncated"]))) as info:
        scan_split(split, workers=2)
    assert "--skipBadImages" in str(info.value)
    split = _split(files, ("good0", "good1"), ("text", "good3"))
    with pytest.raises(DataError, match=re.escape(str(files["text"]))):
        scan_split(split, workers=2)


def test_scan_split_skips_bad_files_and_counts_them(files: dict[str, Path]) -> None:
    split = _split(files, ("good0", "truncated", "good1"), ("text", "good2", "empty", "good3"))
    scanned, dropped = scan_split(split, skip_bad=True, workers=2)
    assert dropped == 3
    assert scanned.classes == split.classes
    assert scanned.files == ((files["good0"], files["good1"]), (files["good2"], files["good3"]))
    assert scanned.name == split.name and scanned.layout == split.layout


def test_scan_split_raises_when_a_class_loses_every_image(files: dict[str, Path]) -> None:
    split = _split(files, ("good0", "good1"), ("truncated", "text"))
    with pytest.raises(DataError, match=re.escape(split.classes[1])):
        scan_split(split, skip_bad=True, workers=2)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("size,expected", [(32, 37), (48, 55), (84, 96), (224, 256)])
def test_resize_size_is_round_s_256_over_224(size: int, expected: int) -> None:
    # expected values worked out by hand: 32*256/224 = 36.57, 48*256/224 = 54.86, 84*256/224 = 96.
    assert resize_size(size) == expected


def _manual_eval_crop(image: Image.Image, size: int, shorter: int) -> torch.Tensor:
    """Resize the shorter side to ``shorter`` (bilinear, PIL) and take the centre ``size`` crop."""
    w, h = image.size
    if w <= h:
        new = (shorter, int(shorter * h / w))
    else:
        new = (int(shorter * w / h), shorter)
    resized = image.resize(new, Image.BILINEAR)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    crop = resized.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)


def _rect_image(width: int = 70, height: int = 50) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [32, 48, 84, 224])
def test_eval_crop_and_normalisation_shape_and_values(size: int) -> None:
    image = _rect_image()
    crop = eval_crop(size)(image)
    assert crop.dtype == torch.uint8
    assert crop.shape == (3, size, size)
    # Resize to round(S*256/224) then centre-crop S, done by hand with PIL.
    shorter = round(size * 256 / 224)
    assert torch.equal(crop, _manual_eval_crop(image, size, shorter))
    out = normalize_uint8(crop)
    assert out.dtype == torch.float32
    assert out.shape == (3, size, size)
    expected = (crop.float() / 255 - MEAN) / STD
    assert torch.allclose(out, expected, atol=1e-5)


def test_eval_crop_uses_the_resize_then_crop_rule() -> None:
    # A 256 px square image with a 16 px black border: Resize(256) leaves it as it is, and
    # CenterCrop(224) removes exactly 16 px on every side, so the border must vanish.
    image = Image.new("RGB", (256, 256), (0, 0, 0))
    image.paste((255, 255, 255), (16, 16, 240, 240))
    crop = eval_crop(224)(image)
    assert int(crop.min()) == 255  # only the white inner square survives


@pytest.mark.parametrize("size", [32, 48, 84])
def test_train_transform_shape(size: int) -> None:
    image = _rect_image()
    torch.manual_seed(0)
    out = train_transform(size)(image)
    assert out.dtype == torch.uint8  # normalised on the device (datasets.softrandom.blend_batch)
    assert out.shape == (3, size, size)
    assert int(out.max()) > int(out.min())  # a crop of the picture, not a constant


def test_train_transform_is_random_but_seedable() -> None:
    image = _rect_image()
    transform = train_transform(32)
    torch.manual_seed(1)
    a = transform(image)
    torch.manual_seed(1)
    b = transform(image)
    torch.manual_seed(2)
    c = transform(image)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
