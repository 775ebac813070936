"""Stage 2 and the stage-1 monitor never read a tensor's value on the host within an episode (on a
GPU each such read waits for it): the sums stay on the device, are read every SYNC_EVERY episodes,
and equal, bit for bit, what adding each episode's values on the host gives; a non-finite loss is
still found and named."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.stage2 as stage2
from datasets import Gallery
from datasets.loaders import episode_loader
from engine import fewshot
from engine.episode import GalleryBank
from engine.features import FeatureCache
from engine.fewshot import evaluate_embedding
from models import EmbeddingNet
from tests.scripts_helpers import stage2_test_config
from utils.errors import TrainingDiverged

CPU = torch.device("cpu")
SIZE = 32
SYNC_EVERY = 4  # stage2.SYNC_EVERY here (16 in runs): the same reads, in a third of the episodes
EPISODES = 6  # one read after SYNC_EVERY episodes, one at the epoch's end


@pytest.fixture(autouse=True)
def sync_every(monkeypatch):
    monkeypatch.setattr(stage2, "SYNC_EVERY", SYNC_EVERY)


class HostReads(TorchDispatchMode):
    """Counts, while ``watching``, the reads of a tensor's value by the host: ``item()``, ``bool()``,
    ``float()``, ``int()`` (``aten._local_scalar_dense``) and ``tolist()`` (which the CPU serves
    without an op). Each one waits for the GPU there."""

    def __init__(self) -> None:
        super().__init__()
        self.watching, self.reads = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.watching and func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """A :class:`HostReads` mode that also counts ``Tensor.tolist`` calls."""
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        if mode.watching:
            mode.reads.append("tolist")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with mode:
        yield mode


def watched(mode: HostReads, function, watching: bool = True):
    """``function`` with ``mode`` watching (or, ``watching=False``, not) while it runs."""
    def call(*args, **kwargs):
        before, mode.watching = mode.watching, watching
        try:
            return function(*args, **kwargs)
        finally:
            mode.watching = before
    return call


class Loaded(list):
    """A loader's episodes, loaded in advance (a DataLoader draws its seed with a host read of its
    own when iterated), with the loader's dataset (which names the classes)."""

    def __init__(self, loader) -> None:
        super().__init__(loader)
        self.dataset = loader.dataset


def train(stage2_workdir, stage2_splits, flags: dict, epoch: int, monkeypatch,
          mode: HostReads | None = None, poison: int | None = None):
    """One epoch of EPISODES training episodes. With ``mode``, all of it is watched but the optimiser
    steps (Adam reads its step count, a host tensor); with ``poison``, that episode's prototype loss is
    made NaN. Returns (progress, each episode's result, per DeviceSums read the episodes it covered)."""
    args = stage2_test_config(stage2_workdir, **flags)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    groups = stage2.param_groups(model, args)
    optimizers, _ = stage2.make_optimizers(model, args)
    bank = GalleryBank(Gallery(stage2_splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize) \
        if args.deform != "none" else None
    cache = FeatureCache(model.embed, len(stage2_splits["train"]), CPU, args.batchSize) if args.fixCls else None
    config = stage2.episode_config(args, 5, train=True)
    dataset = stage2.episodes(stage2_splits["train"], args, config, EPISODES, stage2.TRAIN_STREAM, len(bank or []))
    dataset.set_epoch(epoch)
    seen, reads, run_episode = [], [], stage2.run_episode

    def run_and_keep(*a, **k):
        result = run_episode(*a, **k)
        if poison is not None and len(seen) == poison:
            result.proto_loss = result.proto_loss * float("nan")
        seen.append(result)
        return result

    read = stage2.DeviceSums.read
    monkeypatch.setattr(stage2, "run_episode", run_and_keep)
    monkeypatch.setattr(stage2.DeviceSums, "read", lambda self: reads.append(self.unread) or read(self))
    train_one_epoch = stage2.train_one_epoch
    if mode:
        monkeypatch.setattr(stage2, "optimizer_step", watched(mode, stage2.optimizer_step, watching=False))
        train_one_epoch = watched(mode, train_one_epoch)
    progress = stage2.new_progress()
    train_one_epoch(model, Loaded(episode_loader(dataset, 0, CPU)), bank, config, CPU,
                    epoch, groups, optimizers, model.embed, progress, show=False, cache=cache)
    return progress, seen, reads


CASES = [({"fixCls": 1}, 0), ({"fixCls": 0}, 1), ({"fixCls": 1, "deform": "random"}, 0),
         ({"fixCls": 1, "deform": "none", "galleryBN": "eval"}, 0),
         ({"fixCls": 1, "galleryExclude": "episode", "shots": 2}, 0)]


@pytest.mark.parametrize("flags, epoch", CASES,
                         ids=[" ".join(f"--{k} {v}" for k, v in flags.items()) for flags, _ in CASES])
def test_training_reads_the_device_every_sync_every_episodes_and_its_sums_equal_the_host_sums(
        stage2_workdir, stage2_splits, flags, epoch, monkeypatch, host_reads) -> None:
    """The host reads the sums (one ``tolist`` each) after SYNC_EVERY episodes and at the epoch's
    end, and no other value in the whole epoch but the optimisers' own. Each sum equals adding each
    episode's value on the host in episode order (float64 adds of the float32 values, as ``+=
    x.item()`` did), exactly."""
    progress, seen, reads = train(stage2_workdir, stage2_splits, flags, epoch, monkeypatch, host_reads)
    assert len(seen) == EPISODES
    assert reads == [SYNC_EVERY, EPISODES - SYNC_EVERY]
    assert host_reads.reads == ["tolist", "tolist"]

    host = dict.fromkeys(("proto_loss", "cls_loss", "acc", "plain_acc", "weight_sum", "weight_sq", "own_distance",
                          "other_distance"), 0.0)
    for result in seen:
        host["proto_loss"] += result.proto_loss.item()
        host["cls_loss"] += result.cls_loss.item() if result.cls_loss is not None else 0.0
        host["acc"] += result.accuracy.item()
        host["plain_acc"] += result.plain_accuracy.item()
        if result.weights is not None:
            host["weight_sum"] += result.weights.sum().item()
            host["weight_sq"] += result.weights.pow(2).sum().item()
            host["own_distance"] += result.own_distance.item()
            host["other_distance"] += result.other_distance.item()
    assert {key: progress[key] for key in host} == host
    assert host["proto_loss"] > 0 and (host["weight_sq"] > 0) == (flags.get("deform") != "none")  # measured
    assert progress["step"] == EPISODES and progress["cls_steps"] == (EPISODES if epoch else 0)
    assert progress["weight_n"] == sum(r.weights.numel() for r in seen if r.weights is not None)


@pytest.mark.parametrize("poison", [2, 5])
def test_a_non_finite_loss_is_named_at_the_next_read(stage2_workdir, stage2_splits, monkeypatch, poison) -> None:
    """The first episode with a non-finite loss is named (its index and classes) at the read that
    follows it: after SYNC_EVERY episodes, or at the epoch's end."""
    args = stage2_test_config(stage2_workdir, fixCls=1)
    train_split = stage2_splits["train"]
    dataset = stage2.episodes(train_split, args, stage2.episode_config(args, 5, train=True), EPISODES,
                              stage2.TRAIN_STREAM, 2 * train_split.num_classes)
    dataset.set_epoch(0)
    classes = " ".join(stage2_splits["train"].classes[c] for c in dataset[poison]["classes"].tolist())
    with pytest.raises(TrainingDiverged) as raised:
        train(stage2_workdir, stage2_splits, {"fixCls": 1}, 0, monkeypatch, poison=poison)
    assert str(raised.value) == f"non-finite loss at epoch 0, episode {poison} (classes {classes})"


def test_a_stop_reads_the_sums_first_so_the_saved_progress_holds_every_finished_episode(
        stage2_workdir, stage2_splits, monkeypatch) -> None:
    args = stage2_test_config(stage2_workdir, fixCls=1)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    bank = GalleryBank(Gallery(stage2_splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize)
    optimizers, _ = stage2.make_optimizers(model, args)
    config = stage2.episode_config(args, 5, train=True)
    dataset = stage2.episodes(stage2_splits["train"], args, config, EPISODES, stage2.TRAIN_STREAM, len(bank))
    dataset.set_epoch(0)
    seen, run_episode = [], stage2.run_episode
    monkeypatch.setattr(stage2, "run_episode", lambda *a, **k: seen.append(run_episode(*a, **k)) or seen[-1])
    progress = stage2.new_progress()
    with pytest.raises(stage2.Interrupted, match="after episode 5"):
        stage2.train_one_epoch(model, episode_loader(dataset, 0, CPU), bank, config, CPU, 0,
                               stage2.param_groups(model, args), optimizers, model.embed, progress,
                               stop=lambda: len(seen) == 5, show=False)
    assert progress["step"] == 5
    assert progress["proto_loss"] == sum(r.proto_loss.item() for r in seen)
    assert progress["acc"] == sum(r.accuracy.item() for r in seen)


def test_evaluation_reads_nothing_per_episode(stage2_workdir, stage2_splits, monkeypatch, host_reads) -> None:
    """Stage 2's evaluation reads two things once per pass (the per-episode values, the sums) and
    the stage-1 monitor one (its accuracies), whatever the number of episodes. (The advance pass
    that fills the feature cache reads the host-side image positions, and the loaders are loaded in
    advance: neither is watched.)"""
    monkeypatch.setattr(FeatureCache, "fill", watched(host_reads, FeatureCache.fill, watching=False))
    loaded = watched(host_reads, lambda *args: Loaded(episode_loader(*args)), watching=False)
    monkeypatch.setattr(stage2, "episode_loader", loaded)
    monkeypatch.setattr(fewshot, "episode_loader", loaded)
    args = stage2_test_config(stage2_workdir)
    torch.manual_seed(0)
    model = stage2.build_model(args, CPU)
    bank = GalleryBank(Gallery(stage2_splits["train"], 2, SIZE, 0, progress=False), model, CPU, args.batchSize)
    for episodes in (3, 9):
        host_reads.reads.clear()
        dataset = stage2.episodes(stage2_splits["val"], args, stage2.episode_config(args, 5), episodes,
                                  stage2.VAL_STREAM, len(bank), evaluation=True)
        stats = watched(host_reads, stage2.evaluate)(model, dataset, bank, args, CPU, "val", model.embed)
        assert host_reads.reads == ["tolist", "tolist"] and len(stats["acc"]) == episodes

        host_reads.reads.clear()
        net = EmbeddingNet(64).eval()
        accuracies = watched(host_reads, evaluate_embedding)(net.features, stage2_splits["val"], SIZE, 5, 1, 3,
                                                             episodes, 0, CPU, progress=False)
        assert host_reads.reads == ["tolist"] and len(accuracies) == episodes
