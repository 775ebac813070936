"""The ImageNet-1K low-shot benchmark: its files, its metrics, the feature files, and the whole
chain (stage 1 and stage 2 on the base classes, then ``lowshot_imagenet.py``) on a toy benchmark."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from datasets.episodes import CroppedImages
from datasets.lowshot import (benchmark_split, read_lowshot_meta, read_train_list, read_trial, rebuild_train_list,
                              shot_indices)
from datasets.toy import generate_lowshot
from datasets.transforms import normalize_uint8
from datasets.gallery import Gallery
from engine.episode import EpisodeConfig, GalleryBank
from engine.features import FeatureCache
from engine.lowshot import (FeatureStore, choose_priors, deformation_draws, deformed_prototypes, difference,
                            shortlisted_gallery, summarise)
from models import EmbeddingNet, IDeMeNet, load_idemenet
from models.protonet import prototypes
from models.protonet import squared_distances
from tests.scripts_helpers import REPO, run_script, script_env
from utils.distributed import DistInfo
from utils.errors import DataError
from utils.forward import layout_model
from utils.interrupt import Interrupted
from utils.lowshot_metrics import best_prior, lowshot_metrics, prior_scores

SIZE = "32"
PER_LIST = 5  # classes in each of base_1, base_2, novel_1, novel_2
TRAIN_PER_CLASS = 22
VAL_PER_CLASS = 6  # stage 1's val monitor needs 5 support + 1 query images per class
LOWSHOT = ["--imagenet", "bench", "--lowshotmeta", "bench/label_idx.json", "--experimentpath",
           "bench/splitfile_{:d}.json", "--imageSize", SIZE, "--galleryNum", "4", "--nthreads", "0", "--progress", "0",
           "--device", "cpu", "--trials", "1", "2", "--lowshotn", "1", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowshot")
    generate_lowshot(root / "bench", classes_per_list=PER_LIST, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                     size=int(SIZE))
    return root


@pytest.fixture(scope="module")
def meta(workdir):
    return read_lowshot_meta(workdir / "bench/label_idx.json")


# --- the metrics, by hand -------------------------------------------------------------------------------------------

# Columns: base b0..b3, then novel n0..n2 (B = 4).
SCORES = torch.tensor([[5., 4., 3., 2., 1., .5, 0.],   # target n0 (4): 5th overall, first among the novel
                       [0., -1., -2., -3., 1., 2., 3.],  # target n2 (6): first everywhere
                       [9., 1., 8., 7., 6., 5., 4.],   # target b1 (1): last
                       [9., 1., 2., 3., 4., 5., 6.]])  # target b0 (0): first
TARGETS = torch.tensor([4, 6, 1, 0])


def test_metrics_by_hand():
    metrics = lowshot_metrics(SCORES, TARGETS, num_base=4)
    assert metrics["novel"] == {1: 100.0, 5: 100.0}
    assert metrics["novel_joint"] == {1: 50.0, 5: 100.0}
    assert metrics["base"] == {1: 50.0, 5: 50.0}
    assert metrics["all"] == {1: 50.0, 5: 75.0}
    assert "all_prior" not in metrics


def test_prior_renormalises_and_moves_the_decisions_by_hand():
    for mu in (0.1, 0.9):
        probs = prior_scores(SCORES, 4, mu).exp()
        assert torch.allclose(probs[:, :4].sum(1), torch.full((4,), 1 - mu))
        assert torch.allclose(probs[:, 4:].sum(1), torch.full((4,), mu))
    # Within its part, each row's best class has probability 0.665 (rows 0 and 1: base; all rows: novel), or 0.5065
    # (row 0's novel n0: e / (e + e^.5 + 1)), or about 1 (rows 2 and 3: b0). mu = 0.9: every row's best novel
    # class (0.9 * 0.5065 or 0.9 * 0.665) beats its best base class (at most 0.1); mu = 0.1: b0 (at least
    # 0.9 * 0.665) beats every novel class (at most 0.1).
    assert prior_scores(SCORES, 4, 0.9).argmax(1).tolist() == [4, 6, 4, 6]
    assert prior_scores(SCORES, 4, 0.1).argmax(1).tolist() == [0, 0, 0, 0]
    assert lowshot_metrics(SCORES, TARGETS, 4, mu=0.9)["all_prior"][1] == 50.0  # rows 0 and 1
    assert lowshot_metrics(SCORES, TARGETS, 4, mu=0.1)["all_prior"][1] == 25.0  # row 3


def test_best_prior_takes_the_best_mean_and_the_smallest_on_ties():
    grid = (0.0, 0.5, 1.0)
    curves = [[{5: 10.0}, {5: 30.0}, {5: 30.0}], [{5: 20.0}, {5: 30.0}, {5: 10.0}]]
    assert best_prior(curves, grid) == 0.5
    assert best_prior([[{5: 1.0}, {5: 2.0}, {5: 2.0}]], grid) == 0.5


# --- the benchmark's files -------------------------------------------------------------------------------------------

def test_label_names_are_not_sorted_and_the_list_follows_them(workdir, meta):
    assert list(meta.label_names) != sorted(meta.label_names)
    images = rebuild_train_list(workdir / "bench/train", meta)
    assert images.reconstructed and "reconstructed" in images.source
    for k, wnid in enumerate(meta.label_names):
        files = images.class_files(k)
        assert [f.parent.name for f in files] == [wnid] * TRAIN_PER_CLASS
        assert [f.name for f in files] == sorted(os.listdir(workdir / "bench/train" / wnid))


def test_n_shot_sets_are_the_first_n_of_each_list(workdir, meta):
    images = rebuild_train_list(workdir / "bench/train", meta)
    trial = read_trial(workdir / "bench/splitfile_3.json", meta, images, 20)
    raw = json.loads((workdir / "bench/splitfile_3.json").read_text())
    novel = meta.lists["novel_classes_2"]
    for n in (1, 2, 5, 20):
        picked = shot_indices(trial, novel, n)
        assert picked.shape == (len(novel), n)
        assert picked.tolist() == [raw[k][:n] for k in novel]
        assert all(images.files[i].parent.name == meta.label_names[k] for k, row in zip(novel, picked) for i in row)


def test_release_train_list_is_read_and_checked(workdir, meta, tmp_path):
    rebuilt = rebuild_train_list(workdir / "bench/train", meta)
    names = [f"/datasets/imagenet/train/{f.parent.name}/{f.name}" for f in rebuilt.files]
    labels = [k for k in range(len(meta.label_names)) for _ in rebuilt.class_files(k)]
    release = tmp_path / "train.json"
    release.write_text(json.dumps({"image_names": names, "image_labels": labels}))
    listed = read_train_list(release, workdir / "bench/train", meta)
    assert listed.files == rebuilt.files and listed.starts == rebuilt.starts and not listed.reconstructed
    labels[3] = 1 if labels[3] == 0 else 0
    release.write_text(json.dumps({"image_names": names, "image_labels": labels}))
    with pytest.raises(DataError, match="train.json"):
        read_train_list(release, workdir / "bench/train", meta)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(base_classes=m["base_classes_1"]), "not the union"),
    (lambda m: m["novel_classes_1"].append(m["base_classes_2"][0]), "in both novel_classes_1 and base_classes"),
    (lambda m: m["novel_classes_2"].append(len(m["label_names"])), "outside the"),
    (lambda m: m.pop("novel_classes_2"), "missing novel_classes_2"),
])
def test_bad_class_split_is_refused_naming_the_file(workdir, tmp_path, change, message):
    data = json.loads((workdir / "bench/label_idx.json").read_text())
    change(data)
    path = tmp_path / "label_idx.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as error:
        read_lowshot_meta(path)
    assert str(path) in str(error.value)


def test_stage_splits_are_the_base_classes_and_each_setups_novel_classes(workdir, meta):
    train = benchmark_split(workdir / "bench", meta, "train")
    assert set(train.classes) == set(meta.wnids("base_classes")) and list(train.classes) == sorted(train.classes)
    assert set(benchmark_split(workdir / "bench", meta, "val").classes) == set(meta.wnids("novel_classes_1"))
    test = benchmark_split(workdir / "bench", meta, "test")
    assert set(test.classes) == set(meta.wnids("novel_classes_2"))
    assert all(f.parent.parent.name == "val" for files in test.files for f in files)


# --- the feature files ------------------------------------------------------------------------------------------------

def test_feature_store_resumes_after_an_interruption_and_refuses_another_list(workdir, tmp_path):
    files = sorted((workdir / "bench/train").glob("*/*.JPEG"))[:20]
    torch.manual_seed(0)
    embed = EmbeddingNet(3).eval().features
    args = (torch.device("cpu"), 4, 0, False, DistInfo())
    whole = FeatureStore(tmp_path / "whole", files, int(SIZE), block=8)
    whole.extract(embed, *args, stop=None, progress=False, desc="whole")
    store = FeatureStore(tmp_path / "parts", files, int(SIZE), block=8)
    with pytest.raises(Interrupted):
        store.extract(embed, *args, stop=lambda: True, progress=False, desc="parts")  # stops after the 1st batch
    assert store.missing() == [0, 1, 2]  # nothing finished: a block needs 8 images
    calls = iter(range(100))
    with pytest.raises(Interrupted):
        store.extract(embed, *args, stop=lambda: next(calls) >= 2, progress=False, desc="parts")
    assert store.missing() == [1, 2]  # block 0 (3 batches of 4 cover it) is kept
    before = store.block_path(0).stat().st_mtime_ns
    FeatureStore(tmp_path / "parts", files, int(SIZE), block=8).extract(embed, *args, stop=None, progress=False,
                                                                        desc="parts")
    assert store.block_path(0).stat().st_mtime_ns == before  # not recomputed
    loaded = store.load()
    assert loaded.dtype == torch.float16 and loaded.shape == (20, 512)
    assert torch.equal(loaded, whole.load())
    with pytest.raises(DataError, match="another image list"):
        FeatureStore(tmp_path / "parts", files[:-1], int(SIZE), block=8)


# --- the scripts ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(workdir):
    """Stage 1 then stage 2 on the benchmark's base classes, as the README's recipe runs them (tiny)."""
    stage1 = run_script(workdir, "classification.py", "--dataroot", "bench", "--lowshotmeta", "bench/label_idx.json",
                        "--imageSize", SIZE, "--numEpochs", "1", "--batchSize", "32", "--filesPerClass", "0",
                        "--valEpisodes", "4", "--valQueries", "1", "--nthreads", "0", "--progress", "0",
                        "--tensorname", "imagenet_stage1")
    assert stage1.returncode == 0, stage1.stderr
    stage2 = run_script(workdir, "onlyBasetwoLoss.py", "--dataroot", "bench", "--lowshotmeta", "bench/label_idx.json",
                        "--imageSize", SIZE, "--network", "imagenet_stage1", "--fixCls", "1", "--shots", "1",
                        "--test_num", "2", "--galleryNum", "4", "--chooseNum", "6", "--numEpochs", "1", "--epoch", "3",
                        "--valEpisodes", "2", "--testEpisodes", "2", "--nthreads", "0", "--progress", "0",
                        "--tensorname", "imagenet_1shot")
    assert stage2.returncode == 0, stage2.stderr
    return workdir


def test_stage1_trains_on_every_image_of_the_base_classes(trained, meta):
    state = torch.load(trained / "models/imagenet_stage1.t7")
    assert state["convnet.fc.weight"].shape[0] == len(meta.lists["base_classes"])
    model = load_idemenet(trained / "models/imagenet_1shot.t7", image_size=int(SIZE))
    assert model.fc.out_features == len(meta.lists["base_classes"])


@pytest.fixture(scope="module")
def evaluated(trained):
    result = run_script(trained, "lowshot_imagenet.py", *LOWSHOT, "--GNet", "imagenet_1shot", "--tensorname", "ls")
    assert result.returncode == 0, result.stderr
    return result, json.loads((trained / "runs/ls/lowshot_imagenet.json").read_text())


def test_lowshot_report_holds_every_metric_and_the_paired_difference(evaluated):
    result, report = evaluated
    assert set(report["setups"]) == {"val", "test"} and report["train_list_reconstructed"]
    assert "top-5 accuracy on the novel classes" in result.stdout and "60.1" in result.stdout
    test = report["setups"]["test"]
    assert (test["novel_classes"], test["base_classes"], test["test_images"]) == (PER_LIST, PER_LIST, 2 * PER_LIST * VAL_PER_CLASS)
    for n in ("1", "2"):
        for metric in ("novel", "novel_joint", "base", "all", "all_prior"):
            for k in ("top1", "top5"):
                plain = test["plain"][n][metric][k]["trials"]
                deformed = test["deformed"][n][metric][k]["trials"]
                assert len(plain) == 2 and all(0 <= v <= 100 for v in plain + deformed)
                if metric != "all_prior":
                    assert test["difference"][n][metric][k]["trials"] == pytest.approx(
                        [d - p for d, p in zip(deformed, plain)])
        assert test["plain"][n]["novel"]["top5"]["mean"] == pytest.approx(np.mean(test["plain"][n]["novel"]["top5"]
                                                                                   ["trials"]))
    assert set(report["prior_mu"]["deformed"]) == {"1", "2"}
    assert all(mu in [round(0.05 * i, 2) for i in range(21)] for mu in report["prior_mu"]["plain"].values())


def test_plain_scores_match_an_independent_computation(evaluated, trained, meta):
    """The plain metrics of trial 2, n = 2, recomputed here from the split file, the folders and the
    network: first n listed images per novel class, every training image per base class."""
    _, report = evaluated
    model = load_idemenet(trained / "models/imagenet_1shot.t7", image_size=int(SIZE)).eval()

    def embed(paths):
        images = torch.stack([CroppedImages(paths, int(SIZE))[i] for i in range(len(paths))])
        with torch.no_grad():
            return torch.cat([model.embed(normalize_uint8(images[i:i + 2])) if len(images[i:i + 2]) == 2 else
                              model.embed(normalize_uint8(images[i:i + 1]).expand(2, -1, -1, -1))[:1]
                              for i in range(0, len(images), 2)]).half().float()

    bench = trained / "bench"
    train_files = [bench / "train" / w / f for w in meta.label_names for f in sorted(os.listdir(bench / "train" / w))]
    rows = json.loads((bench / "splitfile_2.json").read_text())
    base, novel = meta.lists["base_classes_2"], meta.lists["novel_classes_2"]
    base_protos = torch.stack([embed(sorted((bench / "train" / meta.label_names[k]).iterdir())).mean(0) for k in base])
    novel_protos = torch.stack([embed([train_files[i] for i in rows[k][:2]]).mean(0) for k in novel])
    test_files, targets = [], []
    for column, k in enumerate(base + novel):
        for path in sorted((bench / "val" / meta.label_names[k]).iterdir()):
            test_files.append(path)
            targets.append(column)
    scale = model.scale.detach()
    scores = -scale * squared_distances(embed(test_files), torch.cat([base_protos, novel_protos]))
    expected = lowshot_metrics(scores, torch.tensor(targets), len(base))
    got = report["setups"]["test"]["plain"]["2"]
    for metric in ("novel", "novel_joint", "base", "all"):
        assert got[metric]["top1"]["trials"][1] == pytest.approx(expected[metric][1], abs=1e-6), metric
        assert got[metric]["top5"]["trials"][1] == pytest.approx(expected[metric][5], abs=1e-6), metric


def _copy_bench(workdir, tmp_path):
    shutil.copytree(workdir / "bench", tmp_path / "bench", symlinks=True)
    (tmp_path / "models").mkdir()
    shutil.copy(workdir / "models/imagenet_1shot.t7", tmp_path / "models")
    return tmp_path


def _refused(workdir, *extra):
    result = run_script(workdir, "lowshot_imagenet.py", *LOWSHOT, "--GNet", "imagenet_1shot", "--tensorname", "bad",
                        *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not (workdir / "runs/bad").exists()
    return lines[0]


def test_a_class_missing_from_the_folder_is_refused(trained, meta, tmp_path):
    work = _copy_bench(trained, tmp_path)
    wnid = meta.label_names[meta.lists["novel_classes_2"][0]]
    shutil.rmtree(work / "bench/train" / wnid)
    line = _refused(work)
    assert wnid in line and "label_idx.json" in line and "missing" in line


def test_an_index_past_the_end_of_a_class_is_refused(trained, meta, tmp_path):
    work = _copy_bench(trained, tmp_path)
    path = work / "bench/splitfile_2.json"
    rows = json.loads(path.read_text())
    k = meta.lists["novel_classes_1"][1]
    rows[k][0] = (k + 1) * TRAIN_PER_CLASS  # the first image of the next class in the list
    path.write_text(json.dumps(rows))
    line = _refused(work)
    assert "splitfile_2.json" in line and "outside" in line


def test_a_split_file_of_the_wrong_length_is_refused(trained, tmp_path):
    work = _copy_bench(trained, tmp_path)
    path = work / "bench/splitfile_1.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    line = _refused(work)
    assert "splitfile_1.json" in line and f"{4 * PER_LIST}" in line


def test_prototype_baseline_from_a_stage1_checkpoint(trained):
    result = run_script(trained, "lowshot_imagenet.py", *LOWSHOT, "--network", "imagenet_stage1", "--deform", "none",
                        "--testsetup", "0", "--tensorname", "baseline")
    assert result.returncode == 0, result.stderr
    report = json.loads((trained / "runs/baseline/lowshot_imagenet.json").read_text())
    assert set(report["setups"]) == {"val"} and "deformed" not in report["setups"]["val"]
    assert math.isfinite(report["setups"]["val"]["plain"]["1"]["all_prior"]["top5"]["mean"])
    assert (trained / "runs/baseline/lowshot_imagenet.csv").is_file()


def test_reproduce_script_runs_every_step_from_a_flat_val_folder_then_skips_them(tmp_path):
    generate_lowshot(tmp_path / "ILSVRC", classes_per_list=PER_LIST, train_per_class=TRAIN_PER_CLASS, val_per_class=20,
                     size=int(SIZE), trials=1)
    val = tmp_path / "ILSVRC/val"
    labels = []
    for path in sorted(val.glob("*/*.JPEG")):
        labels.append(f"{path.name} {path.parent.name}")
        path.rename(val / path.name)
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
    (tmp_path / "val_labels.txt").write_text("\n".join(labels) + "\n")
    lowshot = tmp_path / "lowshot"
    lowshot.mkdir()
    for name in ("label_idx.json", "splitfile_1.json"):
        (tmp_path / "ILSVRC" / name).rename(lowshot / name)
    env = {**script_env(), "WORKDIR": str(tmp_path / "work"), "IMAGENET": str(tmp_path / "ILSVRC"),
           "LOWSHOT": str(lowshot),
           "VAL_LABELS": str(tmp_path / "val_labels.txt"), "DEVICE": "cpu", "THREADS": "0", "AMP": "0", "SIZE": SIZE,
           "EPOCHS1": "1", "BATCH1": "32", "EPOCHS2": "1", "EPISODES": "2", "VALEPISODES": "2", "GALLERY": "4",
           "TRIALS": "1", "LOWSHOTN": "1 2"}
    command = ["bash", str(REPO / "scripts/reproduce_imagenet_lowshot.sh")]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert len(list(val.glob("*/*.JPEG"))) == len(labels) and not list(val.glob("*.JPEG"))
    report = json.loads((tmp_path / "work/runs/imagenet_lowshot/lowshot_imagenet.json").read_text())
    assert report["trials"] == [1] and report["lowshotn"] == [1, 2]
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "imagenet_stage1: runs/imagenet_stage1/summary.json exists, skipped" in second.stdout
    assert "imagenet_metaNet: runs/imagenet_metaNet/evaluate_1shot_seed0.json exists, skipped" in second.stdout
    assert "folding" not in second.stdout


def test_feature_store_shards_blocks_over_processes(workdir, tmp_path):
    files = sorted((workdir / "bench/train").glob("*/*.JPEG"))[:20]
    torch.manual_seed(0)
    embed = EmbeddingNet(3).eval().features
    whole = FeatureStore(tmp_path / "whole", files, int(SIZE), block=8)
    whole.extract(embed, torch.device("cpu"), 4, 0, False, DistInfo(), stop=None, progress=False, desc="whole")
    store = FeatureStore(tmp_path / "shared", files, int(SIZE), block=8)
    missing = store.missing()  # read by every rank before any writes
    # batches of 3 straddle the blocks of 8: rows left over from a batch start the next block
    store.extract(embed, torch.device("cpu"), 3, 0, False, DistInfo(rank=1, world_size=2), stop=None, progress=False,
                  desc="rank 1", missing=missing)
    assert store.missing() == [0, 2]  # rank 1 of 2 takes blocks 1, 3, 5, ...
    store.extract(embed, torch.device("cpu"), 3, 0, False, DistInfo(rank=0, world_size=2), stop=None, progress=False,
                  desc="rank 0", missing=missing)
    assert store.missing() == [] and torch.equal(store.load(), whole.load())


def test_a_resumed_extraction_splits_the_blocks_left_evenly_over_the_processes(workdir, tmp_path):
    files = sorted((workdir / "bench/train").glob("*/*.JPEG"))[:12]
    torch.manual_seed(0)
    embed = EmbeddingNet(3).eval().features
    cpu = torch.device("cpu")
    whole = FeatureStore(tmp_path / "whole", files, int(SIZE), block=2)
    whole.extract(embed, cpu, 4, 0, False, DistInfo(), stop=None, progress=False, desc="whole")
    store = FeatureStore(tmp_path / "resumed", files, int(SIZE), block=2)
    store.extract(embed, cpu, 4, 0, False, DistInfo(rank=0, world_size=2), stop=None, progress=False, desc="first")
    missing = store.missing()
    assert missing == [1, 3, 5]  # an interrupted run left the odd blocks (by block number: all rank 1's)
    store.extract(embed, cpu, 4, 0, False, DistInfo(rank=1, world_size=2), stop=None, progress=False, desc="rank 1",
                  missing=missing)
    assert store.missing() == [1, 5]  # rank 1 took one of the three, not all of them
    store.extract(embed, cpu, 4, 0, False, DistInfo(rank=0, world_size=2), stop=None, progress=False, desc="rank 0",
                  missing=missing)
    assert store.missing() == [] and torch.equal(store.load(), whole.load())


def test_deformed_prototypes_do_not_depend_on_the_chunking(workdir, meta):
    torch.manual_seed(0)
    model = layout_model(IDeMeNet(10, image_size=int(SIZE)).eval())
    gallery = Gallery(benchmark_split(workdir / "bench", meta, "train"), 4, int(SIZE), workers=0, progress=False)
    bank = GalleryBank(gallery, model, torch.device("cpu"), 16)
    images = rebuild_train_list(workdir / "bench/train", meta)
    trial = read_trial(workdir / "bench/splitfile_1.json", meta, images, 20)
    shots, novel = 2, meta.lists["novel_classes_1"]
    files = [images.files[i] for i in shot_indices(trial, novel, shots).reshape(-1)]
    support = FeatureCache(model.embed, len(files), torch.device("cpu"), 16).lookup(
        torch.arange(len(files)), torch.stack([CroppedImages(files, int(SIZE))[i] for i in range(len(files))]))
    draws = deformation_draws(len(files) * 5, 9, 6, len(bank), 0, 3, 0, 1, shots)
    whole = EpisodeConfig(len(novel), 5, 6, chunk=16)
    plain = prototypes(support, torch.arange(len(novel)).repeat_interleave(shots), len(novel))
    # one class per distance computation selects the same gallery images as all classes at once
    assert torch.equal(shortlisted_gallery(plain, bank, model.scale, whole, shots, draws, budget=1),
                       shortlisted_gallery(plain, bank, model.scale, whole, shots, draws))
    one_step = deformed_prototypes(model, bank, files, support, shots, whole, draws, torch.device("cpu"), 0, int(SIZE))
    small = EpisodeConfig(len(novel), 5, 6, chunk=2)  # one class (2 images, 10 copies) per step
    steps = deformed_prototypes(model, bank, files, support, shots, small, draws, torch.device("cpu"), 0, int(SIZE))
    assert torch.allclose(one_step, steps, rtol=1e-5, atol=1e-5)
    assert (one_step - plain).abs().max() > 1e-3  # the deformed copies moved the prototypes


def test_the_test_setups_prior_is_the_one_chosen_on_the_validation_setup():
    """Synthetic trial results: the val curves peak at mu = 0.25 (deformed) and 0.75 (plain); the test
    setup's all_prior is its own curve read at those mu, and the paired difference uses both."""
    grid = [round(0.05 * i, 2) for i in range(21)]

    def trial(peak: float, offset: float) -> dict:
        flat = {metric: {1: 10.0 + offset, 5: 20.0 + offset} for metric in ("novel", "novel_joint", "base", "all")}
        curve = [{1: 100 * mu + offset, 5: 90.0 if mu == peak else 10.0} for mu in grid]
        return {**flat, "prior_curve": curve}

    results = {"val": {"deformed": {1: [trial(0.25, 0.0), trial(0.25, 1.0)]},
                       "plain": {1: [trial(0.75, 0.0), trial(0.75, 1.0)]}},
               "test": {"deformed": {1: [trial(0.9, 2.0), trial(0.9, 4.0)]},
                        "plain": {1: [trial(0.9, 0.0), trial(0.9, 1.0)]}}}
    assert choose_priors(results["val"]) == {"deformed": {1: 0.25}, "plain": {1: 0.75}}
    test_deformed = summarise(results["test"]["deformed"][1], 0.25)["all_prior"]["top1"]["trials"]
    assert test_deformed == [25.0 + 2.0, 25.0 + 4.0]  # 100 * mu + offset at mu = 0.25
    test_plain = summarise(results["test"]["plain"][1], 0.75)["all_prior"]["top1"]["trials"]
    assert test_plain == [75.0, 76.0]
    paired = difference(results["test"]["deformed"][1], results["test"]["plain"][1], 0.25, 0.75)
    assert paired["all_prior"]["top1"]["trials"] == [27.0 - 75.0, 29.0 - 76.0]
