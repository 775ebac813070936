"""Bad input to either script: one line naming the flag or file, exit status 2, nothing written.

Each case runs the script's ``main`` in this process (``run_main``: from the parsed flags on, the code
path of ``python <script>``); one slow test checks the same contract on real processes."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil

import pytest
import torch

from datasets.lowshot import read_lowshot_meta
from datasets.toy import generate_lowshot
from models import IDeMeNet
from tests.scripts_helpers import make_workdir, run_main, run_script

STAGE1 = ["--dataroot", "toy", "--imageSize", "32", "--numEpochs", "1", "--batchSize", "32", "--nthreads", "0",
          "--filesPerClass", "2", "--valEpisodes", "0", "--progress", "0", "--tensorname", "bad1"]
STAGE2 = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--numEpochs", "1", "--epoch", "2",
          "--valEpisodes", "1", "--testEpisodes", "1", "--galleryNum", "2", "--chooseNum", "3", "--augnum", "2",
          "--test_num", "3", "--nthreads", "0", "--fixCls", "1", "--progress", "0", "--tensorname", "bad2"]


class Unsafe:
    def __reduce__(self):
        return (os.system, ("touch executed_marker",))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("cli"))
    torch.save(IDeMeNet(image_size=32, fang=5).state_dict(), root / "models/grid5.t7")
    data = (root / "models/stage1.t7").read_bytes()
    (root / "models/truncated.t7").write_bytes(data[: len(data) // 3])
    with open(root / "models/unsafe.t7", "wb") as handle:
        pickle.dump({"conv": Unsafe()}, handle)
    return root


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "toy" not in p.parts)


def expect_error(root, script, flags, *needles, run=run_main):
    before = snapshot(root)
    result = run(root, script, *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in message, message
    assert snapshot(root) == before, "a failed run wrote files"
    return message


@pytest.mark.parametrize("extra,needles", [
    (["--ways", "30"], ["--ways 30", "16 classes of split val"]),
    (["--trainways", "65"], ["--trainways 65"]),
    (["--shots", "5"], ["--shots 5", "--test_num 3"]),
    (["--galleryNum", "7"], ["--galleryNum 7"]),
    (["--chooseNum", "200"], ["--chooseNum 200", "gallery"]),
    (["--imageSize", "16"], ["--imageSize 16", "32 px"]),
    (["--network", "missing"], ["--network missing", "stage1"]),
    (["--GNet", "missing"], ["--GNet missing", "available"]),
    (["--GNet", "grid5"], ["grid5.t7", "deformer.toWeight.0.weight"]),
    (["--GNet", "truncated"], ["truncated.t7", "truncated or corrupt"]),
    (["--GNet", "unsafe"], ["unsafe.t7", "refused"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
    (["--amp", "1", "--device", "cpu"], ["--amp 1"]),
    (["--dataroot", "nowhere"], ["nowhere", "--dataroot"]),
    (["--batchSize", "0"], ["--batchSize"]),
], ids=["ways", "trainways", "shots", "galleryNum", "chooseNum", "imageSize", "missing_network", "missing_GNet",
        "other_grid", "truncated_checkpoint", "unsafe_pickle", "no_gpu", "amp_on_cpu", "no_dataroot", "batchSize"])
def test_stage2_rejects_bad_flags(workdir, extra, needles):
    expect_error(workdir, "onlyBasetwoLoss.py", [*STAGE2, *extra], *needles)
    assert not (workdir / "executed_marker").exists()


@pytest.mark.parametrize("extra,needles", [
    (["--network", "missing"], ["--network missing"]),
    (["--network", "unsafe"], ["refused"]),
    (["--imageSize", "2", "--Fang", "3"], ["--imageSize 2"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
    (["--dataroot", "nowhere"], ["nowhere"]),
    (["--filesPerClass", "-1"], ["--filesPerClass", "-1"]),
], ids=["missing_network", "unsafe_network", "tiny_image", "no_gpu", "no_dataroot", "negative_filesPerClass"])
def test_stage1_rejects_bad_flags(workdir, extra, needles):
    expect_error(workdir, "classification.py", [*STAGE1, *extra], *needles)


@pytest.fixture
def broken_copy(workdir, tmp_path):
    """A copy of the work folder whose dataset the test may damage."""
    root = tmp_path / "w"
    shutil.copytree(workdir, root)
    return root


def test_csv_with_other_columns_is_named(broken_copy):
    path = broken_copy / "toy/val.csv"
    rows = list(csv.reader(open(path)))
    rows[0] = ["file", "class"]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    expect_error(broken_copy, "onlyBasetwoLoss.py", STAGE2, "val.csv", "filename,label")


def _two_base_classes(root):
    """Keep the first two base classes of ``root``'s train split (a gallery of 2 x --galleryNum images)."""
    path = root / "toy/train.csv"
    header, *rows = list(csv.reader(open(path)))
    kept = sorted({label for _, label in rows})[:2]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *(row for row in rows if row[1] in kept)])


@pytest.mark.parametrize("given,start", [
    ([], "--galleryNum 2 "),  # the default --chooseNum (15 for one shot) is not at fault
    (["--chooseNum", "5"], "--chooseNum 5 "),
], ids=["galleryNum", "chooseNum"])
def test_the_shortlist_refusal_names_the_flag_that_was_set(broken_copy, given, start):
    _two_base_classes(broken_copy)
    flags = [flag for i, flag in enumerate(STAGE2) if "--chooseNum" not in STAGE2[max(i - 1, 0):i + 1]]
    message = expect_error(broken_copy, "onlyBasetwoLoss.py", [*flags, "--trainways", "2", *given],
                           "2 images x 2 classes")
    assert message.startswith("error: " + start), message
    assert ("--chooseNum 15" not in message) and (given or "its default for --shots 1" in message), message


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_bad_image_is_named_and_can_be_skipped(broken_copy, damage):
    victim = sorted((broken_copy / "toy/images").glob("n01930112*.jpg"))[0]  # a test-split image
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not a picture")
    expect_error(broken_copy, "onlyBasetwoLoss.py", STAGE2, victim.name, "--skipBadImages")
    result = run_main(broken_copy, "onlyBasetwoLoss.py", *STAGE2, "--skipBadImages")
    assert result.returncode == 0, result.stderr
    assert "left out 1 unreadable image(s)" in result.stdout


def test_a_diverging_run_stops_without_overwriting_the_last_good_checkpoint(workdir):
    good = run_main(workdir, "classification.py", *STAGE1, "--filesPerClass", "1", "--tensorname", "diverge")
    assert good.returncode == 0, good.stderr
    saved = (workdir / "models/diverge.t7").read_bytes()
    result = run_main(workdir, "classification.py", *STAGE1, "--tensorname", "diverge", "--overwrite",
                        "--LR", "1e30", "--filesPerClass", "4")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "non-finite loss at epoch 0, step" in result.stderr
    assert "models/diverge.t7" in result.stderr
    assert (workdir / "models/diverge.t7").read_bytes() == saved


def test_a_diverging_stage2_run_names_the_episode_classes(workdir):
    result = run_main(workdir, "onlyBasetwoLoss.py", *STAGE2, "--tensorname", "diverge2", "--LR", "1e30",
                        "--epoch", "6")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "non-finite loss at epoch 0, episode" in result.stderr and "(classes n" in result.stderr
    assert not (workdir / "models/diverge2.t7").exists()


LOWSHOT = ["--imagenet", "bench", "--lowshotmeta", "bench/label_idx.json", "--experimentpath",
           "bench/splitfile_{:d}.json", "--imageSize", "32", "--galleryNum", "2", "--nthreads", "0", "--progress", "0",
           "--device", "cpu", "--trials", "1", "2", "--lowshotn", "1", "2", "--GNet", "lowshot", "--tensorname", "bad3"]
LOWSHOT_TRAIN = 20  # training images per class of the toy benchmark (its split files list 20 per class)


@pytest.fixture(scope="module")
def lowshot_bench(tmp_path_factory):
    """A toy ImageNet-1K low-shot benchmark (4 lists of 2 classes) and an untrained stage-2 checkpoint."""
    root = tmp_path_factory.mktemp("lowshot_cli")
    generate_lowshot(root / "bench", classes_per_list=2, train_per_class=LOWSHOT_TRAIN, val_per_class=1, size=32)
    (root / "models").mkdir()
    torch.save(IDeMeNet(num_classes=4, image_size=32).state_dict(), root / "models/lowshot.t7")
    return root


def missing_class(root, meta):
    wnid = meta.label_names[meta.lists["novel_classes_2"][0]]
    shutil.rmtree(root / "bench/train" / wnid)
    return [wnid, "label_idx.json", "missing"]


def index_past_the_end(root, meta):
    path = root / "bench/splitfile_2.json"
    rows = json.loads(path.read_text())
    k = meta.lists["novel_classes_1"][1]
    rows[k][0] = (k + 1) * LOWSHOT_TRAIN  # the first image of the next class in the list
    path.write_text(json.dumps(rows))
    return ["splitfile_2.json", "outside"]


def short_split_file(root, meta):
    path = root / "bench/splitfile_1.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    return ["splitfile_1.json", "a list of 8 per-class index lists", "found 7"]


@pytest.mark.parametrize("damage", [missing_class, index_past_the_end, short_split_file],
                         ids=lambda damage: damage.__name__)
def test_lowshot_names_a_damaged_benchmark_file(lowshot_bench, tmp_path, damage):
    root = tmp_path / "w"
    shutil.copytree(lowshot_bench, root)
    needles = damage(root, read_lowshot_meta(root / "bench/label_idx.json"))
    expect_error(root, "lowshot_imagenet.py", LOWSHOT, *needles)


@pytest.mark.slow
@pytest.mark.parametrize("script,flags,needles", [
    ("onlyBasetwoLoss.py", [*STAGE2, "--ways", "30"], ["--ways 30", "16 classes of split val"]),
    ("onlyBasetwoLoss.py", [*STAGE2, "--GNet", "unsafe"], ["unsafe.t7", "refused"]),
    ("classification.py", [*STAGE1, "--network", "unsafe"], ["refused"]),
    ("classification.py", [*STAGE1, "--filesPerClass", "-1"], ["--filesPerClass", "-1"]),
], ids=["stage2_ways", "stage2_unsafe_pickle", "stage1_unsafe_pickle", "stage1_negative_filesPerClass"])
def test_a_process_given_bad_flags_prints_one_line_and_exits_2(workdir, script, flags, needles):
    expect_error(workdir, script, flags, *needles, run=run_script)
    assert not (workdir / "executed_marker").exists()
