"""Benchmark of stage-2 episodes (docs/original.md §4.5): the engine's training and test loops vs their compute floor.

    python -m benchmarks.episode --imageSize 84 --shots 1
    python -m benchmarks.episode --device cuda --amp 1 --episodes 50

Per round: ``engine.stage2.train_one_epoch`` (train loop), ``train_one_epoch`` over one episode already on
the device (train floor), ``evaluate`` (test loop), ``run_episode`` on one test episode (test floor),
each reporting its sections to a StepTimer (benchmarks/README.md). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import suppress
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m benchmarks.episode\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import torch

from benchmarks import common
from benchmarks.common import StepTimer
from datasets import EpisodeDataset, Gallery
from datasets.loaders import episode_loader
from engine import stage2
from engine.episode import GalleryBank, run_episode
from engine.features import FeatureCache
from engine.options import Stage2Config, add_batch_flag, add_deform_net_flag, add_gallery_flags, stage2_config
from models import IDeMeNet
from utils.forward import grad_scaler, layout_model
from utils.interrupt import Interrupted
from utils.options import configure_backend, resolve_device, run_cli

ROWS = ["data_wait", "prepare", "embed_plain", "embed_support_grad", "select", "gallery_batch", "deform",
        "embed_deformed", "losses", "backward", "optimizer", "bookkeeping", "unaccounted", "total", "cpu_user",
        "cpu_sys"]


def get_args_parser() -> argparse.ArgumentParser:
    p = common.parser("Stage-2 episode benchmark: the engine's loops vs their compute floor")
    add_episode_flags(p)
    p.add_argument("--fixCls", type=int, default=1, choices=(0, 1), help="1: frozen embedding (round 1); 0: trained")
    p.add_argument("--episodes", type=int, default=5, help="timed training episodes")
    p.add_argument("--testEpisodes", type=int, default=None, help="timed test episodes (default: --episodes)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the (loop, floor) blocks this many times")
    p.add_argument("--skipTest", action="store_true", help="skip the test-episode phases")
    p.add_argument("--passEpisodes", type=int, default=30,
                   help="episodes of the whole evaluation passes, cached against uncached (0: none); 30 on the "
                   "toy test split (20 x 30 images) has the ratio of 600 episodes to miniImageNet's 12,000 images")
    return p


def add_episode_flags(p: argparse.ArgumentParser) -> None:
    """The episode's shape, gallery, deformation network and forward chunk (this benchmark's and ops.py's)."""
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--ways", type=int, default=5, help="classes per training and test episode")
    p.add_argument("--queries", type=int, default=15, help="query images per class (the scripts' --test_num)")
    add_gallery_flags(p)
    add_deform_net_flag(p)
    add_batch_flag(p)


def engine_config(a: argparse.Namespace, root: Path, **flags) -> tuple[Stage2Config, torch.device]:
    """The configuration and device onlyBasetwoLoss.py resolves for the same flags (round 1 of the recipes),
    with ``flags`` (by flag name) on top."""
    device = resolve_device(a)
    flags = {"dataroot": str(root), "tensorname": "benchmark", "network": "random-init", "imageSize": a.imageSize,
             "shots": a.shots, "ways": a.ways, "trainways": a.ways, "test_num": a.queries, "galleryNum": a.galleryNum,
             "deformNet": a.deformNet, "nthreads": a.nthreads, "seed": a.seed,
             "amp": int(a.amp), "progress": 0, "augnum": a.augnum, "chooseNum": a.chooseNum, "device": a.device,
             "batchSize": a.batchSize, **flags}
    return stage2_config(device, **flags), device


class Stage2Run:
    """Stage 2 as onlyBasetwoLoss.py builds it for ``config``: ``model`` (None: a fresh one, the ``random-init``
    network), the ``gallery``'s features (``features_s``: seconds computing them; its BatchNorm pass
    ``batch_norm``, :class:`GalleryBank`), the parameter groups, optimisers, embedding and (float16 ``--amp``)
    loss scaler; episodes of ``splits``, training passes, evaluation passes."""

    def __init__(self, config: Stage2Config, device: torch.device, splits: dict, gallery: Gallery,
                 model: IDeMeNet | None = None, batch_norm: str = "eval") -> None:
        self.config, self.device, self.splits = config, device, splits
        self.model = model if model is not None else layout_model(IDeMeNet(
            num_classes=splits["train"].num_classes, image_size=config.imageSize, fang=config.Fang,
            deform_net=config.deformNet).to(device).eval())
        self.features_s, self.bank = common.timed(device, GalleryBank, gallery, self.model, device, config.batchSize,
                                                  bool(config.amp), batch_norm=batch_norm)
        self.groups = stage2.param_groups(self.model, config)
        self.optimizers, _ = stage2.make_optimizers(self.model, config)
        self.embed = stage2.make_embed(self.model, device)
        self.scaler = grad_scaler(device, bool(config.amp))
        self.train_config = stage2.episode_config(config, config.trainways, train=True)
        self.test_config = stage2.episode_config(config, config.ways)

    def episodes(self, split: str, count: int, epoch: int = 0, **more) -> EpisodeDataset:
        """``count`` episodes of epoch ``epoch`` of split ``train`` (training's ways and stream) or ``test``;
        ``more``: :func:`engine.stage2.episodes`'."""
        episode, stream = (self.train_config, stage2.TRAIN_STREAM) if split == "train" else \
            (self.test_config, stage2.TEST_STREAM)
        episodes = stage2.episodes(self.splits[split], self.config, episode, count, stream, len(self.bank), **more)
        episodes.set_epoch(epoch)
        return episodes

    def feature_cache(self) -> FeatureCache | None:
        """The frozen embedding's cache of the training split's features (``--fixCls 1``), else None."""
        return FeatureCache(self.embed, len(self.splits["train"]), self.device, self.config.batchSize,
                            bool(self.config.amp)) if self.config.fixCls else None

    def train(self, episodes, epoch: int, progress: dict | None = None, **more) -> dict:
        """One training pass over ``episodes`` as epoch ``epoch`` (the classification loss trains from epoch 1
        on), added to ``progress`` (a new one unless given) and returned; ``more``:
        :func:`engine.stage2.train_one_epoch`'s ``timer``, ``stop``, ``cache``."""
        progress = stage2.new_progress() if progress is None else progress
        stage2.train_one_epoch(self.model, episodes, self.bank, self.train_config, self.device, epoch, self.groups,
                               self.optimizers, self.embed, progress, show=False, scaler=self.scaler, **more)
        return progress

    def evaluate(self, dataset: EpisodeDataset, desc: str = "test", **more) -> dict:
        """:func:`engine.stage2.evaluate` of ``dataset`` (``more``: its ``timer``, ``stop``, ``cached``)."""
        return stage2.evaluate(self.model, dataset, self.bank, self.config, self.device, desc, self.embed, **more)


def decode(dataset, device: torch.device) -> tuple[float, dict]:
    """Median seconds to build one episode (decode + crop) in this process over two, and the second's
    tensors on the device (the floor's episode)."""
    times = [common.timed(device, dataset.__getitem__, i) for i in range(2)]
    return statistics.median(t for t, _ in times), {k: v.to(device) for k, v in times[-1][1].items()}


def main(a: argparse.Namespace) -> None:
    test_steps = a.episodes if a.testEpisodes is None else a.testEpisodes
    env, root, toy_s, holder = common.setup(a, max(a.galleryNum, a.shots + a.queries))
    config, device = engine_config(a, root, fixCls=a.fixCls)
    configure_backend(device, False, config.seed)
    probes = {phase: common.MemoryProbe(device, a.pssInterval)
              for phase in ("gallery", "train", "train_floor", "test", "test_floor")}

    scan_s, splits = common.timed(device, stage2.load_splits, config, need_train=True)
    with probes["gallery"]:
        decode_s, gallery = common.timed(device, Gallery, splits["train"], config.galleryNum, config.imageSize,
                                         config.nthreads, progress=False)
        run = Stage2Run(config, device, splits, gallery)
    first_epoch = 1 if run.groups[1] else 0  # the classification loss trains from epoch 1 on

    # Each dataset holds 4 * nthreads episodes more than the loops consume (the timer stops them
    # after the timed ones), so the workers keep decoding one new episode per consumed one, as mid-epoch.
    spare = 4 * config.nthreads
    train_set = run.episodes("train", a.warmup + a.episodes + spare, first_epoch)
    test_set = run.episodes("test", a.warmup + test_steps + spare)
    train_decode_s, train_x = decode(train_set, device)
    test_decode_s, test_x = decode(test_set, device)

    rows = {"train loop": [], "train floor": [], "test loop": [], "test floor": []}
    train_acc, train_steps, workers_cpu_s = 0.0, 0, 0.0
    for r in range(a.rounds):
        cpu0 = common.children_cpu_s()
        train_set.set_epoch(first_epoch + r)
        progress = stage2.new_progress()
        with StepTimer(device, a.warmup, a.episodes, probes["train"]) as timer, suppress(Interrupted):
            run.train(episode_loader(train_set, config.nthreads, device), first_epoch + r, progress, timer=timer,
                      stop=timer.done)
        workers_cpu_s += common.children_cpu_s() - cpu0
        rows["train loop"] += timer.rows
        train_acc, train_steps = train_acc + progress["acc"], train_steps + progress["step"]
        with StepTimer(device, a.warmup, a.episodes, probes["train_floor"]) as timer:  # one episode on the device
            run.train([train_x] * (a.warmup + a.episodes), first_epoch, timer=timer)
        rows["train floor"] += timer.rows
        if a.skipTest:
            continue
        test_set.set_epoch(r)
        with StepTimer(device, a.warmup, test_steps, probes["test"]) as timer, suppress(Interrupted):
            run.evaluate(test_set, timer=timer, stop=timer.done)
        rows["test loop"] += timer.rows
        with StepTimer(device, a.warmup, test_steps, probes["test_floor"]) as timer, torch.no_grad():
            for _ in range(a.warmup + test_steps):
                run_episode(run.model, test_x, run.bank, run.test_config, device, embed=run.embed, timer=timer)
                timer.end_step()
        rows["test floor"] += timer.rows

    passes = {}
    if a.passEpisodes and not a.skipTest:
        for cached in (False, True):  # whole passes as the scripts run them, the cache's advance fill included
            dataset = run.episodes("test", a.passEpisodes, evaluation=cached)
            passes[cached] = common.timed(device, run.evaluate, dataset, "pass", cached=cached)[0] / a.passEpisodes

    title = (f"median ms per episode, {device.type}{' amp' if config.amp else ''}, {config.imageSize} px, "
             f"{config.ways}-way {config.shots}-shot, augnum {config.augnum}, chooseNum {config.chooseNum}, queries "
             f"{config.test_num}, galleryNum {config.galleryNum}, fixCls {config.fixCls}, nthreads {config.nthreads}, "
             f"chunk {config.batchSize}, {a.rounds} x ({a.episodes}+{a.warmup} warmup) episodes")
    columns, table = common.print_table(title, rows, ROWS, "TOTAL per episode")

    def ms(column: str, key: str = "total") -> float | None:
        return 1000 * columns[column][key] if column in columns else None

    summary = {
        "benchmark": "episode", "device": str(device), "amp": bool(config.amp), "imageSize": config.imageSize,
        "ways": config.ways, "shots": config.shots, "augnum": config.augnum, "chooseNum": config.chooseNum,
        "queries": config.test_num, "galleryNum": config.galleryNum, "fixCls": config.fixCls,
        "nthreads": config.nthreads, "batchSize": config.batchSize, "episodes": a.episodes,
        "test_episodes": 0 if a.skipTest else test_steps, "warmup": a.warmup, "rounds": a.rounds,
        **{f"{part}_ratio{suffix}": common.ratio(rows[f"{part} loop"], rows[f"{part} floor"], stat)
           for part in ("train", "test") for suffix, stat in (("", statistics.median), ("_mean", statistics.fmean))},
        "train_episode_ms": ms("train loop"), "train_floor_ms": ms("train floor"),
        "test_episode_ms": ms("test loop"), "test_floor_ms": ms("test floor"),
        "train_episodes_per_s": 1 / statistics.fmean(r["total"] for r in rows["train loop"]),
        "train_data_wait_ms": ms("train loop", "data_wait"), "test_data_wait_ms": ms("test loop", "data_wait"),
        "decode_ms_per_train_episode": 1000 * train_decode_s, "decode_ms_per_test_episode": 1000 * test_decode_s,
        "workers_cpu_s_train_phase": workers_cpu_s,
        "gallery_images": len(run.bank), "gallery_decode_s": decode_s, "gallery_features_s": run.features_s,
        "gallery_ready_s": decode_s + run.features_s,
        "gallery_ready_over_features": (decode_s + run.features_s) / run.features_s,
        "scan_s": scan_s, "toy_generate_s": toy_s, **common.memory_fields(probes),
        "eval_pass_episodes": a.passEpisodes if passes else 0,
        "eval_pass_ms_per_episode_uncached": 1000 * passes[False] if passes else None,
        "eval_pass_ms_per_episode_cached": 1000 * passes[True] if passes else None,
        "eval_cache_speedup": passes[False] / passes[True] if passes else None,
        "train_accuracy": train_acc / train_steps, **table,
    }
    test_ratio = f", test ratio {summary['test_ratio']:.3f}" if summary["test_ratio"] else ""
    if passes:
        print(f"\nevaluation pass of {a.passEpisodes} episodes: {1000 * passes[False]:.1f} ms per episode uncached, "
              f"{1000 * passes[True]:.1f} ms cached ({summary['eval_cache_speedup']:.2f} x)")
    print(f"\ntrain ratio (medians) {summary['train_ratio']:.3f}{test_ratio}, "
          f"{summary['train_episodes_per_s']:.2f} training episodes/s; gallery ready in "
          f"{summary['gallery_ready_over_features']:.2f} x the feature pass; peak memory of the train phase with "
          f"the workers {summary['train_peak_total_mb']:.0f} MB")
    common.finish(summary, env, a.json, holder, device)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
