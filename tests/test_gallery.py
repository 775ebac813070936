"""The in-memory gallery of base-class images (docs/original.md §4.3)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from torchvision import transforms as T

import datasets.gallery
import datasets.images
from datasets.gallery import Gallery, gallery_files
from datasets.splits import Split
from utils.errors import DataError

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_crop(path: Path, size: int) -> PIL.Image.Image:
    """The evaluation crop of docs/original.md §2.2 with torchvision's PIL transforms: Resize(round(S*256/224)),
    CenterCrop(S)."""
    with PIL.Image.open(path) as image:
        image = image.convert("RGB")
    return T.CenterCrop(size)(T.Resize(round(size * 256 / 224))(image))


@pytest.fixture(scope="module")
def small_split(train_split, tmp_path_factory: pytest.TempPathFactory) -> Split:
    """Five train classes with their files copied to a private folder."""
    folder = tmp_path_factory.mktemp("gallery_files")
    files = []
    for class_files in train_split.files[:5]:
        copied = []
        for path in class_files:
            shutil.copyfile(path, folder / path.name)
            copied.append(folder / path.name)
        files.append(tuple(copied))
    return Split("train", train_split.classes[:5], tuple(files), "flat+csv")


def test_gallery_files_draws_gallery_num_per_class(train_split) -> None:
    chosen = gallery_files(train_split, 4)
    assert len(chosen) == 4 * train_split.num_classes
    labels = [label for label, _ in chosen]
    # class by class
    assert labels == [c for c in range(train_split.num_classes) for _ in range(4)]
    for c in range(train_split.num_classes):
        paths = [p for label, p in chosen if label == c]
        assert len(set(paths)) == 4  # without replacement
        assert all(p in train_split.files[c] for p in paths)


def test_gallery_files_reproducible_from_seed(train_split) -> None:
    assert gallery_files(train_split, 5) == gallery_files(train_split, 5)
    # docs/original.md §4.3: the gallery is drawn with numpy seed 2019
    assert gallery_files(train_split, 5) == gallery_files(train_split, 5, seed=2019)
    assert gallery_files(train_split, 5, seed=1) == gallery_files(train_split, 5, seed=1)
    assert gallery_files(train_split, 5, seed=1) != gallery_files(train_split, 5)


def test_gallery_num_larger_than_class_raises(small_split) -> None:
    with pytest.raises(DataError) as info:
        gallery_files(small_split, 13)
    assert "--galleryNum" in str(info.value)
    assert small_split.classes[0] in str(info.value)
    with pytest.raises(DataError, match="--galleryNum"):
        Gallery(small_split, 13, SIZE, progress=False)
    assert len(gallery_files(small_split, 12)) == 60  # a whole class is fine


def test_gallery_images_are_uint8_eval_crops(small_split) -> None:
    gallery = Gallery(small_split, 3, SIZE, workers=2, progress=False)
    chosen = gallery_files(small_split, 3)
    assert len(gallery) == 15
    assert gallery.images.dtype == torch.uint8
    assert gallery.images.shape == (15, 3, SIZE, SIZE)
    assert gallery.labels.dtype == torch.long
    assert gallery.labels.tolist() == [label for label, _ in chosen]
    for i, (_, path) in enumerate(chosen):
        expected = T.PILToTensor()(reference_crop(path, SIZE))
        assert torch.equal(gallery.images[i], expected), path


def test_gallery_reproducible(small_split) -> None:
    a = Gallery(small_split, 4, SIZE, workers=1, progress=False)
    b = Gallery(small_split, 4, SIZE, workers=3, progress=False)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    c = Gallery(small_split, 4, SIZE, workers=1, progress=False, seed=7)
    assert not torch.equal(a.images, c.images)


def test_batch_normalisation_matches_totensor_normalize(small_split) -> None:
    gallery = Gallery(small_split, 2, SIZE, workers=2, progress=False)
    chosen = gallery_files(small_split, 2)
    index = torch.tensor([3, 0, 7, 3])
    out = gallery.batch(index, torch.zeros(4, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.shape == (4, 3, SIZE, SIZE)
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    for row, i in enumerate(index.tolist()):
        expected = reference(reference_crop(chosen[i][1], SIZE))
        assert torch.allclose(out[row], expected, atol=1e-5, rtol=0)


def test_batch_flip_mirrors_exactly(small_split) -> None:
    gallery = Gallery(small_split, 2, SIZE, workers=2, progress=False)
    index = torch.tensor([1, 4, 4, 9])
    plain = gallery.batch(index, torch.zeros(4, dtype=torch.bool))
    flipped = gallery.batch(index, torch.ones(4, dtype=torch.bool))
    mixed = gallery.batch(index, torch.tensor([True, False, True, False]))
    for row in range(4):
        # column j of a mirrored image is column S-1-j of the original
        assert torch.equal(flipped[row], plain[row][:, :, torch.arange(SIZE - 1, -1, -1)])
    assert torch.equal(mixed[0], flipped[0]) and torch.equal(mixed[2], flipped[2])
    assert torch.equal(mixed[1], plain[1]) and torch.equal(mixed[3], plain[3])
    assert not torch.equal(flipped[0], plain[0])


def test_no_disk_reads_after_construction(small_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # private copies of the chosen files, deleted once the gallery is built
    copies = []
    for class_files in small_split.files:
        copied = []
        for path in class_files:
            shutil.copyfile(path, tmp_path / path.name)
            copied.append(tmp_path / path.name)
        copies.append(tuple(copied))
    split = Split(small_split.name, small_split.classes, tuple(copies), small_split.layout)
    gallery = Gallery(split, 3, SIZE, workers=2, progress=False)
    before = gallery.batch(torch.arange(len(gallery)), torch.zeros(len(gallery), dtype=torch.bool))
    for class_files in copies:
        for path in class_files:
            path.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError(f"disk read after construction: {args}")

    monkeypatch.setattr(datasets.gallery, "load_rgb", refuse)
    monkeypatch.setattr(datasets.images, "load_rgb", refuse)
    monkeypatch.setattr(PIL.Image, "open", refuse)
    flips = torch.arange(len(gallery)) % 2 == 0
    after = gallery.batch(torch.arange(len(gallery)), torch.zeros(len(gallery), dtype=torch.bool))
    gallery.batch(torch.arange(len(gallery)), flips)
    gallery.to("cpu").batch(torch.tensor([0, 2]), torch.tensor([False, True]))
    assert torch.equal(before, after)


def test_gallery_with_unreadable_file_raises_naming_it(small_split, tmp_path: Path) -> None:
    bad = tmp_path / small_split.files[0][0].name
    bad.write_text("not an image")
    files = ((bad,) + small_split.files[0][1:],) + small_split.files[1:]
    split = Split(small_split.name, small_split.classes, files, small_split.layout)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        Gallery(split, 12, SIZE, workers=2, progress=False)
