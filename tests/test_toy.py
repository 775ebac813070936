"""Tests for the procedural toy dataset generator ``datasets.toy``."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import toy
from datasets.splits import class_list
from utils.errors import OptionError

REPO_ROOT = Path(__file__).resolve().parent.parent
PER_CLASS = 6
SIZE = 48
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}


def read_rows(root: Path, split: str) -> tuple[list[str], list[list[str]]]:
    """Return the header and data rows of ``root/<split>.csv``."""
    with open(root / f"{split}.csv", newline="") as handle:
        header, *rows = csv.reader(handle)
    return header, rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Return every file under ``root`` keyed by its relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A small dataset generated once for the read-only tests."""
    out = tmp_path_factory.mktemp("toy")
    return out, toy.generate(out, per_class=PER_CLASS, size=SIZE, seed=0)


def test_counts_per_split(dataset: tuple[Path, dict[str, int]]) -> None:
    root, counts = dataset
    assert counts == {split: n * PER_CLASS for split, n in SPLIT_CLASSES.items()}
    for split, n_classes in SPLIT_CLASSES.items():
        _, rows = read_rows(root, split)
        labels = [label for _, label in rows]
        assert len(rows) == n_classes * PER_CLASS
        assert sorted(set(labels)) == sorted(class_list(split))
        assert all(labels.count(label) == PER_CLASS for label in set(labels))
    assert len(list((root / "images").iterdir())) == sum(counts.values())


def test_csv_layout(dataset: tuple[Path, dict[str, int]]) -> None:
    root, _ = dataset
    for split in SPLIT_CLASSES:
        header, rows = read_rows(root, split)
        assert header == ["filename", "label"]
        assert all(len(row) == 2 for row in rows)
        expected = [
            [f"{wnid}{number:08d}.jpg", wnid]
            for wnid in sorted(class_list(split))
            for number in range(1, PER_CLASS + 1)
        ]
        assert rows == expected
        for filename, label in rows:
            assert toy.FILENAME_RE.match(filename)
            assert filename.startswith(label)
    assert (root / "images" / "n0153282900000001.jpg").is_file()


def test_images_decode_with_requested_size(dataset: tuple[Path, dict[str, int]]) -> None:
    root, _ = dataset
    for path in sorted((root / "images").iterdir())[::7]:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (SIZE, SIZE)
            image.load()


def test_same_seed_is_byte_identical(dataset: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = dataset
    toy.generate(tmp_path, per_class=PER_CLASS, size=SIZE, seed=0)
    assert tree_bytes(tmp_path) == tree_bytes(root)


@pytest.mark.slow
def test_rendering_in_two_processes_writes_the_same_bytes(dataset: tuple[Path, dict[str, int]], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toy, "PARALLEL_FROM", 1)  # the module's dataset is smaller than a pool's worth
    started = []
    pool = toy.ProcessPoolExecutor
    monkeypatch.setattr(toy, "ProcessPoolExecutor", lambda *a, **k: started.append(a) or pool(*a, **k))
    toy.generate(tmp_path, per_class=PER_CLASS, size=SIZE, seed=0, workers=2)
    assert started == [(2,)] and tree_bytes(tmp_path) == tree_bytes(dataset[0])


def test_different_seed_differs(dataset: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = dataset
    toy.generate(tmp_path, per_class=PER_CLASS, size=SIZE, seed=1)
    first, second = tree_bytes(root), tree_bytes(tmp_path)
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith(".jpg")]
    assert sum(first[name] != second[name] for name in images) == len(images)


def test_regenerate_overwrites_existing_dataset(tmp_path: Path) -> None:
    bigger, smaller = tmp_path / "bigger", tmp_path / "smaller"
    toy.generate(bigger, per_class=3, size=32, seed=4)
    (bigger / "images" / "notes.txt").write_text("kept")
    toy.generate(bigger, per_class=2, size=32, seed=5)
    toy.generate(smaller, per_class=2, size=32, seed=5)
    regenerated = tree_bytes(bigger)
    assert regenerated.pop("images/notes.txt") == b"kept"
    assert regenerated == tree_bytes(smaller)


def test_class_design_is_distinct_and_covers_vocabulary() -> None:
    sizes = [len(sorted(class_list(split))) for split in SPLIT_CLASSES]
    design = toy.class_design(sizes, seed=0)
    assert design.shape == (sum(sizes), len(toy.VOCABULARY))
    distance = (design[:, None, :] != design[None, :, :]).sum(axis=-1)
    np.fill_diagonal(distance, len(toy.VOCABULARY))
    assert distance.min() >= toy.MIN_ATTRIBUTE_DISTANCE
    starts = np.cumsum([0, *sizes])
    for start, stop in itertools.pairwise(starts):
        for attribute, values in enumerate(toy.VOCABULARY):
            assert set(design[start:stop, attribute]) == set(range(len(values)))
    assert np.array_equal(design, toy.class_design(sizes, seed=0))
    assert not np.array_equal(design, toy.class_design(sizes, seed=1))


def test_no_single_attribute_names_a_class() -> None:
    """Every attribute value is shared by several base classes, and close class pairs exist."""
    sizes = [len(sorted(class_list(split))) for split in SPLIT_CLASSES]
    design = toy.class_design(sizes, seed=0)
    train = design[: sizes[0]]
    for attribute, values in enumerate(toy.VOCABULARY):
        assert np.bincount(train[:, attribute], minlength=len(values)).min() >= 3
    distance = (design[:, None, :] != design[None, :, :]).sum(axis=-1)
    np.fill_diagonal(distance, len(toy.VOCABULARY))
    assert (distance.min(axis=1) == toy.MIN_ATTRIBUTE_DISTANCE).mean() > 0.5


def colour_histogram(image: np.ndarray) -> np.ndarray:
    """Return the normalised 4x4x4 joint RGB histogram of an RGB uint8 array."""
    pixels = image.reshape(-1, 3) // 64
    bins = pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2]
    return np.bincount(bins, minlength=64) / len(bins)


def vivid_hue_histogram(image: np.ndarray) -> np.ndarray:
    """Return the 24-bin hue histogram of the saturated, bright pixels, as a share of all pixels."""
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).reshape(-1, 3).astype(np.float64) / 255
    vivid = (hsv[:, 1] > 0.6) & (hsv[:, 2] > 0.5)
    return np.bincount((hsv[vivid, 0] * 24).astype(int) % 24, minlength=24) / len(hsv)


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray, episodes: int = 200) -> float:
    """Accuracy of 5-way 1-shot episodes classified by the L1-nearest support feature."""
    classes = np.unique(labels)
    rng = np.random.default_rng(0)
    correct = total = 0
    for _ in range(episodes):
        episode = rng.choice(classes, 5, replace=False)
        support, query = [], []
        for way, wnid in enumerate(episode):
            index = rng.permutation(np.flatnonzero(labels == wnid))
            support.append(features[index[0]])
            query += [(features[i], way) for i in index[1:]]
        prototypes = np.stack(support)
        for feature, way in query:
            correct += int(np.argmin(np.abs(prototypes - feature).sum(axis=1)) == way)
            total += 1
    return correct / total


@pytest.fixture(scope="module")
def test_images(dataset: tuple[Path, dict[str, int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """The test split's images as RGB arrays and their labels."""
    root, _ = dataset
    _, rows = read_rows(root, "test")
    images = []
    for name, _ in rows:
        with Image.open(root / "images" / name) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images, np.array([label for _, label in rows])


def test_test_classes_are_distinct_by_object_hue(test_images: tuple[list[np.ndarray], np.ndarray]) -> None:
    """The class objects' hue alone beats 5-way chance (20%) by far, so the classes are distinct."""
    images, labels = test_images
    features = np.stack([vivid_hue_histogram(image) for image in images])
    assert nearest_mean_accuracy(features, labels) > 0.4


def test_colour_histograms_do_not_separate_classes(test_images: tuple[list[np.ndarray], np.ndarray]) -> None:
    """Random backgrounds and distractors keep whole-image colour statistics a weak cue (about 30%)."""
    images, labels = test_images
    features = np.stack([colour_histogram(image) for image in images])
    assert nearest_mean_accuracy(features, labels) < 0.45


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"per_class": 0}, "--perClass"), ({"size": 8}, "--size"), ({"seed": -2}, "--seed")],
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, int], flag: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=flag):
        toy.generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--perClass", "0"), ("--size", "15"), ("--seed", "-1")],
)
def test_main_rejects_bad_values(flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert toy.main(["--out", str(tmp_path / "out"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err
    assert not (tmp_path / "out").exists()


def test_main_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "toy"
    assert toy.main(["--out", str(out), "--perClass", "1", "--size", "32", "--seed", "3"]) == 0
    assert "wrote 100 images" in capsys.readouterr().out
    direct = tmp_path / "direct"
    toy.generate(direct, per_class=1, size=32, seed=3)
    assert tree_bytes(out) == tree_bytes(direct)


def test_main_rejects_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a directory")
    assert toy.main(["--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--out" in err
    assert target.read_text() == "not a directory"


@pytest.mark.slow
def test_cli_writes_dataset(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "toy"
    result = subprocess.run(
        [sys.executable, "-m", "datasets.toy", "--out", str(out), "--perClass", "1", "--size", "32", "--seed", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 100 images" in result.stdout
    direct = tmp_path / "direct"
    toy.generate(direct, per_class=1, size=32, seed=3)
    assert tree_bytes(out) == tree_bytes(direct)
