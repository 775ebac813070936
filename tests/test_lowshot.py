"""The ImageNet-1K low-shot benchmark: its files, its metrics, the feature files, the refusals and the
run lock in-process, and the whole chain (stage 1 and stage 2 on the base classes, then
``lowshot_imagenet.py``) on a toy benchmark (``slow``)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from datasets.episodes import AugmentDraws, CroppedImages
from datasets.gallery import Gallery
from datasets.lowshot import (
    RECONSTRUCTION_WARNING,
    benchmark_split,
    read_lowshot_meta,
    read_train_list,
    read_trial,
    rebuild_train_list,
    shot_indices,
)
from datasets.seeding import item_rng
from datasets.toy import generate_lowshot
from datasets.transforms import normalize_uint8
from engine.episode import EpisodeConfig, GalleryBank
from engine.features import FeatureCache
from engine.lowshot import (
    FeatureStore,
    choose_priors,
    deformed_prototypes,
    difference,
    lowshot_config,
    shortlisted_gallery,
    summarise,
    trial_metrics,
)
from engine.options import lowshot_eval_config, lowshot_parser
from engine.run import lock_run, release_run
from models import EmbeddingNet, IDeMeNet, load_idemenet
from models.protonet import prototypes, squared_distances
from tests.scripts_helpers import REPO, free_port, load_script, run_script, script_env
from utils import distributed
from utils.distributed import DistInfo
from utils.errors import DataError
from utils.forward import layout_model
from utils.interrupt import Interrupted
from utils.lowshot_metrics import (
    PRIOR_GRID,
    TEMPERATURE_GRID,
    best_prior,
    lowshot_metrics,
    prior_curve,
    prior_scores,
    topk_accuracy,
)
from utils.options import run_cli

SIZE = "32"
PER_LIST = 5  # classes in each of base_1, base_2, novel_1, novel_2
TRAIN_PER_CLASS = 22
VAL_PER_CLASS = 6  # stage 1's val monitor needs 5 support + 1 query images per class
LOWSHOT = ["--imagenet", "bench", "--lowshotmeta", "bench/label_idx.json", "--experimentpath",
           "bench/splitfile_{:d}.json", "--trainlist", "bench/train.json", "--imageSize", SIZE, "--galleryNum", "4",
           "--nthreads", "0", "--progress", "0", "--device", "cpu", "--trials", "1", "2", "--lowshotn", "1", "2"]
PAPER_NOVEL_TOP5 = {1: "60.1", 2: "69.6"}  # IDeMe-Net, CVPR 2019, Table 2 (docs/original.md §4.10)


lowshot_imagenet, onlyBasetwoLoss = load_script("lowshot_imagenet.py"), load_script("onlyBasetwoLoss.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowshot")
    generate_lowshot(root / "bench", classes_per_list=PER_LIST, train_per_class=TRAIN_PER_CLASS,
                     val_per_class=VAL_PER_CLASS, size=int(SIZE))
    return root


@pytest.fixture(scope="module")
def meta(workdir):
    return read_lowshot_meta(workdir / "bench/label_idx.json")


@pytest.fixture(scope="module")
def random_gnet(workdir):
    """A stage-2 checkpoint of random weights for the 10 base classes: ``models/random_gnet.t7``."""
    torch.manual_seed(0)
    (workdir / "models").mkdir(exist_ok=True)
    torch.save(IDeMeNet(2 * PER_LIST, image_size=int(SIZE)).state_dict(), workdir / "models/random_gnet.t7")
    return "random_gnet"


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
    assert topk_accuracy(prior_scores(SCORES, 4, 0.9), TARGETS, 1) == 50.0  # rows 0 and 1
    assert topk_accuracy(prior_scores(SCORES, 4, 0.1), TARGETS, 1) == 25.0  # row 3
    # a temperature divides the scores before each part's softmax: row 1's base part [0, -1, -2, -3] / 2
    base = torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)])
    assert torch.allclose(prior_scores(SCORES, 4, 0.3, temperature=2.0)[1, :4].exp(), 0.7 * base / base.sum())


def saturated_scores() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prototype scores ``-10 * ||x - p||^2`` of 200 test images (20 per class) over 10 base and 10
    novel classes, in the hundreds as the benchmark's are: base prototypes near their class centres,
    novel ones (few shots) far off."""
    generator = torch.Generator().manual_seed(0)
    classes, per, dim = 20, 10, 16
    centres = torch.randn(classes, dim, generator=generator)
    test = centres.repeat_interleave(per, 0) + 0.9 * torch.randn(classes * per, dim, generator=generator)
    noise = torch.cat([torch.full((10, 1), 0.1), torch.full((10, 1), 0.9)])
    protos = centres + noise * torch.randn(classes, dim, generator=generator)
    return -10 * squared_distances(test, protos), torch.arange(classes).repeat_interleave(per), 10


def test_prior_curve_is_the_full_ranking_at_every_temperature_and_mu():
    scores, targets, num_base = saturated_scores()
    curves = prior_curve(scores, targets, num_base)
    assert len(curves) == len(TEMPERATURE_GRID) and all(len(curve) == len(PRIOR_GRID) for curve in curves)
    for t, temperature in enumerate(TEMPERATURE_GRID):
        for m, mu in enumerate(PRIOR_GRID):
            expected = {k: topk_accuracy(prior_scores(scores, num_base, mu, temperature), targets, k) for k in (1, 5)}
            assert all(isinstance(hits, int) for hits in curves[t][m].values())
            assert {k: 100 * hits / len(targets) for k, hits in curves[t][m].items()} == expected, (temperature, mu)


def test_a_temperature_makes_mu_act_where_the_one_hot_softmax_does_not():
    scores, targets, num_base = saturated_scores()
    assert scores.std(1).mean() > 100  # saturated: the softmax over each part is one-hot at T = 1
    curves = prior_curve(scores, targets, num_base)
    one_hot = curves[TEMPERATURE_GRID.index(1.0)]
    base_only = int((scores[:, :num_base].argmax(1) == targets).sum())
    image = 1  # the curves count test images
    inside = [m for m, mu in enumerate(PRIOR_GRID) if 0 < mu < 1]
    # T = 1: every mu < 0.5 ranks like base-only (to within one image), and top-5 moves by at most two images
    # over mu in (0, 1): the choice of mu falls to single images
    assert all(abs(one_hot[m][1] - base_only) <= image + 1e-6 for m, mu in enumerate(PRIOR_GRID) if 0 < mu < 0.5)
    assert max(one_hot[m][5] for m in inside) - min(one_hot[m][5] for m in inside) <= 2 * image + 1e-6
    temperature, mu = best_prior([curves])
    chosen = curves[TEMPERATURE_GRID.index(temperature)]
    assert temperature > 1
    assert chosen[PRIOR_GRID.index(mu)][5] >= max(point[5] for point in one_hot) + 3 * image
    assert max(chosen[m][5] for m in inside) - min(chosen[m][5] for m in inside) >= len(targets) / 10  # here mu acts


def test_best_prior_takes_the_best_mean_then_the_smallest_temperature_and_mu_on_ties():
    temperatures, grid = (1.0, 10.0), (0.0, 0.5, 1.0)
    trial_a = [[{5: 10.0}, {5: 30.0}, {5: 30.0}], [{5: 20.0}, {5: 40.0}, {5: 10.0}]]
    trial_b = [[{5: 20.0}, {5: 30.0}, {5: 30.0}], [{5: 20.0}, {5: 30.0}, {5: 10.0}]]
    assert best_prior([trial_a, trial_b], temperatures, grid) == (10.0, 0.5)  # mean 35 beats 30
    tied = [[{5: 1.0}, {5: 2.0}, {5: 2.0}], [{5: 2.0}, {5: 1.0}, {5: 1.0}]]
    assert best_prior([tied], temperatures, grid) == (1.0, 0.5)


def trials_of_one_setup(seed: int, trials: int = 3) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Prototype scores of ``trials`` trials (other novel prototypes each) on the same 36 test images of
    6 base and 6 novel classes."""
    generator = torch.Generator().manual_seed(seed)
    classes, per, dim, num_base = 12, 3, 8, 6
    centres = torch.randn(classes, dim, generator=generator)
    test = centres.repeat_interleave(per, 0) + torch.randn(classes * per, dim, generator=generator)
    noise = torch.cat([torch.full((num_base, 1), 0.3), torch.full((classes - num_base, 1), 1.2)])
    scores = [-3 * squared_distances(test, centres + noise * torch.randn(classes, dim, generator=generator))
              for _ in range(trials)]
    return scores, torch.arange(classes).repeat_interleave(per), num_base


@pytest.mark.parametrize("seed", [16, 42])
def test_the_prior_is_chosen_on_exact_hit_counts_with_the_documented_tie_rule(seed):
    """The most top-5 hits over the trials, then the smallest temperature, then the smallest mu, with the
    hits counted here from the full ranking (:func:`prior_scores`). These draws hold two points of equal
    total hits whose accuracies, summed as float32 fractions, differ in the last bits."""
    scores, targets, num_base = trials_of_one_setup(seed)
    total = {}
    for t, temperature in enumerate(TEMPERATURE_GRID):
        for m, mu in enumerate(PRIOR_GRID):
            ranked = [prior_scores(s, num_base, mu, temperature) for s in scores]
            total[t, m] = sum(int(((r >= r.gather(1, targets[:, None])).sum(1) - 1 < 5).sum()) for r in ranked)
    t, m = max(total, key=lambda point: (total[point], -point[0], -point[1]))
    assert sum(count == total[t, m] for count in total.values()) > 1  # a tie to break
    assert best_prior([prior_curve(s, targets, num_base) for s in scores]) == (TEMPERATURE_GRID[t], PRIOR_GRID[m])


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
    images = read_train_list(workdir / "bench/train.json", workdir / "bench/train", meta)
    trial = read_trial(workdir / "bench/splitfile_3.json", meta, images, 20)
    raw = json.loads((workdir / "bench/splitfile_3.json").read_text())
    novel = meta.lists["novel_classes_2"]
    for n in (1, 2, 5, 20):
        picked = shot_indices(trial, novel, n)
        assert picked.shape == (len(novel), n)
        assert picked.tolist() == [raw[k][:n] for k in novel]
        assert all(images.files[i].parent.name == meta.label_names[k] for k, row in zip(novel, picked) for i in row)


def test_the_release_list_gives_the_benchmarks_shots_and_the_rebuilt_list_others(workdir, meta):
    """ILSVRC file numbers are not zero-padded: the release's list (train.json, file k of a class at offset k)
    and the name-sorted reconstruction give the split files' indices other images."""
    release = read_train_list(workdir / "bench/train.json", workdir / "bench/train", meta)
    rebuilt = rebuild_train_list(workdir / "bench/train", meta)
    raw = json.loads((workdir / "bench/splitfile_1.json").read_text())
    differ = 0
    for k, wnid in enumerate(meta.label_names):
        first = raw[k][0]
        assert release.files[first].name == f"{wnid}_{first - k * TRAIN_PER_CLASS}.JPEG"
        differ += rebuilt.files[first] != release.files[first]
    assert differ >= len(meta.label_names) // 2


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
    (lambda m: m["base_classes_2"].append(m["base_classes_1"][0]), "in both base_classes_1 and base_classes_2"),
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


def _damage_row(path: Path, k: int, change) -> None:
    rows = json.loads(path.read_text())
    change(rows[k])
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize("change, message", [
    (lambda row: row.__setitem__(4, row[1]), "listed more than once"),  # within the first 5: a 5-shot set of 4 images
    (lambda row: row.__setitem__(19, row[19] + 10 * TRAIN_PER_CLASS), "outside"),  # past the largest n
    (lambda row: row.__setitem__(19, -1), "outside"),
    (lambda row: row.__setitem__(7, 3.0), "integer"),
    (lambda row: row.__setitem__(slice(1, None), []), "fewer than the 2"),
])
def test_every_index_of_a_split_file_row_is_checked(workdir, meta, tmp_path, change, message):
    images = read_train_list(workdir / "bench/train.json", workdir / "bench/train", meta)
    path = tmp_path / "splitfile_1.json"
    shutil.copy(workdir / "bench/splitfile_1.json", path)
    k = meta.lists["base_classes_1"][2]
    read_trial(path, meta, images, 2)  # intact
    _damage_row(path, k, change)
    with pytest.raises(DataError, match=message) as error:
        read_trial(path, meta, images, 2)
    assert str(path) in str(error.value) and f"class {k} ({meta.label_names[k]})" in str(error.value)


def test_stage_splits_are_the_base_classes_and_each_setups_novel_classes(workdir, meta):
    train = benchmark_split(workdir / "bench", meta, "train")
    assert set(train.classes) == set(meta.wnids("base_classes")) and list(train.classes) == sorted(train.classes)
    assert set(benchmark_split(workdir / "bench", meta, "val").classes) == set(meta.wnids("novel_classes_1"))
    test = benchmark_split(workdir / "bench", meta, "test")
    assert set(test.classes) == set(meta.wnids("novel_classes_2"))
    assert all(f.parent.parent.name == "val" for files in test.files for f in files)


def test_the_evaluations_settings_are_its_flags_with_the_device_and_shot_defaults_resolved():
    argv = ["--imagenet", "i", "--lowshotmeta", "m", "--experimentpath", "e_{:d}", "--tensorname", "t", "--GNet", "g",
            "--chooseNum", "9", "--trials", "2", "4"]
    config = lowshot_eval_config(torch.device("cpu"), **vars(lowshot_parser().parse_args(argv)))
    assert asdict(config) == {**vars(lowshot_parser().parse_args(argv)), "batchSize": 16}  # the CPU's chunk
    one, two = lowshot_config(config, 1, 5), lowshot_config(config, 2, 5)
    assert (one.augnum, one.choose_num, two.augnum, two.choose_num) == (7, 9, 5, 9)  # --chooseNum for every n
    assert (one.ways, one.chunk, one.deform, one.gallery_select) == (5, 16, "learned", "nearest")


# --- the scripts in-process: refusals, the warning, the run lock ------------------------------------------------------

def _copy_bench(workdir, tmp_path, model: str):
    shutil.copytree(workdir / "bench", tmp_path / "bench", symlinks=True)
    (tmp_path / "models").mkdir()
    shutil.copy(workdir / f"models/{model}.t7", tmp_path / "models")
    return tmp_path


def _run_in(work: Path, monkeypatch, capsys, script, argv: list[str]) -> tuple[int, str, str]:
    """``script``'s command line in-process in ``work`` -> (exit status, stdout, stderr)."""
    monkeypatch.chdir(work)
    status = run_cli(script.main, script.get_args_parser(), argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def _refused(work: Path, monkeypatch, capsys, script, argv: list[str], run: str = "bad") -> str:
    status, _, err = _run_in(work, monkeypatch, capsys, script, argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert not (work / "runs" / run).exists()  # nothing written, no lock taken
    return lines[0]


@pytest.mark.parametrize("damage, words", [
    (lambda b, m: (b / "label_idx.json").write_text(json.dumps({
        **json.loads((b / "label_idx.json").read_text()),
        "base_classes_2": m.lists["base_classes_2"] + (m.lists["base_classes_1"][0],)})),
     ("label_idx.json", "in both base_classes_1 and base_classes_2")),
    (lambda b, m: _damage_row(b / "splitfile_2.json", m.lists["novel_classes_2"][0],
                              lambda row: row.__setitem__(1, row[0])), ("splitfile_2.json", "more than once")),
    (lambda b, m: _damage_row(b / "splitfile_1.json", m.lists["novel_classes_1"][3],
                              lambda row: row.__setitem__(19, 0 if row[19] >= TRAIN_PER_CLASS else TRAIN_PER_CLASS)),
     ("splitfile_1.json", "outside")),
    (lambda b, m: (b / "splitfile_1.json").write_text(
        json.dumps(json.loads((b / "splitfile_1.json").read_text())[:-1])),
     ("splitfile_1.json", f"{4 * PER_LIST}")),
    (lambda b, m: shutil.rmtree(b / "train" / m.label_names[m.lists["novel_classes_2"][0]]),
     ("label_idx.json", "missing")),
    (lambda b, m: (b / "train.json").write_text("{"), ("train.json", "JSON")),
])
def test_lowshot_imagenet_refuses_bad_files_with_one_line_before_writing(workdir, meta, random_gnet, tmp_path,
                                                                         monkeypatch, capsys, damage, words):
    work = _copy_bench(workdir, tmp_path, random_gnet)
    damage(work / "bench", meta)
    line = _refused(work, monkeypatch, capsys, lowshot_imagenet, [*LOWSHOT, "--GNet", random_gnet,
                                                                  "--tensorname", "bad"])
    assert line.startswith("error: ") and all(word in line for word in words), line


def test_lowshot_imagenet_refuses_a_shortlist_larger_than_the_gallery_before_writing(workdir, random_gnet,
                                                                                      monkeypatch, capsys):
    line = _refused(workdir, monkeypatch, capsys, lowshot_imagenet, [*LOWSHOT, "--GNet", random_gnet, "--chooseNum",
                                                                     "41", "--tensorname", "bad"])
    assert "--chooseNum 41" in line and "40-image gallery" in line  # 4 images x 10 base classes


def test_the_gallery_refusal_names_the_flag_that_was_set(workdir, random_gnet, monkeypatch, capsys):
    line = _refused(workdir, monkeypatch, capsys, lowshot_imagenet, [*LOWSHOT, "--GNet", random_gnet, "--galleryNum",
                                                                     "2", "--tensorname", "bad"])
    assert line == ("error: --galleryNum 2 makes a 20-image gallery, fewer than the 30 nearest images the default "
                    "--chooseNum takes for n = 2; give a larger --galleryNum or a smaller --chooseNum")


def test_a_flat_val_folder_is_refused_pointing_to_the_folding_script(workdir, meta, random_gnet, tmp_path,
                                                                     monkeypatch, capsys):
    work = _copy_bench(workdir, tmp_path, random_gnet)
    val = work / "bench/val"
    for path in sorted(val.glob("*/*.JPEG")):
        path.rename(val / path.name)
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
    line = _refused(work, monkeypatch, capsys, lowshot_imagenet, [*LOWSHOT, "--GNet", random_gnet,
                                                                  "--tensorname", "bad"])
    assert line == (f"error: {Path('bench/val')}: the ILSVRC val images lie flat, not in <wnid>/ class folders; fold "
                    f"them with python -m scripts.fold_imagenet_val --val {Path('bench/val')} --devkit DEVKIT (or "
                    "--labels FILE)")


def test_stage2_refuses_selecting_on_the_test_setup(workdir, random_gnet, monkeypatch, capsys):
    line = _refused(workdir, monkeypatch, capsys, onlyBasetwoLoss, [
        "--dataroot", "bench", "--lowshotmeta", "bench/label_idx.json", "--imageSize", SIZE, "--GNet", random_gnet,
        "--selectOn", "test", "--device", "cpu", "--tensorname", "bad"])
    assert "--selectOn test" in line and "--lowshotmeta" in line


def test_lowshot_imagenet_warns_first_without_the_release_list_and_releases_its_lock(workdir, random_gnet,
                                                                                      monkeypatch, capsys):
    argv = [a for a in LOWSHOT if a not in ("--trainlist", "bench/train.json")]
    argv[argv.index("--trials") + 1:argv.index("--trials") + 3] = ["1"]
    status, out, err = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet, [
        *argv, "--network", random_gnet, "--deform", "none", "--testsetup", "0", "--tensorname", "warned"])
    assert status == 0, err
    assert err.splitlines()[0] == f"warning: {RECONSTRUCTION_WARNING}"
    report = json.loads((workdir / "runs/warned/lowshot_imagenet.json").read_text())
    assert report["train_list_reconstructed"] and report["train_list_warning"] == RECONSTRUCTION_WARNING
    assert out.splitlines()[0].endswith("train list reconstructed") and f"warning: {RECONSTRUCTION_WARNING}" in out
    assert (workdir / "runs/warned/.lock").read_text() == ""  # released at the end: nobody to take over from
    release_run(lock_run(workdir / "runs/warned"))
    assert "taking over" not in capsys.readouterr().out


def test_a_single_trial_report_is_json_without_nan(workdir, random_gnet, monkeypatch, capsys):
    argv = [*LOWSHOT, "--trials", "1", "--lowshotn", "1", "--testsetup", "0", "--GNet", random_gnet,
            "--tensorname", "single"]
    status, out, err = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet, argv)
    assert status == 0, err
    text = (workdir / "runs/single/lowshot_imagenet.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    for method in ("plain", "deformed", "difference"):
        novel = report["setups"]["val"][method]["1"]["novel"]["top5"]
        assert novel["t_ci95"] is None and novel["mean"] == novel["trials"][0]
    assert "+-" not in next(line for line in out.splitlines() if line.startswith("prototypes (no deformation)"))


def test_lowshot_imagenet_and_stage2_evaluate_take_the_run_lock(workdir, random_gnet, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    held = lock_run(Path("runs/busy"))
    try:
        lowshot = [*LOWSHOT, "--GNet", random_gnet, "--tensorname", "busy"]
        stage2 = ["--dataroot", "bench", "--lowshotmeta", "bench/label_idx.json", "--imageSize", SIZE, "--GNet",
                  random_gnet, "--evaluate", "--galleryNum", "4", "--chooseNum", "6", "--testEpisodes", "2",
                  "--test_num", "2", "--nthreads", "0", "--progress", "0", "--device", "cpu", "--tensorname", "busy"]
        for script, argv in ((lowshot_imagenet, lowshot), (onlyBasetwoLoss, stage2)):
            status, _, err = _run_in(workdir, monkeypatch, capsys, script, argv)
            assert status == 2 and err.strip() == (f"error: {Path('runs/busy')} is in use by process {os.getpid()} on "
                                                   f"{socket.gethostname()}; wait for it to end or choose another "
                                                   "--tensorname"), err
            assert os.listdir(workdir / "runs/busy") == [".lock"]  # nothing written
    finally:
        release_run(held)
    status, _, err = _run_in(workdir, monkeypatch, capsys, onlyBasetwoLoss, stage2)
    assert status == 0, err
    assert (workdir / "runs/busy/evaluate_1shot_seed0.json").is_file()
    assert (workdir / "runs/busy/.lock").read_text() == ""


def test_a_stop_during_the_trials_keeps_the_finished_ones_for_the_rerun(workdir, random_gnet, monkeypatch, capsys):
    """SIGTERM as the third step (val setup, trial 2, n = 1) computes its first variant: the run stops after
    that step with status 130; the rerun computes the five steps left (two variants each) and reports
    what an uninterrupted run does. A step saved with another --seed is computed again."""
    argv = [*LOWSHOT, "--GNet", random_gnet]  # 2 setups x 2 trials x n = 1, 2: 8 steps
    status, _, err = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet, [*argv, "--tensorname", "nonstop"])
    assert status == 0, err
    calls, signal_at = [], [5]

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) in signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return trial_metrics(*args, **kwargs)

    monkeypatch.setattr("engine.lowshot.trial_metrics", counted)
    status, out, _ = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet, [*argv, "--tensorname", "stopped"])
    assert status == 130 and len(calls) == 6
    assert out.splitlines()[-1] == ("stopped in the val setup, after trial 2, n = 1; the finished feature files and "
                                    "trials are kept (the same command continues from them)")
    calls.clear()
    signal_at.clear()
    status, out, err = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet, [*argv, "--tensorname", "stopped"])
    assert status == 0, err
    assert len(calls) == 2 * 5 and "3 finished (setup, trial, n) steps reused" in out
    reports = [json.loads((workdir / f"runs/{name}/lowshot_imagenet.json").read_text()) for name in ("nonstop",
                                                                                                       "stopped")]
    for report in reports:
        del report["timing"]
    assert reports[1] == reports[0]
    calls.clear()
    status, _, err = _run_in(workdir, monkeypatch, capsys, lowshot_imagenet,
                             [*argv, "--seed", "1", "--tensorname", "stopped"])
    assert status == 0, err
    assert len(calls) == 2 * 8


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
    for create in (True, False):  # every process of a distributed run refuses it, not only the main one
        with pytest.raises(DataError, match="another image list"):
            FeatureStore(tmp_path / "parts", files[:-1], int(SIZE), block=8, create=create)
    FeatureStore(tmp_path / "fresh", files, int(SIZE), block=8, create=False)
    assert not (tmp_path / "fresh").exists()  # only the main process writes the manifest


def _two_process_worker(rank: int, ports: list[int], workdir: str, gnet: str, out: str) -> None:
    """One of two processes (gloo) running lowshot_imagenet.py's ``main`` as torchrun would, twice: in the
    first run rank 0 gets SIGTERM as the second feature store starts (the first one is finished)."""
    os.chdir(workdir)
    torch.set_num_threads(1)
    distributed.PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)  # a process left waiting fails the test, soon
    extract, calls = FeatureStore.extract, iter(range(100))

    def signalled(self, *args, **kwargs):
        if rank == 0 and next(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to the script's graceful stop
        return extract(self, *args, **kwargs)

    FeatureStore.extract = signalled
    blocks = Path("runs/two/features")
    result = []
    for port in ports:
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            status = run_cli(lowshot_imagenet.main, lowshot_imagenet.get_args_parser(),
                             [*LOWSHOT, "--GNet", gnet, "--deform", "none", "--tensorname", "two"])
        result.append({"status": status, "stdout": stdout.getvalue(),
                       "blocks": {str(path.relative_to(blocks)): path.stat().st_mtime_ns
                                  for path in sorted(blocks.glob("*/*/block_*.pt"))}})
    torch.save(result, f"{out}/rank{rank}.pt")


def test_a_signal_to_one_of_two_processes_stops_both_in_the_extraction_then_the_rerun_resumes(workdir, random_gnet,
                                                                                              tmp_path):
    mp.spawn(_two_process_worker, args=([free_port(), free_port()], str(workdir), random_gnet, str(tmp_path)),
             nprocs=2, join=True)
    first, second = zip(*[torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)])
    assert [run["status"] for run in first] == [130, 130]
    assert "stopped while extracting the novel_train features (finished blocks are kept)" in first[0]["stdout"]
    assert ("stopped while extracting the novel_train features (another process was stopped; finished blocks are "
            "kept)") in first[1]["stdout"]
    kept = first[0]["blocks"]
    assert [Path(name).parts[1].split("_")[:2] for name in kept] == [["base", "train"]]  # the finished store only
    assert [run["status"] for run in second] == [0, 0]
    assert {name: second[0]["blocks"][name] for name in kept} == kept  # not recomputed
    assert len(second[0]["blocks"]) == 4  # every store, one block each
    report = json.loads((workdir / "runs/two/lowshot_imagenet.json").read_text())
    assert report["timing"]["processes"] == 2


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
    whole = EpisodeConfig(len(novel), 5, 6, chunk=16)
    draws = AugmentDraws(whole, len(bank), 9).draw(item_rng(0, 3, 0, 1, shots), len(files))
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
    """Synthetic trial results: the val curves peak at (T 20, mu 0.25) (deformed) and (T 1, mu 0.75)
    (plain); the test setup's all_prior is its own curve read at those points, and the paired difference
    uses both."""
    def trial(peak: tuple[float, float], offset: float) -> dict:
        flat = {metric: {1: 10.0 + offset, 5: 20.0 + offset} for metric in ("novel", "novel_joint", "base", "all")}
        curve = [[{1: 100 * mu + temperature + offset, 5: 90.0 if (temperature, mu) == peak else 10.0}
                  for mu in PRIOR_GRID] for temperature in TEMPERATURE_GRID]
        return {**flat, "prior_curve": curve, "test_images": 100}  # hits out of 100 test images: % as they are

    results = {"val": {"deformed": {1: [trial((20.0, 0.25), 0.0), trial((20.0, 0.25), 1.0)]},
                       "plain": {1: [trial((1.0, 0.75), 0.0), trial((1.0, 0.75), 1.0)]}},
               "test": {"deformed": {1: [trial((5.0, 0.9), 2.0), trial((5.0, 0.9), 4.0)]},
                        "plain": {1: [trial((5.0, 0.9), 0.0), trial((5.0, 0.9), 1.0)]}}}
    assert choose_priors(results["val"]) == {"deformed": {1: (20.0, 0.25)}, "plain": {1: (1.0, 0.75)}}
    test_deformed = summarise(results["test"]["deformed"][1], (20.0, 0.25))["all_prior"]["top1"]["trials"]
    assert test_deformed == [25.0 + 20.0 + 2.0, 25.0 + 20.0 + 4.0]  # 100 * mu + T + offset
    test_plain = summarise(results["test"]["plain"][1], (1.0, 0.75))["all_prior"]["top1"]["trials"]
    assert test_plain == [76.0, 77.0]
    paired = difference(results["test"]["deformed"][1], results["test"]["plain"][1], (20.0, 0.25), (1.0, 0.75))
    assert paired["all_prior"]["top1"]["trials"] == [47.0 - 76.0, 49.0 - 77.0]


def test_trial_intervals_are_t_intervals_by_hand():
    """Five trials 40, 42, 44, 46, 48: mean 44, sample std sqrt(10); t(0.975, 4) = 2.7764451 (tables),
    half-width 2.7764451 * sqrt(10) / sqrt(5) = 3.9265 (1.96 * population std / sqrt(5) would be 2.479)."""
    trials = [{metric: {1: value, 5: value} for metric in ("novel", "novel_joint", "base", "all")}
              | {"prior_curve": [[{1: value, 5: value}] * len(PRIOR_GRID)] * len(TEMPERATURE_GRID), "test_images": 100}
              for value in (40.0, 42.0, 44.0, 46.0, 48.0)]
    summary = summarise(trials, (1.0, 0.5))
    for metric in ("novel", "all_prior"):
        assert summary[metric]["top5"]["mean"] == pytest.approx(44.0)
        assert summary[metric]["top5"]["t_ci95"] == pytest.approx(2.7764451 * math.sqrt(2), abs=1e-6)
    one = summarise(trials[:1], (1.0, 0.5))
    assert one["novel"]["top1"]["t_ci95"] is None and one["novel"]["top1"]["mean"] == 40.0  # one trial: no interval
    json.dumps(one, allow_nan=False)


# --- the whole chain, as processes (slow) -----------------------------------------------------------------------------

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_lowshot_report_holds_every_metric_and_the_paired_difference(evaluated):
    result, report = evaluated
    assert set(report["setups"]) == {"val", "test"} and not report["train_list_reconstructed"]
    assert "warning" not in result.stderr and report["train_list_warning"] is None
    test = report["setups"]["test"]
    sizes = (test["novel_classes"], test["base_classes"], test["test_images"])
    assert sizes == (PER_LIST, PER_LIST, 2 * PER_LIST * VAL_PER_CLASS)
    for n in ("1", "2"):
        for metric in ("novel", "novel_joint", "base", "all", "all_prior"):
            for k in ("top1", "top5"):
                plain = test["plain"][n][metric][k]["trials"]
                deformed = test["deformed"][n][metric][k]["trials"]
                assert len(plain) == 2 and all(0 <= v <= 100 for v in plain + deformed)
                if metric != "all_prior":
                    assert test["difference"][n][metric][k]["trials"] == pytest.approx(
                        [d - p for d, p in zip(deformed, plain)])
                # two trials: t(0.975, 1) = 12.7062047 times the sample std / sqrt(2) = |a - b| / 2
                assert test["plain"][n][metric][k]["t_ci95"] == pytest.approx(12.7062047 * abs(plain[0] - plain[1]) / 2,
                                                                              abs=1e-5)
        assert test["plain"][n]["novel"]["top5"]["mean"] == pytest.approx(np.mean(test["plain"][n]["novel"]["top5"]
                                                                                   ["trials"]))
    for variant in ("plain", "deformed"):
        assert set(report["prior_mu"][variant]) == set(report["prior_temperature"][variant]) == {"1", "2"}
        assert all(mu in PRIOR_GRID for mu in report["prior_mu"][variant].values())
        assert all(t in TEMPERATURE_GRID for t in report["prior_temperature"][variant].values())


@pytest.mark.slow
def test_printed_table_shows_the_reports_numbers_under_their_n(evaluated):
    """The first table: per method, the novel top-5 mean +- t-interval of the report for each n, in its
    column, and the paper's Table 2 numbers under the same n."""
    result, report = evaluated
    lines = result.stdout.splitlines()
    assert "2 trial(s), mean +- 95% t-interval, train list from the release" in lines[0]
    header = lines[lines.index("top-5 accuracy on the novel classes (%)") + 1]
    assert header.split() == ["n=1", "n=2"]
    test = report["setups"]["test"]
    for label, method in (("prototypes (no deformation)", "plain"), ("IDeMe-Net (deformed examples)", "deformed"),
                          ("difference (paired)", "difference")):
        row = next(line for line in lines if line.startswith(label))
        cells = [row[34 + 16 * i:34 + 16 * (i + 1)].strip() for i in range(2)]
        top5 = [test[method][n]["novel"]["top5"] for n in ("1", "2")]
        assert cells == [f"{values['mean']:.2f} +- {values['t_ci95']:.2f}" for values in top5], row
    paper = next(line for line in lines if line.startswith("IDeMe-Net, paper (Table 2)"))
    assert [paper[34 + 16 * i:34 + 16 * (i + 1)].strip() for i in range(2)] == [PAPER_NOVEL_TOP5[n] for n in (1, 2)]


def _embedder(model):
    """The network's features of uint8 images, computed two at a time as the scripts' batches are
    (a single image is embedded inside a pair), rounded to float16 like the feature files."""
    def embed(images: torch.Tensor, half: bool = True) -> torch.Tensor:
        with torch.no_grad():
            features = torch.cat([model.embed(images[i:i + 2]) if len(images[i:i + 2]) == 2 else
                                  model.embed(images[i:i + 1].expand(2, -1, -1, -1))[:1]
                                  for i in range(0, len(images), 2)])
        return features.half().float() if half else features
    return embed


def _crops(paths) -> torch.Tensor:
    return normalize_uint8(torch.stack([CroppedImages(paths, int(SIZE))[i] for i in range(len(paths))]))


@pytest.fixture(scope="module")
def independent(trained, meta):
    """What the evaluation of the test setup needs, recomputed here from the files and the network:
    the release list's files, base prototypes (every training image), test features and targets."""
    model = load_idemenet(trained / "models/imagenet_1shot.t7", image_size=int(SIZE)).eval()
    embed = _embedder(model)
    bench = trained / "bench"
    release = json.loads((bench / "train.json").read_text())
    train_files = [bench / "train" / Path(name).parent.name / Path(name).name for name in release["image_names"]]
    base, novel = meta.lists["base_classes_2"], meta.lists["novel_classes_2"]
    base_protos = torch.stack([embed(_crops(sorted((bench / "train" / meta.label_names[k]).iterdir()))).mean(0)
                               for k in base])
    test_files, targets = [], []
    for column, k in enumerate(base + novel):
        for path in sorted((bench / "val" / meta.label_names[k]).iterdir()):
            test_files.append(path)
            targets.append(column)
    return {"model": model, "embed": embed, "train_files": train_files, "base": base, "novel": novel,
            "base_protos": base_protos, "test": embed(_crops(test_files)), "targets": torch.tensor(targets)}


def _check_metrics(got: dict, novel_protos: torch.Tensor, ref: dict, trial: int) -> None:
    protos = torch.cat([ref["base_protos"], novel_protos])
    scores = -ref["model"].scale.detach() * squared_distances(ref["test"], protos)
    expected = lowshot_metrics(scores, ref["targets"], len(ref["base"]))
    for metric in ("novel", "novel_joint", "base", "all"):
        assert got[metric]["top1"]["trials"][trial - 1] == pytest.approx(expected[metric][1], abs=1e-6), metric
        assert got[metric]["top5"]["trials"][trial - 1] == pytest.approx(expected[metric][5], abs=1e-6), metric


@pytest.mark.slow
def test_plain_scores_match_an_independent_computation(evaluated, independent, trained):
    """The plain metrics of trial 2, n = 2: first n images of the split file's rows in train.json's list
    per novel class, every training image per base class."""
    _, report = evaluated
    rows = json.loads((trained / "bench/splitfile_2.json").read_text())
    novel_protos = torch.stack([independent["embed"](_crops([independent["train_files"][i] for i in rows[k][:2]]))
                                .mean(0) for k in independent["novel"]])
    _check_metrics(report["setups"]["test"]["plain"]["2"], novel_protos, independent, trial=2)


@pytest.mark.slow
def test_deformed_scores_match_an_independent_computation(evaluated, independent, trained, meta):
    """The deformed metrics of trial 2, n = 2 (test setup), with the deformed prototypes built here from the
    same draws: for each support image (class by class) 5 copies, copy j blending the image (mirrored
    where drawn) with the gallery image the draw picks among its class's 30 nearest (mirrored where
    drawn), weights from the deformation network; prototype = mean of the 2 images and their 10 copies."""
    _, report = evaluated
    model, embed, shots, augnum, choose = independent["model"], independent["embed"], 2, 5, 30
    bench = trained / "bench"
    rows = json.loads((bench / "splitfile_2.json").read_text())
    support_files = [independent["train_files"][i] for k in independent["novel"] for i in rows[k][:shots]]
    support_images = _crops(support_files)
    support = embed(support_images)  # from the feature files: float16
    gallery = Gallery(benchmark_split(bench, meta, "train"), 4, int(SIZE), workers=0, progress=False)
    gallery_images = normalize_uint8(gallery.images)
    gallery_features = embed(gallery_images, half=False)
    # the draws of (seed 0, stream 3, test setup = 1, trial 2, n = 2), in their order
    rng = item_rng(0, 3, 1, 2, shots)
    total = len(support_files) * augnum
    probe_flip, pick = rng.random(total) < 0.5, rng.integers(choose, size=total)
    rng.integers(len(gallery), size=total)  # uniform gallery picks, unused with nearest selection
    gallery_flip = rng.random(total) < 0.5  # (the per-cell random weights come last, unused when learned)
    novel_protos = []
    for c in range(len(independent["novel"])):
        own = support[c * shots:(c + 1) * shots]
        distances = ((gallery_features - own.mean(0)) ** 2).sum(1)
        nearest = distances.argsort()[:choose]
        copies = []
        for s in range(shots):
            image = support_images[c * shots + s]
            for j in range(augnum):
                row = (c * shots + s) * augnum + j
                probe = image.flip(-1) if probe_flip[row] else image
                other = gallery_images[nearest[pick[row]]]
                other = other.flip(-1) if gallery_flip[row] else other
                copies.append((probe, other))
        with torch.no_grad():
            deformed, _ = model.deform(torch.stack([p for p, _ in copies]), torch.stack([o for _, o in copies]))
        novel_protos.append(torch.cat([own, embed(deformed, half=False)]).mean(0))
    _check_metrics(report["setups"]["test"]["deformed"]["2"], torch.stack(novel_protos), independent, trial=2)


@pytest.mark.slow
def test_prototype_baseline_from_a_stage1_checkpoint_warns_without_the_release_list(trained):
    argv = [a for a in LOWSHOT if a not in ("--trainlist", "bench/train.json")]
    result = run_script(trained, "lowshot_imagenet.py", *argv, "--network", "imagenet_stage1", "--deform", "none",
                        "--testsetup", "0", "--tensorname", "baseline")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"warning: {RECONSTRUCTION_WARNING}"
    report = json.loads((trained / "runs/baseline/lowshot_imagenet.json").read_text())
    assert set(report["setups"]) == {"val"} and "deformed" not in report["setups"]["val"]
    assert math.isfinite(report["setups"]["val"]["plain"]["1"]["all_prior"]["top5"]["mean"])
    assert (trained / "runs/baseline/lowshot_imagenet.csv").is_file()


@pytest.mark.slow
def test_reproduce_script_warns_without_the_release_list_and_redoes_only_the_steps_it_changes(tmp_path):
    """Run once without train.json (a warning first), again with it: the training steps, whose inputs and
    settings are the same, are reused; the evaluation, whose are not, runs again with the release's list.
    A third run reuses everything; a fourth, after the stage-1 network changed, trains stage 2 anew (not
    resuming the run of the old network) and evaluates it."""
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
    env = {**script_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # this interpreter's python
           "WORKDIR": str(tmp_path / "work"), "IMAGENET": str(tmp_path / "ILSVRC"), "LOWSHOT": str(lowshot),
           "VAL_LABELS": str(tmp_path / "val_labels.txt"), "DEVICE": "cpu", "THREADS": "0", "AMP": "0", "SIZE": SIZE,
           "EPOCHS1": "1", "BATCH1": "32", "EPOCHS2": "1", "EPISODES": "2", "VALEPISODES": "2", "GALLERY": "4",
           "TRIALS": "1", "LOWSHOTN": "1 2"}
    command = ["bash", str(REPO / "scripts/reproduce_imagenet_lowshot.sh")]
    path = tmp_path / "work/runs/imagenet_lowshot/lowshot_imagenet.json"
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stderr.splitlines()[0].startswith(f"warning: no {lowshot}/train.json and no TRAINLIST")
    assert "shots differ from the benchmark's" in first.stderr.splitlines()[0]
    assert len(list(val.glob("*/*.JPEG"))) == len(labels) and not list(val.glob("*.JPEG"))
    report = json.loads(path.read_text())
    assert report["trials"] == [1] and report["lowshotn"] == [1, 2] and report["train_list_reconstructed"]
    (tmp_path / "ILSVRC/train.json").rename(lowshot / "train.json")
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "warning" not in second.stderr and "folding" not in second.stdout
    skipped = [line for line in second.stdout.splitlines() if line.endswith("skipped")]
    assert skipped == [
        "== imagenet_stage1: runs/imagenet_stage1/summary.json exists with these inputs and settings, skipped",
        "== imagenet_metaNet: runs/imagenet_metaNet/evaluate_1shot_seed0.json exists with these inputs and settings, "
        "skipped"]
    assert "== imagenet_lowshot" in second.stdout.splitlines()
    report = json.loads(path.read_text())
    assert not report["train_list_reconstructed"] and report["train_list"] == f"release list {lowshot / 'train.json'}"
    written = path.stat().st_mtime_ns
    third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert [line for line in third.stdout.splitlines() if line.startswith("== ")] == [*skipped, (
        "== imagenet_lowshot: runs/imagenet_lowshot/lowshot_imagenet.json exists with these inputs and settings, "
        "skipped")]
    assert path.stat().st_mtime_ns == written
    stage1 = tmp_path / "work/models/imagenet_stage1.t7"
    weights = torch.load(stage1)
    weights["convnet.fc.weight"] += 1.0
    torch.save(weights, stage1)
    fourth = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert [line for line in fourth.stdout.splitlines() if line.startswith("== ")] == [
        skipped[0], "== imagenet_metaNet", "== imagenet_lowshot"]
    assert "resuming" not in fourth.stdout
    assert path.stat().st_mtime_ns > written
