"""``--scaleInit``: the scale the first training episode uses, the ``auto`` rule checked against
distances computed here, and the flag as a resume key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.stage2 as stage2
from datasets.transforms import prepare_images
from engine.options import stage2_config, stage2_parser
from models import load_embedding
from tests.scripts_helpers import make_workdir, run_main

CPU = torch.device("cpu")
TINY = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--galleryNum", "2", "--chooseNum", "3",
        "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu", "--epoch", "2",
        "--valEpisodes", "1", "--testEpisodes", "1", "--fixCls", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("scale_init"))


def first_training_scale(monkeypatch, workdir, *flags: str) -> float:
    """Run one stage-2 epoch with ``flags``; the scale as the first training episode ran."""
    seen = []
    original = stage2.run_episode

    def spy(model, episode, *args, **kwargs):
        if kwargs.get("track_grad") and not seen:
            seen.append(model.scale.item())
        return original(model, episode, *args, **kwargs)

    monkeypatch.setattr(stage2, "run_episode", spy)
    result = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--numEpochs", "1", "--overwrite", *flags)
    assert result.returncode == 0, result.stderr
    assert len(seen) == 1
    return seen[0]


def test_a_number_is_the_scale_of_the_first_training_episode(monkeypatch, workdir) -> None:
    assert first_training_scale(monkeypatch, workdir, "--tensorname", "fixed", "--scaleInit", "0.037") == \
        pytest.approx(0.037, rel=1e-6)


def test_without_it_the_run_starts_from_the_checkpoints_scale_of_one(monkeypatch, workdir) -> None:
    assert first_training_scale(monkeypatch, workdir, "--tensorname", "plain") == 1.0


def test_auto_gives_each_query_unit_logit_spread_on_the_first_episode(monkeypatch, workdir) -> None:
    scale = first_training_scale(monkeypatch, workdir, "--tensorname", "auto", "--scaleInit", "auto",
                                 "--galleryBN", "eval")
    # The first training episode's images, embedded here by the stage-1 network (evaluation mode,
    # as --galleryBN eval leaves it), and the rule applied in numpy.
    args = stage2_config(CPU, **vars(stage2_parser().parse_args([*TINY, "--dataroot", str(workdir / "toy"),
                                                                 "--tensorname", "x"])))
    split = stage2.load_splits(args, need_train=True)["train"]
    config = stage2.episode_config(args, args.trainways, train=True)
    episode = stage2.episodes(split, args, config, args.epoch, stage2.TRAIN_STREAM, 2 * 64)[0]
    net = load_embedding(workdir / "models/stage1.t7").eval()
    with torch.no_grad():
        support = net.features(prepare_images(episode["support"], CPU)).double().numpy()
        query = net.features(prepare_images(episode["query"], CPU)).double().numpy()
    labels = episode["support_labels"].numpy()
    protos = np.stack([support[labels == c].mean(0) for c in range(args.trainways)])
    distances = ((query[:, None, :] - protos[None]) ** 2).sum(-1)
    expected = 1.0 / distances.std(axis=1, ddof=1).mean()
    assert scale == pytest.approx(expected, rel=1e-4)
    assert np.std(-scale * distances, axis=1, ddof=1).mean() == pytest.approx(1.0, rel=1e-4)


def test_it_is_a_resume_key(workdir) -> None:
    first = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "key", "--numEpochs", "1",
                     "--scaleInit", "0.05")
    assert first.returncode == 0, first.stderr
    state = workdir / "runs/key/resume.pt"
    before = state.read_bytes()
    other = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "key", "--numEpochs", "2",
                     "--scaleInit", "0.1", "--resume")
    assert other.returncode == 2
    assert "--scaleInit 0.05 (saved) vs 0.1 (now)" in other.stderr.strip()
    assert state.read_bytes() == before
    same = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "key", "--numEpochs", "2",
                    "--scaleInit", "0.05", "--resume")
    assert same.returncode == 0, same.stderr
    assert "initial scale" not in same.stdout  # a continued run keeps its learned scale


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "big"])
def test_a_bad_value_is_refused_naming_the_flag(workdir, value) -> None:
    result = run_main(workdir, "onlyBasetwoLoss.py", *TINY, "--tensorname", "bad", "--scaleInit", value)
    assert result.returncode == 2
    assert "--scaleInit" in result.stderr.strip().splitlines()[-1]
    assert not (workdir / "runs/bad").exists()
