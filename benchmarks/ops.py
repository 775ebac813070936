"""ATen operations dispatched per stage-2 training episode, per round: the host's work per episode that a
GPU turns into kernel launches (benchmarks/README.md, "benchmarks/ops.py").

    python -m benchmarks.ops                       # toy data, 32 px, CPU: the issue's counting set-up
    python -m benchmarks.ops --imageSize 84 --json ops.json
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m benchmarks.ops\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common
from benchmarks.episode import Stage2Run, add_episode_flags, engine_config
from datasets import Gallery
from engine import stage2
from engine.options import Stage2Config
from utils.options import configure_backend, run_cli

# name -> (fixCls, fixAttention, warm)
ROUNDS = {"round1_warm": (1, 0, True), "round1_cold": (1, 0, False), "round2": (0, 0, False),
          "round2_recipe": (0, 1, False)}
# Operations that launch no kernel on a GPU (metadata, allocation, host reads of host tensors, markers).
HOST_ONLY = frozenset({
    "aten.view.default", "aten._unsafe_view.default", "aten._reshape_alias.default", "aten.alias.default",
    "aten.detach.default", "aten.expand.default", "aten.t.default", "aten.transpose.int", "aten.permute.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.default", "aten.slice.Tensor", "aten.select.int",
    "aten.as_strided.default", "aten.split.Tensor", "aten.unbind.int", "aten.empty.memory_format",
    "aten.empty_strided.default", "aten.lift_fresh.default", "aten._local_scalar_dense.default",
    "profiler._record_function_enter_new.default", "profiler._record_function_exit._RecordFunction"})


def get_args_parser() -> argparse.ArgumentParser:
    p = common.parser("ATen operations per stage-2 training episode, rounds 1 (warm and cold cache) and 2")
    add_episode_flags(p)
    p.set_defaults(imageSize=32, device="cpu", nthreads=0, galleryNum=15)
    p.add_argument("--short", type=int, default=8, help="episodes of the shorter run")
    p.add_argument("--long", type=int, default=24, help="episodes of the longer run")
    p.add_argument("--top", type=int, default=12, help="operations listed per round, most frequent first")
    return p


class OpCounter(TorchDispatchMode):
    """Counts each ATen operation dispatched while active and ``counting``, by name (``aten.add_.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts, self.counting = Counter(), True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(config: Stage2Config, device: torch.device, splits: dict, gallery: Gallery, episodes,
          length: int, warm: bool) -> Counter:
    """Operations of one training pass over the first ``length`` of ``episodes`` (an EpisodeDataset of
    ``config``' round), decoded ahead, on a fresh model, optimisers and (round 1) feature cache, filled
    first when ``warm``."""
    torch.manual_seed(config.seed)
    run = Stage2Run(config, device, splits, gallery)
    cache = run.feature_cache()
    if warm:
        cache.fill(episodes, 0, progress=False)
    items = [episodes[i] for i in range(length)]
    with OpCounter() as counter:
        run.train(items, 0 if config.fixCls else 1, cache=cache)
    return counter.counts


def main(a: argparse.Namespace) -> None:
    env, root, _, holder = common.setup(a, max(a.galleryNum, a.shots + a.queries))
    summary = {"environment": env, "imageSize": a.imageSize, "shots": a.shots, "batchSize": a.batchSize,
               "short": a.short, "long": a.long, "ops_per_episode": {}, "kernels_per_episode": {}, "top": {}}
    for name, (fix_cls, fix_attention, warm) in ROUNDS.items():
        config, device = engine_config(a, root, fixCls=fix_cls, fixAttention=fix_attention)
        summary.update(augnum=config.augnum, chooseNum=config.chooseNum)  # the shot-dependent defaults resolved
        configure_backend(device, False, config.seed)
        splits = stage2.load_splits(config, need_train=True)
        gallery = Gallery(splits["train"], config.galleryNum, config.imageSize, 0, progress=False)
        episodes = stage2.episodes(splits["train"], config, stage2.episode_config(config, config.trainways, True),
                                   a.long, stage2.TRAIN_STREAM, len(gallery))
        episodes.set_epoch(0 if fix_cls else 1)
        short, long = (count(config, device, splits, gallery, episodes, n, warm) for n in (a.short, a.long))
        per_episode = {op: (long[op] - short[op]) / (a.long - a.short) for op in long | short}
        summary["ops_per_episode"][name] = round(sum(per_episode.values()), 1)
        summary["kernels_per_episode"][name] = round(sum(n for op, n in per_episode.items() if op not in HOST_ONLY), 1)
        summary["top"][name] = {op: round(n, 2) for op, n in
                                sorted(per_episode.items(), key=lambda kv: -kv[1])[:a.top]}
        print(f"{name}: {summary['ops_per_episode'][name]:.1f} ATen operations per training episode, "
              f"{summary['kernels_per_episode'][name]:.1f} of them launching a kernel on a GPU "
              f"({a.long} - {a.short} episodes)", flush=True)
    common.finish(summary, env, a.json, holder)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
