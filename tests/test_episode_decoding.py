"""--fixCls 1: a training episode decodes its support images and only the query images whose features
the run's cache does not hold yet (``EpisodeDataset(decode="new")``), and trains exactly as when it
decodes all its images."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import datasets.episodes as episodes_module
import engine.stage2 as stage2
from datasets import Gallery
from datasets.images import load_rgb
from datasets.loaders import episode_loader
from engine.episode import GalleryBank
from engine.features import FeatureCache
from tests.scripts_helpers import stage2_test_config

CPU = torch.device("cpu")
SIZE = 32
WAYS, EPISODES, EPOCHS = 5, 6, 3


class CountingLoads:
    """``load_rgb`` that counts its calls (the loader runs in this process: ``--nthreads 0``)."""

    def __init__(self, load) -> None:
        self.load, self.calls = load, 0

    def __call__(self, path):
        self.calls += 1
        return self.load(path)


class PerEpisode:
    """A loader's items, noting the images decoded for each."""

    def __init__(self, loader, loads: CountingLoads, decoded: list[int]) -> None:
        self.loader, self.loads, self.decoded = loader, loads, decoded

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        before = self.loads.calls
        for item in self.loader:
            self.decoded.append(self.loads.calls - before)
            yield item
            before = self.loads.calls


def train_round_one(workdir, splits, monkeypatch, new: bool, workers: int = 0) -> tuple[dict, list, list[int]]:
    """Round 1 (--fixCls 1) over EPOCHS epochs of EPISODES episodes with the run's feature cache: the
    weights, each epoch's progress (time left out) and the images decoded per episode."""
    args = stage2_test_config(workdir, fixCls=1)
    loads = CountingLoads(load_rgb)
    monkeypatch.setattr(episodes_module, "load_rgb", loads)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    groups = stage2.param_groups(model, args)
    optimizers, _ = stage2.make_optimizers(model, args)
    bank = GalleryBank(Gallery(splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize)
    cache = FeatureCache(model.embed, len(splits["train"]), CPU, args.batchSize)
    config = stage2.episode_config(args, WAYS, train=True)
    dataset = stage2.episodes(splits["train"], args, config, EPISODES, stage2.TRAIN_STREAM, len(bank),
                              cache=cache if new else None)
    assert dataset.decode == ("new" if new else "all")
    decoded, progresses = [], []
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)
        progress = stage2.new_progress()
        stage2.train_one_epoch(model, PerEpisode(episode_loader(dataset, workers, CPU), loads, decoded), bank,
                               config, CPU, epoch, groups, optimizers, model.embed,
                               progress, show=False, cache=cache)
        progresses.append({key: value for key, value in progress.items() if key != "time"})
    return model.state_dict(), progresses, decoded


def test_round_one_decodes_only_new_queries_and_trains_the_same(stage2_workdir, stage2_splits, monkeypatch) -> None:
    all_state, all_progress, all_decoded = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=False)
    state, progress, decoded = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True)
    assert all(torch.equal(all_state[key], state[key]) for key in all_state)
    assert progress == all_progress  # losses, accuracies, deformation sums: the same numbers
    per_episode = WAYS * (1 + 3)
    assert all_decoded == [per_episode] * (EPOCHS * EPISODES)  # before: every image of every episode
    assert decoded[0] == per_episode  # the first episode: nothing cached yet
    assert all(WAYS <= count <= per_episode for count in decoded)  # the support always
    assert sum(decoded[EPISODES:]) < sum(all_decoded[EPISODES:])  # after the first epoch: fewer
    assert decoded[-1] < per_episode


def test_a_worker_gets_the_plan_of_the_main_process(stage2_workdir, stage2_splits, monkeypatch) -> None:
    state, progress, _ = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True, workers=1)
    inline_state, inline_progress, _ = train_round_one(stage2_workdir, stage2_splits, monkeypatch, new=True)
    assert all(torch.equal(state[key], inline_state[key]) for key in state)
    assert progress == inline_progress


def test_the_plan_follows_the_cache_and_the_resumed_start(stage2_workdir, stage2_splits) -> None:
    args = stage2_test_config(stage2_workdir, fixCls=1)
    cache = FeatureCache(lambda images: torch.zeros(len(images), 4), len(stage2_splits["train"]), CPU, 16)
    dataset = stage2.episodes(stage2_splits["train"], args, stage2.episode_config(args, WAYS, train=True), EPISODES,
                              stage2.TRAIN_STREAM, 10, cache=cache)
    dataset.set_epoch(1, start=2)
    assert set(dataset.new_queries) == set(range(2, EPISODES))
    first = dataset[0]
    assert len(first["query"]) == WAYS * 3 and len(first["support"]) == WAYS
    cache.known[first["query_ids"].numpy()] = True
    dataset.set_epoch(1, start=2)  # planned again from what the cache holds now
    assert "query" not in dataset[0]


def test_lookup_takes_the_pixels_of_all_images_or_of_the_missing_ones_and_refuses_others() -> None:
    cache = FeatureCache(lambda images: images.flatten(1)[:, :2].float(), 6, CPU, 4)
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.uint8).view(6, 3, 2, 2)
    cache.lookup(torch.tensor([0, 1]), images[:2])
    full = cache.lookup(torch.tensor([0, 2, 1, 3]), images[[0, 2, 1, 3]])
    cache.known[:] = False
    cache.lookup(torch.tensor([0, 1]), images[:2])
    only_missing = cache.lookup(torch.tensor([0, 2, 1, 3]), images[[2, 3]])
    assert torch.equal(full, only_missing)
    with pytest.raises(RuntimeError, match="1 of 2 images not cached and pixels of 3 given"):
        cache.lookup(torch.tensor([0, 4]), images[:3])
    with pytest.raises(RuntimeError, match="no pixels"):
        cache.lookup(torch.tensor([5]))


SCRIPT_FLAGS = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--galleryNum", "2", "--chooseNum",
                "3", "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu",
                "--epoch", "4", "--numEpochs", "2", "--valEpisodes", "2", "--testEpisodes", "2", "--fixCls", "1",
                "--scaleInit", "auto"]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """onlyBasetwoLoss.py --fixCls 1 (--scaleInit auto: its first episode is looked up before the loop) as
    it is (``new``) and with training episodes that decode every image (``all``); the images each decoded."""
    from tests.scripts_helpers import load_script, make_workdir, run_main

    workdir = make_workdir(tmp_path_factory.mktemp("decoding"))
    script = load_script("onlyBasetwoLoss.py")
    decoded = {}
    episodes = stage2.episodes
    with pytest.MonkeyPatch.context() as patch:
        for name in ("all", "new"):
            if name == "all":
                every_image = lambda *args, cache=None, **kwargs: episodes(*args, **kwargs)  # noqa: E731
                patch.setattr(script.stage2, "episodes", every_image)
            else:
                patch.setattr(script.stage2, "episodes", episodes)
            loads = CountingLoads(load_rgb)
            patch.setattr(episodes_module, "load_rgb", loads)
            result = run_main(workdir, "onlyBasetwoLoss.py", *SCRIPT_FLAGS, "--tensorname", name)
            assert result.returncode == 0, result.stderr
            decoded[name] = loads.calls
    return workdir, decoded


@pytest.mark.slow  # an end-to-end run of the script
def test_the_script_decodes_fewer_images_and_writes_the_same_run(script_runs) -> None:
    """The same weights, resumable state, metrics (timing left out) and test report, fewer decoded images."""
    workdir, decoded = script_runs
    assert decoded["new"] < decoded["all"]
    assert_same_run(workdir, "all", "new")


@pytest.mark.slow  # an end-to-end run of the script
def test_round_one_resumed_mid_epoch_plans_from_the_fresh_cache(script_runs, monkeypatch) -> None:
    """A stop after epoch 1's second training episode, then --resume: a fresh cache, the epoch planned
    from its third episode on; the run ends as the uninterrupted one."""
    from tests.scripts_helpers import run_main

    workdir, _ = script_runs
    original, training = stage2.run_episode, []

    def stop_in_epoch_one(model, episode, *args, **kwargs):
        if kwargs.get("track_grad"):
            training.append(int(episode["index"]))
            if len(training) == 6:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(model, episode, *args, **kwargs)

    monkeypatch.setattr(stage2, "run_episode", stop_in_epoch_one)
    stopped = run_main(workdir, "onlyBasetwoLoss.py", *SCRIPT_FLAGS, "--tensorname", "resumed")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    state = torch.load(workdir / "runs/resumed/resume.pt", weights_only=False)
    assert (state["epoch"], state["progress"]["step"]) == (1, 2)
    monkeypatch.setattr(stage2, "run_episode", original)
    resumed = run_main(workdir, "onlyBasetwoLoss.py", *SCRIPT_FLAGS, "--tensorname", "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir, "new", "resumed")


def assert_same_run(workdir, reference: str, name: str) -> None:
    """Runs ``reference`` and ``name`` wrote the same weights, resumable state, metrics.csv (its timing
    column left out) and test report (its checkpoint name left out)."""
    from utils.files import read_csv

    for suffix in ("", "_last"):
        want, got = (torch.load(workdir / f"models/{run}{suffix}.t7") for run in (reference, name))
        assert_same(want, got, f"{name}{suffix}.t7")
    want, got = (torch.load(workdir / f"runs/{run}/resume.pt", weights_only=False) for run in (reference, name))
    del want["args"], got["args"]
    assert_same(want, got)
    rows = [[{key: value for key, value in row.items() if key != "episodes_per_s"}
             for row in read_csv(workdir / f"runs/{run}/metrics.csv")] for run in (reference, name)]
    assert rows[0] == rows[1]
    reports = [json.loads((workdir / f"runs/{run}/evaluate_1shot_seed0.json").read_text()) for run in (reference, name)]
    assert [report.pop("checkpoint") for report in reports] == [reference, name]
    assert reports[0] == reports[1]


def assert_same(want, got, where: str = "") -> None:
    """Nested dicts, lists and tensors equal, tensors bit for bit (the run's time left out)."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(want, got), where
    elif isinstance(want, dict):
        assert want.keys() == got.keys(), where
        for key in want:
            if key != "time":
                assert_same(want[key], got[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert want == got, where
