"""Before the demo runs: time a few of its steps on this machine and print an estimate of its total time.

    python -m scripts.demo_estimate --dataroot data/toy --imageSize 48 --stage1Epochs 4 --episodes 60 ...

It times, with the engine's own functions on the demo's data and sizes, a few stage-1 training
steps, the embedding of images, the gallery, a few stage-2 training episodes and a few cached
evaluation episodes, then scales each by what the demo will run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.demo_estimate\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import argparse
import os
import platform
import time

import torch
from torch import nn

from datasets import Gallery
from datasets.loaders import episode_loader
from engine import stage1, stage2
from engine.episode import GalleryBank
from engine.features import FeatureCache
from engine.options import (
    add_files_per_class_flag,
    add_gallery_num_flag,
    add_image_size_flag,
    stage1_config,
    stage2_config,
)
from models import IDeMeNet
from utils.distributed import DistInfo
from utils.forward import compute_layout, layout_model
from utils.interrupt import Interrupted
from utils.options import add_dataroot_flag, add_threads_flag, run_cli

SCRIPT_START_S = 4.0  # one script's start: importing torch, scanning the splits (measured on two cores)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataroot_flag(p, None, required=True)
    add_image_size_flag(p, None, "of every run")
    add_threads_flag(p, 2)
    p.add_argument("--stage1Epochs", type=int, required=True)
    p.add_argument("--stage1Batch", type=int, required=True)
    add_files_per_class_flag(p, None, " by stage 1")
    p.add_argument("--monitorEpisodes", type=int, required=True, help="stage 1's val episodes per shot setting")
    p.add_argument("--stage2Epochs", type=int, required=True)
    p.add_argument("--episodes", type=int, required=True, help="stage-2 training episodes per epoch")
    add_gallery_num_flag(p, None)
    p.add_argument("--valEpisodes", type=int, required=True)
    p.add_argument("--testEpisodes", type=int, required=True, help="test episodes after training")
    p.add_argument("--evalEpisodes", type=int, required=True, help="test episodes of the closing --evaluate")
    return p


def timed_steps(run, steps: int) -> float:
    """Seconds per step of ``run(stop)`` stopped after ``1 + steps`` steps, the first one untimed."""
    marks = []

    def stop() -> bool:
        marks.append(time.perf_counter())
        return len(marks) > steps

    try:
        run(stop)
    except Interrupted:
        pass
    return (marks[-1] - marks[0]) / steps


def main(a: argparse.Namespace) -> int:
    device = torch.device("cpu")
    torch.manual_seed(0)
    common = {"dataroot": a.dataroot, "imageSize": a.imageSize, "nthreads": a.nthreads, "device": "cpu", "progress": 0,
              "tensorname": "estimate"}
    config1 = stage1_config(**common, batchSize=a.stage1Batch, valEpisodes=0, filesPerClass=a.filesPerClass)
    train, val, _, loader = stage1.load_data(config1, device, DistInfo())
    net, optimizer = stage1.build_model(config1, train.num_classes)
    net = stage1.distribute(net, device, DistInfo())
    step1 = timed_steps(lambda stop: stage1.train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, loader, device, 0,
                                                            config1, DistInfo(), stage1.new_progress(), stop), 2)
    net.eval()
    tick = time.perf_counter()
    with torch.no_grad():
        net.features(compute_layout(torch.randn(64, 3, a.imageSize, a.imageSize)))
    per_image = (time.perf_counter() - tick) / 64

    config2 = stage2_config(device, **common, network="random-init", galleryNum=a.galleryNum, fixCls=1)
    splits = stage2.load_splits(config2, need_train=True)
    model = layout_model(IDeMeNet(train.num_classes, a.imageSize, config2.Fang).eval())
    tick = time.perf_counter()
    bank = GalleryBank(Gallery(splits["train"], a.galleryNum, a.imageSize, a.nthreads, progress=False), model,
                       device, config2.batchSize)
    gallery_s = time.perf_counter() - tick
    groups, (optimizers, _) = stage2.param_groups(model, config2), stage2.make_optimizers(model, config2)
    train_config = stage2.episode_config(config2, config2.trainways, True)
    train_set = stage2.episodes(splits["train"], config2, train_config, 4, stage2.TRAIN_STREAM, len(bank))
    cache = FeatureCache(model.embed, len(splits["train"]), device, config2.batchSize)
    episode2 = timed_steps(lambda stop: stage2.train_one_epoch(
        model, episode_loader(train_set, a.nthreads, device), bank, train_config,
        device, 0, groups, optimizers, model.embed, stage2.new_progress(), stop, show=False, cache=cache), 2)
    test_set = stage2.episodes(splits["test"], config2, stage2.episode_config(config2, config2.ways), 4,
                               stage2.TEST_STREAM, len(bank), evaluation=True)
    test_cache = FeatureCache(model.embed, len(splits["test"]), device, config2.batchSize)
    test_cache.fill(test_set, a.nthreads, progress=False)
    evaluation = timed_steps(lambda stop: stage2.evaluate(model, test_set, bank, config2, device, "estimate",
                                                          model.embed, stop=stop, cache=test_cache), 2)

    samples = len(loader.dataset)  # stage 1's list, used twice per epoch
    stage1_s = a.stage1Epochs * samples / a.stage1Batch * step1 + len(val) * per_image \
        + 2 * a.monitorEpisodes * 0.002 + SCRIPT_START_S
    passes = a.stage2Epochs * a.valEpisodes + a.testEpisodes
    stage2_s = SCRIPT_START_S + gallery_s + a.stage2Epochs * a.episodes * episode2 + passes * evaluation \
        + (len(splits["val"]) + len(splits["test"])) * per_image
    evaluate_s = SCRIPT_START_S + gallery_s + a.evalEpisodes * evaluation + len(splits["test"]) * per_image
    total = stage1_s + stage2_s + evaluate_s + SCRIPT_START_S
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"estimated time: {total / 60:.1f} min on this machine ({cpu}, {os.cpu_count()} cores): stage 1 "
          f"~{stage1_s / 60:.1f} min, stage 2 ~{stage2_s / 60:.1f} min, evaluation ~{evaluate_s / 60:.1f} min",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
