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

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import torch

from benchmarks import common
from datasets import Gallery
from datasets.loaders import episode_loader
from engine import stage2
from engine.episode import GalleryBank, run_episode
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


def decode(dataset, device: torch.device) -> tuple[float, dict]:
    """Median seconds to build one episode (decode + crop) in this process over two, and the second's
    tensors on the device (the floor's episode)."""
    times = [common.timed(device, dataset.__getitem__, i) for i in range(2)]
    return statistics.median(t for t, _ in times), {k: v.to(device) for k, v in times[-1][1].items()}


def floor(step, device: torch.device, warmup: int, steps: int, probe: common.MemoryProbe) -> list[dict]:
    """Rows of ``step(timer)`` run ``warmup + steps`` times, one timer step each."""
    timer = common.StepTimer(device, warmup, steps)
    with probe:
        for _ in range(warmup + steps):
            step(timer)
            timer.end_step()
    return timer.rows


def main(a: argparse.Namespace) -> None:
    test_steps = a.episodes if a.testEpisodes is None else a.testEpisodes
    env, root, toy_s, holder = common.setup(a, max(a.galleryNum, a.shots + a.queries))
    config, device = engine_config(a, root, fixCls=a.fixCls)
    configure_backend(device, False, config.seed)
    probes = {phase: common.MemoryProbe(device, a.pssInterval)
              for phase in ("gallery", "train", "train_floor", "test", "test_floor")}

    scan_s, splits = common.timed(device, stage2.load_splits, config, need_train=True)
    model = IDeMeNet(num_classes=splits["train"].num_classes, image_size=config.imageSize, fang=config.Fang,
                     deform_net=config.deformNet).to(device).eval()
    layout_model(model)
    with probes["gallery"]:
        decode_s, gallery = common.timed(device, Gallery, splits["train"], config.galleryNum, config.imageSize,
                                         config.nthreads, progress=False)
        features_s, bank = common.timed(device, GalleryBank, gallery, model, device, config.batchSize, bool(config.amp))
    groups = stage2.param_groups(model, config)
    optimizers, _ = stage2.make_optimizers(model, config)
    embed = stage2.make_embed(model, device)
    first_epoch = 1 if groups[1] else 0  # the classification loss trains from epoch 1 on

    # Each dataset holds 4 * nthreads episodes more than the loops consume (the timer stops them
    # after the timed ones), so the workers keep decoding one new episode per consumed one, as mid-epoch.
    spare = 4 * config.nthreads
    train_config = stage2.episode_config(config, config.trainways, train=True)
    test_config = stage2.episode_config(config, config.ways)
    train_set = stage2.episodes(splits["train"], config, train_config, a.warmup + a.episodes + spare,
                                stage2.TRAIN_STREAM, len(bank))
    test_set = stage2.episodes(splits["test"], config, test_config, a.warmup + test_steps + spare, stage2.TEST_STREAM,
                               len(bank))
    train_set.set_epoch(first_epoch)
    train_decode_s, train_x = decode(train_set, device)
    test_decode_s, test_x = decode(test_set, device)
    scaler = grad_scaler(device, bool(config.amp))  # as the script: float16 --amp scales its losses

    def train_floor() -> list[dict]:
        """The engine's training loop over one episode already on the device, repeated: no data loading."""
        timer = common.StepTimer(device, a.warmup, a.episodes)
        with probes["train_floor"]:
            stage2.train_one_epoch(model, [train_x] * (a.warmup + a.episodes), bank, train_config, device,
                                   first_epoch, groups, optimizers, embed, stage2.new_progress(), timer=timer,
                                   show=False, scaler=scaler)
        return timer.rows

    @torch.no_grad()
    def test_floor_step(timer: common.StepTimer) -> None:
        run_episode(model, test_x, bank, test_config, device, embed=embed, timer=timer)

    rows = {"train loop": [], "train floor": [], "test loop": [], "test floor": []}
    train_acc, train_steps, workers_cpu_s = 0.0, 0, 0.0
    for r in range(a.rounds):
        timer, progress = common.StepTimer(device, a.warmup, a.episodes, probes["train"]), stage2.new_progress()
        cpu0 = common.children_cpu_s()
        with probes["train"], suppress(Interrupted):
            train_set.set_epoch(first_epoch + r)
            stage2.train_one_epoch(model, episode_loader(train_set, config.nthreads, device), bank, train_config,
                                   device, first_epoch + r, groups, optimizers, embed, progress, stop=timer.done,
                                   timer=timer, show=False, scaler=scaler)
        workers_cpu_s += common.children_cpu_s() - cpu0
        rows["train loop"] += timer.rows
        train_acc, train_steps = train_acc + progress["acc"], train_steps + progress["step"]
        rows["train floor"] += train_floor()
        if a.skipTest:
            continue
        test_set.set_epoch(r)
        timer = common.StepTimer(device, a.warmup, test_steps, probes["test"])
        with probes["test"], suppress(Interrupted):
            stage2.evaluate(model, test_set, bank, config, device, "test", embed, timer=timer, stop=timer.done)
        rows["test loop"] += timer.rows
        rows["test floor"] += floor(test_floor_step, device, a.warmup, test_steps, probes["test_floor"])

    passes = {}
    if a.passEpisodes and not a.skipTest:
        for cached in (False, True):  # whole passes as the scripts run them, the cache's advance fill included
            dataset = stage2.episodes(splits["test"], config, test_config, a.passEpisodes, stage2.TEST_STREAM,
                                      len(bank), evaluation=cached)
            passes[cached] = common.timed(device, stage2.evaluate, model, dataset, bank, config, device, "pass", embed,
                                          cached=cached)[0] / a.passEpisodes

    columns = {name: common.medians(r) for name, r in rows.items() if r}
    common.print_table(f"median ms per episode, {device.type}{' amp' if config.amp else ''}, {config.imageSize} px, "
                       f"{config.ways}-way {config.shots}-shot, augnum {config.augnum}, chooseNum {config.chooseNum}, "
                       f"queries {config.test_num}, galleryNum {config.galleryNum}, fixCls {config.fixCls}, nthreads "
                       f"{config.nthreads}, chunk {config.batchSize}, {a.rounds} x ({a.episodes}+{a.warmup} warmup) "
                       "episodes", columns, ROWS, "TOTAL per episode")

    def ms(column: str, key: str = "total") -> float | None:
        return 1000 * columns[column][key] if column in columns else None

    summary = {
        "benchmark": "episode", "device": str(device), "amp": bool(config.amp), "imageSize": config.imageSize,
        "ways": config.ways, "shots": config.shots, "augnum": config.augnum, "chooseNum": config.chooseNum,
        "queries": config.test_num, "galleryNum": config.galleryNum, "fixCls": config.fixCls,
        "nthreads": config.nthreads, "batchSize": config.batchSize, "episodes": a.episodes,
        "test_episodes": 0 if a.skipTest else test_steps, "warmup": a.warmup, "rounds": a.rounds,
        "train_ratio": common.ratio(rows["train loop"], rows["train floor"]),
        "test_ratio": common.ratio(rows["test loop"], rows["test floor"]),
        "train_ratio_mean": common.ratio(rows["train loop"], rows["train floor"], statistics.fmean),
        "test_ratio_mean": common.ratio(rows["test loop"], rows["test floor"], statistics.fmean),
        "train_episode_ms": ms("train loop"), "train_floor_ms": ms("train floor"),
        "test_episode_ms": ms("test loop"), "test_floor_ms": ms("test floor"),
        "train_episodes_per_s": 1 / statistics.fmean(r["total"] for r in rows["train loop"]),
        "train_data_wait_ms": ms("train loop", "data_wait"), "test_data_wait_ms": ms("test loop", "data_wait"),
        "decode_ms_per_train_episode": 1000 * train_decode_s, "decode_ms_per_test_episode": 1000 * test_decode_s,
        "workers_cpu_s_train_phase": workers_cpu_s,
        "gallery_images": len(bank), "gallery_decode_s": decode_s, "gallery_features_s": features_s,
        "gallery_ready_s": decode_s + features_s, "gallery_ready_over_features": (decode_s + features_s) / features_s,
        "scan_s": scan_s, "toy_generate_s": toy_s, **common.memory_fields(probes),
        "eval_pass_episodes": a.passEpisodes if passes else 0,
        "eval_pass_ms_per_episode_uncached": 1000 * passes[False] if passes else None,
        "eval_pass_ms_per_episode_cached": 1000 * passes[True] if passes else None,
        "eval_cache_speedup": passes[False] / passes[True] if passes else None,
        "train_accuracy": train_acc / train_steps, "timed_steps": {name: len(r) for name, r in rows.items()},
        "breakdown_ms": common.breakdown_ms(columns),
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
