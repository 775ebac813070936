"""What the deformation learns: the class relation of the gallery images it blends, the
deformed features' distances to the prototypes, ``--galleryExclude episode`` and the figure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import engine.diagnostics as diagnostics
import engine.stage2 as stage2
from conftest import make_episode, make_gallery, normalise, uint8_images
from engine.diagnostics import DeviceSums, columns, new_sums
from engine.episode import (
    EPISODE_CLASS,
    OTHER_CLASS,
    SAME_CLASS,
    EpisodeConfig,
    EpisodeResult,
    GalleryBank,
    gallery_relation,
    run_episode,
    select_gallery,
)
from engine.figures import RELATION_COLOURS, save_deformation_figure
from engine.options import stage2_config
from models import IDeMeNet
from models.protonet import prototypes
from tests.scripts_helpers import make_workdir, read_metrics, run_main
from utils.errors import OptionError

CPU = torch.device("cpu")
TINY = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--galleryNum", "3", "--chooseNum", "4",
        "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu",
        "--numEpochs", "2", "--epoch", "3", "--valEpisodes", "2", "--testEpisodes", "2"]


def result_with(gallery_index: list[int], deformed_labels: list[int]) -> EpisodeResult:
    return EpisodeResult(torch.tensor(0.0), None, torch.tensor(0.0), torch.tensor(0.0), None, None, None, None,
                         torch.tensor(gallery_index), torch.tensor(deformed_labels))


def test_gallery_relation_and_shares_on_a_constructed_episode() -> None:
    """Gallery labels 0 0 1 1 2 2 7 7; the episode's classes are 1 (label 0) and 2 (label 1)."""
    gallery_labels = torch.tensor([0, 0, 1, 1, 2, 2, 7, 7])
    classes = torch.tensor([1, 2])
    # copy 0 (class 1) <- gallery 2 (class 1): same; copy 1 (class 1) <- gallery 6 (class 7): other;
    # copy 2 (class 2) <- gallery 3 (class 1): another episode class; copy 3 (class 2) <- gallery 5: same;
    # copy 4 (class 2) <- gallery 0 (class 0): other
    result = result_with([2, 6, 3, 5, 0], [0, 0, 1, 1, 1])
    relation = gallery_relation(result, gallery_labels, classes)
    assert relation.tolist() == [SAME_CLASS, OTHER_CLASS, EPISODE_CLASS, SAME_CLASS, OTHER_CLASS]

    sums = new_sums()
    device_sums = DeviceSums(sums, CPU)
    device_sums.add(result, relation)
    device_sums.add(result_with([4, 4, 4], [1, 0, 1]),
                    gallery_relation(result_with([4, 4, 4], [1, 0, 1]), gallery_labels, classes))
    assert device_sums.read() is None  # finite losses
    row = columns(sums, "train")
    # same: 2 of the first five and 2 of the next three; another episode class: 1 + 1
    assert row["train_gallery_same_class"] == pytest.approx(4 / 8)
    assert row["train_gallery_episode_class"] == pytest.approx(2 / 8)
    assert row["train_own_distance"] == ""  # nothing measured, nothing claimed


def test_deformed_feature_distances_to_own_and_nearest_other_prototype() -> None:
    """A controlled episode: the distances in the result equal a direct computation over the
    deformed images' embeddings and the prototypes of the support images alone."""
    torch.manual_seed(0)
    ways, shots, augnum = 3, 2, 2
    model = IDeMeNet(num_classes=8, image_size=32).eval()
    images = uint8_images(16, seed=4)
    bank = GalleryBank(make_gallery(images, torch.arange(16) % 8), model, CPU, chunk=8)
    episode = make_episode(ways, shots, 2, augnum, 4, 16, 9, classes=[0, 3, 5], seed=8)
    result = run_episode(model, episode, bank, EpisodeConfig(ways, augnum, 4), CPU)
    with torch.no_grad():
        support = model.embed(normalise(episode["support"]))
        deformed = model.embed(result.deformed)
    protos = prototypes(support, episode["support_labels"], ways)
    own, other = [], []
    for feature, label in zip(deformed, episode["support_labels"].repeat_interleave(augnum)):
        distances = [((feature - protos[k]) ** 2).sum().item() for k in range(ways)]
        own.append(distances[label])
        other.append(min(d for k, d in enumerate(distances) if k != label))
    assert result.own_distance == pytest.approx(sum(own) / len(own), rel=1e-4)
    assert result.other_distance == pytest.approx(sum(other) / len(other), rel=1e-4)


def shortlist_classes(exclude: str) -> list[set[int]]:
    """Per class of a training episode (classes 1 and 4), the gallery classes of its shortlist, where
    the gallery images nearest to each prototype are those of its own class."""
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=6, image_size=32).eval()
    labels = torch.arange(24) % 6
    features = torch.randn(24, 512)
    classes = torch.tensor([1, 4])
    protos = torch.randn(2, 512)
    features[labels == 1] = protos[0] + 0.01 * torch.randn(4, 512)  # nearest to both prototypes
    features[labels == 4] = protos[1] + 0.01 * torch.randn(4, 512)
    bank = GalleryBank(make_gallery(uint8_images(24, seed=1), labels), model, CPU, chunk=8, features=features)
    choose = 6
    owner = torch.arange(2).repeat_interleave(choose)
    episode = {"classes": classes, "shortlist_pick": torch.arange(choose).repeat(2)}  # every shortlist entry
    config = EpisodeConfig(2, choose, choose, gallery_exclude=exclude)
    picked = select_gallery(protos, bank, torch.tensor(1.0), config, owner, episode)
    return [set(labels[picked[owner == k]].tolist()) for k in range(2)]


def test_exclude_episode_keeps_the_episode_classes_out_of_every_shortlist() -> None:
    for chosen in shortlist_classes("episode"):
        assert not chosen & {1, 4}


def test_by_default_the_shortlist_is_the_nearest_over_the_whole_gallery() -> None:
    """The original: the nearest images, here those of each prototype's own class, are shortlisted."""
    first, second = shortlist_classes("none")
    assert 1 in first and 4 in second


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("diagnostics"))


def hand_count(picks: list[tuple[list[int], list[int]]]) -> tuple[float, float]:
    """Shares of deformed images whose gallery image is of the probe's class / of another class of
    the episode, counted one by one from ``(gallery image classes, probe classes, episode classes)``."""
    same = other_episode_class = total = 0
    for gallery_classes, probe_classes, episode_classes in picks:
        for gallery_class, probe_class in zip(gallery_classes, probe_classes):
            total += 1
            if gallery_class == probe_class:
                same += 1
            elif gallery_class in episode_classes:
                other_episode_class += 1
    return same / total, other_episode_class / total


@pytest.mark.parametrize("exclude", ["none", "episode"])
def test_training_writes_the_diagnostic_columns(workdir, exclude, monkeypatch) -> None:
    """The gallery shares in metrics.csv equal a hand count over the gallery images each training
    episode picked (the gallery holds --galleryNum images of each base class, its classes known)."""
    picks = []

    def recording(model, episode, bank, config, device, **options):
        result = real_run_episode(model, episode, bank, config, device, **options)
        if "train_cls" in options:  # a training episode (engine.stage2.train_one_epoch)
            classes = episode["classes"].tolist()
            picks.append(([int(bank.gallery.labels[i]) for i in result.gallery_index.tolist()],
                          [classes[label] for label in result.deformed_labels.tolist()], classes))
        return result

    real_run_episode = stage2.run_episode
    monkeypatch.setattr(stage2, "run_episode", recording)
    name = f"diag_{exclude}"
    # Gallery features from the clean pass, like the support's: the original's training-mode pass normalises
    # each share of 32 gallery images (about one class) by its own statistics, so that nearest shortlists
    # need not find a probe's own class, which the last check below relies on.
    result = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", name, "--galleryExclude", exclude,
                      "--galleryBN", "eval")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(workdir / f"runs/{name}/metrics.csv")
    assert len(rows) == 2 and len(picks) == 2 * 3  # --numEpochs 2, --epoch 3
    for epoch, row in enumerate(rows):
        same, episode_class = hand_count(picks[3 * epoch: 3 * (epoch + 1)])
        assert float(row["train_gallery_same_class"]) == pytest.approx(same, rel=1e-5, abs=1e-9)  # 6 digits in the CSV
        assert float(row["train_gallery_episode_class"]) == pytest.approx(episode_class, rel=1e-5, abs=1e-9)
        for key in ("train_own_distance", "train_other_distance", "select_own_distance", "select_other_distance",
                    "select_weight_std"):
            assert float(row[key]) > 0, key
    same_overall, _ = hand_count(picks)
    if exclude == "episode":
        assert same_overall == 0
    else:
        assert same_overall > 0  # the nearest shortlist finds the probe's own class on this data
    assert (workdir / f"picture/{name}_deformed_train.png").is_file()
    assert (workdir / f"picture/{name}_deformed.png").is_file()


def test_exclude_episode_needs_the_nearest_shortlist() -> None:
    for flags in ({"gallerySelect": "random"}, {"deform": "none"}):
        with pytest.raises(OptionError, match="--galleryExclude episode"):
            stage2_config(CPU, tensorname="x", network="y", galleryExclude="episode", **flags)


def test_figure_frames_each_gallery_image_by_its_class_relation(tmp_path) -> None:
    size, n = 96, 3
    probes = normalise(uint8_images(n, seed=1)[:, :, :1, :1].expand(n, 3, size, size).contiguous())
    gallery = probes.clone()
    weights = torch.full((n, 9), 0.5)
    path = tmp_path / "figure.png"
    save_deformation_figure(path, probes, gallery, weights, probes, torch.tensor([SAME_CLASS, EPISODE_CLASS,
                                                                                  OTHER_CLASS]))
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
    for row, relation in enumerate([SAME_CLASS, EPISODE_CLASS, OTHER_CLASS]):
        top, left = 2 + row * (size + 2), 2 + (size + 2)  # the gallery tile: second column
        corner = image[top, left].float() / 255
        torch.testing.assert_close(corner, torch.tensor(RELATION_COLOURS[relation]), atol=0.01, rtol=0)
        probe_corner = image[top, 2 + 0].float() / 255
        assert not torch.allclose(probe_corner, torch.tensor(RELATION_COLOURS[relation]), atol=0.05)


def test_a_new_diagnostic_is_one_entry_and_its_sums_and_column_follow(monkeypatch) -> None:
    """An entry added to the table (the largest predicted weight of each episode) is summed on the device, read by
    the host with the others, counted, and given its column, with no other edit."""
    largest = diagnostics.Diagnostic("largest_weight", "weight_episodes",
                                     lambda r, _: None if r.weights is None else (r.weights.max(), 1),
                                     train="train_largest_weight")
    monkeypatch.setattr(diagnostics, "DIAGNOSTICS", (*diagnostics.DIAGNOSTICS, largest))
    sums = new_sums()
    device_sums = DeviceSums(sums, CPU)
    maxima = []
    for copies in (2, 3, 5):
        result = result_with(list(range(copies)), [0] * copies)
        result.weights = torch.rand(copies, 9)
        maxima.append(result.weights.max().item())
        device_sums.add(result)
    device_sums.add(result_with([1], [0]))  # no weights: not counted
    assert device_sums.read() is None
    assert sums["weight_episodes"] == 3
    assert columns(sums, "train")["train_largest_weight"] == pytest.approx(sum(maxima) / 3)
