"""Reading miniImageNet splits from the three layouts (docs/original.md §2.1), and the split class lists."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import PER_CLASS, SPLIT_NAMES, csv_rows
from datasets.splits import class_list, detect_layout, read_split
from utils.errors import DataError

# docs/original.md §2.1: the Ravi & Larochelle split has 64 / 16 / 20 classes.
SPLIT_SIZES = {"train": 64, "val": 16, "test": 20}
WNID_RE = re.compile(r"^n\d{8}$")


# ---------------------------------------------------------------- class lists


def test_class_lists_have_64_16_20_wnids() -> None:
    for split, size in SPLIT_SIZES.items():
        wnids = class_list(split)
        assert len(wnids) == size, split
        assert len(set(wnids)) == size, f"{split} repeats a wnid"


def test_class_lists_are_wellformed_wnids() -> None:
    for split in SPLIT_SIZES:
        for wnid in class_list(split):
            assert WNID_RE.match(wnid), f"{split}: {wnid!r} is not 'n' + 8 digits"


def test_class_lists_are_disjoint() -> None:
    sets = {split: set(class_list(split)) for split in SPLIT_SIZES}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert len(set.union(*sets.values())) == 100


# ---------------------------------------------------------------- layouts


def test_detect_layout_names_each_layout(layout_roots: dict[str, Path]) -> None:
    for layout, root in layout_roots.items():
        assert detect_layout(root) == layout
        assert detect_layout(str(root)) == layout


@pytest.mark.parametrize("split", SPLIT_NAMES)
def test_three_layouts_read_same_classes_and_files(layout_roots: dict[str, Path], toy_root: Path, split: str) -> None:
    # Expected content derived from the CSV alone (read with the csv module).
    expected: dict[str, list[str]] = {}
    for name, wnid in csv_rows(toy_root, split):
        expected.setdefault(wnid, []).append(name)
    expected_classes = sorted(expected)
    assert expected_classes == sorted(class_list(split))

    for layout, root in layout_roots.items():
        got = read_split(root, split)
        assert got.name == split
        assert got.layout == layout
        assert list(got.classes) == expected_classes, layout
        assert got.num_classes == SPLIT_SIZES[split]
        assert len(got.files) == got.num_classes
        for wnid, files in zip(got.classes, got.files):
            assert sorted(p.name for p in files) == sorted(expected[wnid]), (layout, wnid)
            assert all(Path(p).is_file() for p in files)
        assert len(got) == SPLIT_SIZES[split] * PER_CLASS
        assert got.min_class_size() == PER_CLASS


def test_classes_sorted_and_numbered_from_zero(toy_root: Path, tmp_path: Path) -> None:
    # Write a CSV whose classes appear in reverse wnid order: the split must still sort them,
    # so that class i (its number, 0..C-1) is the i-th smallest wnid.
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    rows = csv_rows(toy_root, "val")
    rows = sorted(rows, key=lambda r: r[1], reverse=True)
    (root / "val.csv").write_text("filename,label\n" + "".join(f"{n},{w}\n" for n, w in rows))
    split = read_split(root, "val")
    assert list(split.classes) == sorted({w for _, w in rows})
    for number, (wnid, files) in enumerate(zip(split.classes, split.files)):
        assert split.classes.index(wnid) == number
        assert all(p.name.startswith(wnid) for p in files)


def test_csv_layout_keeps_csv_order_within_class(toy_root: Path, tmp_path: Path) -> None:
    # Stage 1 takes the first 500 files of each base class in the order of train.csv (docs/original.md §3.2).
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    rows = csv_rows(toy_root, "test")[::-1]
    (root / "test.csv").write_text("filename,label\n" + "".join(f"{n},{w}\n" for n, w in rows))
    split = read_split(root, "test")
    for wnid, files in zip(split.classes, split.files):
        assert [p.name for p in files] == [n for n, w in rows if w == wnid]
        assert all(p.parent == root / "images" for p in files)


def test_flat_layout_sorts_an_unsorted_class_list(flat_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped lists happen to be sorted; a list in another order must still give sorted classes.
    import datasets.splits

    wnids = class_list("val")
    shuffled = wnids[1::2] + wnids[::2]
    assert shuffled != sorted(shuffled)
    (tmp_path / "val.txt").write_text("\n".join(shuffled) + "\n")
    monkeypatch.setattr(datasets.splits, "DATASPLIT_DIR", tmp_path)
    got = read_split(flat_root, "val")
    assert list(got.classes) == sorted(wnids)
    for wnid, files in zip(got.classes, got.files):
        assert all(p.name.startswith(wnid) for p in files)


def test_flat_layout_assigns_files_by_wnid_prefix(flat_root: Path) -> None:
    for split in SPLIT_NAMES:
        got = read_split(flat_root, split)
        for wnid, files in zip(got.classes, got.files):
            assert all(p.name[:9] == wnid for p in files)


# ---------------------------------------------------------------- bad input


def test_missing_root_raises(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        read_split(missing, "train")
    with pytest.raises(DataError, match=re.escape(str(missing))):
        detect_layout(missing)


def test_root_without_images_or_split_folders_raises(toy_root: Path, tmp_path: Path) -> None:
    # split CSVs alone are not a dataset: the images folder is missing and so are split folders
    (tmp_path / "unrelated").mkdir()
    shutil.copyfile(toy_root / "train.csv", tmp_path / "train.csv")
    with pytest.raises(DataError) as info:
        read_split(tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "images" in message
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        detect_layout(tmp_path)


def test_missing_split_csv_raises(toy_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    shutil.copyfile(toy_root / "train.csv", root / "train.csv")
    assert read_split(root, "train").num_classes == 64
    with pytest.raises(DataError, match=re.escape(str(root / "val.csv"))):
        read_split(root, "val")


@pytest.mark.parametrize("header", ["filename,label,extra", "file,label", "label,filename", "filename"])
def test_csv_with_other_columns_raises(tmp_path: Path, header: str) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    width = len(header.split(","))
    row = ",".join(["n0153282900000001.jpg", "n01532829", "x"][:width])
    (root / "train.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(DataError, match=re.escape(str(root / "train.csv"))):
        read_split(root, "train")


def test_csv_with_empty_cells_raises(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text("filename,label\nn0153282900000001.jpg,\n")
    with pytest.raises(DataError, match=re.escape(str(root / "train.csv"))):
        read_split(root, "train")


@pytest.mark.parametrize("content", ["", "filename,label\n", "\xff\xfe garbage"])
def test_empty_or_unreadable_csv_raises(tmp_path: Path, content: str) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "val.csv").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(str(root / "val.csv"))):
        read_split(root, "val")


def test_flat_layout_class_without_images_raises(make_flat) -> None:
    missing = sorted(class_list("val"))[3]
    root = make_flat(exclude=(missing,))
    assert detect_layout(root) == "flat"
    read_split(root, "train")  # other splits are still fine
    with pytest.raises(DataError) as info:
        read_split(root, "val")
    assert missing in str(info.value)
    assert str(root / "images") in str(info.value)


def test_folders_layout_missing_split_folder_raises(make_folders) -> None:
    root = make_folders()
    shutil.rmtree(root / "test")
    assert read_split(root, "train").num_classes == 64
    with pytest.raises(DataError, match=re.escape(str(root / "test"))):
        read_split(root, "test")


def test_folders_layout_empty_class_folder_raises(make_folders) -> None:
    root = make_folders()
    wnid = sorted(class_list("val"))[0]
    for path in (root / "val" / wnid).iterdir():
        path.unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "val" / wnid))):
        read_split(root, "val")


def test_unknown_split_raises(toy_root: Path) -> None:
    with pytest.raises(DataError, match="trainval"):
        read_split(toy_root, "trainval")
