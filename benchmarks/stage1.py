"""Benchmark of stage 1 (docs/original.md §3): images/s of the engine's training epoch with data loading vs preloaded.

    python -m benchmarks.stage1 --imageSize 84 --batchSize 64 --steps 10
    python -m benchmarks.stage1 --device cuda --amp 1 --steps 30

``engine.stage1.train_one_epoch`` over --warmup + --steps batches of ``load_data``'s DataLoader
(loader), then over the same batches from memory (preloaded), reporting its sections to a
StepTimer (benchmarks/README.md). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import sys

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m benchmarks.stage1\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

from dataclasses import replace

import torch
from torch import nn

from benchmarks import common
from benchmarks.common import StepTimer, Stopwatch
from engine import stage1
from engine.fewshot import evaluate_embedding
from engine.options import Stage1Config, add_batch_flag, add_files_per_class_flag, stage1_config
from engine.timing import NO_TIMER, Timer
from utils.distributed import DistInfo
from utils.errors import OptionError
from utils.forward import grad_scaler
from utils.metrics import mean_ci95
from utils.options import configure_backend, resolve_device, run_cli

ROWS = ["data_wait", "prepare", "forward", "backward", "optimizer", "bookkeeping", "unaccounted", "total"]


def get_args_parser() -> argparse.ArgumentParser:
    p = common.parser("Stage-1 benchmark: images/s with vs without data loading")
    p.add_argument("--toyPerClass", type=int, default=30, help="toy images per class")
    add_batch_flag(p, 128, "images per training step, as stage 1's --batchSize")
    add_files_per_class_flag(p, use=" by stage 1's loader")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--monitorEpisodes", type=int, default=30,
                   help="episodes of each val monitor pass (1- and 5-shot), cached against uncached (0: none); 30 on "
                   "the toy val split (16 x 30 images) has the ratio of 600 episodes to miniImageNet's 9,600 images")
    p.add_argument("--monitorQueries", type=int, default=15, help="query images per class in the monitor's episodes")
    return p


class Stage1Run:
    """Stage 1 on this process as classification.py builds it for ``config`` (``info``: its share under
    distribution): the data (``scan_s``: seconds building it), model, optimiser, criterion and (float16
    ``--amp``) loss scaler; training passes (:meth:`train`, :meth:`loader_then_preloaded`)."""

    def __init__(self, config: Stage1Config, device: torch.device, info: DistInfo = DistInfo()) -> None:
        self.config, self.device, self.info = config, device, info
        self.scan_s, (train, self.val, self.sampler, self.loader) = common.timed(device, stage1.load_data, config,
                                                                                  device, info)
        self.net, self.optimizer = stage1.build_model(config, train.num_classes)
        self.model, self.criterion = stage1.distribute(self.net, device, info), nn.CrossEntropyLoss()
        self.scaler = grad_scaler(device, bool(config.amp))

    def train(self, batches, timer: Timer = NO_TIMER) -> dict:
        """One pass of epoch 0 over ``batches``, each step reported to ``timer``; its progress."""
        progress = stage1.new_progress()
        stage1.train_one_epoch(self.model, self.criterion, self.optimizer, batches, self.device, 0, self.config,
                               self.info, progress, lambda: False, timer, self.scaler)
        return progress

    def loader_then_preloaded(self, count: int, timers: dict[str, Stopwatch | StepTimer]) -> tuple[list, float, dict]:
        """The loader's first ``count`` batches trained on as they come (``with timers["loader"]``), then the
        loader dropped (its persistent workers stop) and the same batches trained on from memory (``with
        timers["preloaded"]``): the batches, the workers' CPU seconds, the first pass's progress."""
        kept, cpu0 = common.FirstItems(self.loader, count), common.children_cpu_s()
        self.loader = None
        with timers["loader"] as timer:
            progress = self.train(kept, timer)
        kept.loader = None  # its last reference
        workers_cpu_s = common.children_cpu_s() - cpu0
        with timers["preloaded"] as timer:
            self.train(kept.items, timer)
        return kept.items, workers_cpu_s, progress


def main(a: argparse.Namespace) -> None:
    env, root, toy_s, holder = common.setup(a, a.toyPerClass)
    config = stage1_config(dataroot=str(root), tensorname="benchmark", imageSize=a.imageSize, batchSize=a.batchSize,
                           filesPerClass=a.filesPerClass, nthreads=a.nthreads, seed=a.seed, amp=int(a.amp),
                           progress=0, valEpisodes=0, device=a.device)
    device, need = resolve_device(config), a.warmup + a.steps
    configure_backend(device, False, config.seed)
    run = Stage1Run(config, device)
    dataset = run.loader.dataset
    if len(dataset) < need * config.batchSize:
        raise OptionError(f"the loader has {len(dataset)} images, --warmup + --steps need {need} full batches "
                          "(raise --toyPerClass or lower --batchSize)")
    run.sampler.set_epoch(0)
    keys = list(run.sampler)[:16]  # one item (uint8 crops of an image and partner), single-threaded
    item_s = common.timed(device, lambda: [dataset[key] for key in keys])[0] / len(keys)
    probes = {phase: common.MemoryProbe(device, a.pssInterval) for phase in ("loader", "preloaded")}
    timers = {phase: StepTimer(device, a.warmup, a.steps, probe) for phase, probe in probes.items()}
    batches, workers_cpu_s, _ = run.loader_then_preloaded(need, timers)
    rows = {phase: timer.rows for phase, timer in timers.items()}

    monitor, monitor_accuracy = {}, {}
    if a.monitorEpisodes:  # the val monitor as the script runs it (both shots), against the per-episode path
        monitor_config = replace(config, valEpisodes=a.monitorEpisodes, valQueries=a.monitorQueries)
        monitor[True], cached = common.timed(device, stage1.evaluate, run.model, run.val, monitor_config, device)
        monitor[False], uncached = common.timed(device, lambda: [evaluate_embedding(
            run.net.features, run.val, config.imageSize, 5, shots, a.monitorQueries, a.monitorEpisodes, config.seed,
            device, 1, config.batchSize, config.nthreads, config.amp, progress=False, cached=False)
            for shots in (1, 5)])
        for shots, accuracies in zip((1, 5), uncached):  # the same numbers either way: only the time differs
            monitor_accuracy[f"monitor_val_{shots}shot_cached"] = cached[f"val_{shots}shot"]
            monitor_accuracy[f"monitor_val_{shots}shot_uncached"] = mean_ci95([100 * acc for acc in accuracies])[0]

    columns, table = common.print_table(
        f"median ms per step, {device.type}{' amp' if config.amp else ''}, {config.imageSize} px, batch "
        f"{config.batchSize}, nthreads {config.nthreads}, {a.steps}+{a.warmup} warmup steps", rows, ROWS,
        "TOTAL per step")
    ips = {phase: config.batchSize * len(r) / sum(row["total"] for row in r) for phase, r in rows.items()}
    images = batches[0][0]
    summary = {
        "benchmark": "stage1", "device": str(device), "amp": bool(config.amp), "imageSize": config.imageSize,
        "batchSize": config.batchSize, "nthreads": config.nthreads, "steps": a.steps, "warmup": a.warmup,
        "images_per_s_loader": ips["loader"], "images_per_s_preloaded": ips["preloaded"],
        "loading_ratio": columns["loader"]["total"] / columns["preloaded"]["total"],
        "throughput_ratio": ips["preloaded"] / ips["loader"],
        "step_ms_loader": 1000 * columns["loader"]["total"], "step_ms_preloaded": 1000 * columns["preloaded"]["total"],
        "data_wait_ms": 1000 * columns["loader"]["data_wait"],
        "decode_ms_per_image": 1000 * item_s, "decode_s_per_batch_one_core": item_s * config.batchSize,
        "workers_cpu_s_loader_phase": workers_cpu_s, "batch_mb": images.element_size() * images.nelement() / 2**20,
        "batch_dtype": str(images.dtype).replace("torch.", ""), **common.memory_fields(probes),
        "scan_s": run.scan_s, "toy_generate_s": toy_s, "monitor_episodes": a.monitorEpisodes,
        "monitor_s_uncached": monitor.get(False), "monitor_s_cached": monitor.get(True),
        "monitor_cache_speedup": monitor[False] / monitor[True] if monitor else None, **monitor_accuracy, **table,
    }
    print(f"\nimages/s: {ips['loader']:.1f} with the loader, {ips['preloaded']:.1f} preloaded (step time ratio "
          f"{summary['loading_ratio']:.3f}); one item in this process {1000 * item_s:.1f} ms; peak memory of the "
          f"loader phase with the workers {summary['loader_peak_total_mb']:.0f} MB")
    if monitor:
        print(f"val monitor, {a.monitorEpisodes} + {a.monitorEpisodes} episodes: {monitor[False]:.1f} s uncached, "
              f"{monitor[True]:.1f} s cached ({summary['monitor_cache_speedup']:.2f} x)")
    common.finish(summary, env, a.json, holder, device)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
