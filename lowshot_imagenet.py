"""IDeMe-Net on the ImageNet-1K low-shot benchmark (Hariharan & Girshick, ICCV 2017): the paper's Table 2.

    python lowshot_imagenet.py --imagenet ILSVRC --lowshotmeta label_idx.json \
        --experimentpath 'splitfile_{:d}.json' --trainlist train.json --GNet metaNet_imagenet \
        --tensorname lowshot_imagenet
    torchrun --nproc_per_node=4 lowshot_imagenet.py ...   (feature extraction sharded over the GPUs)

Checks every input first (a bad one is refused with one line, before anything is written), then,
holding ``runs/<tensorname>/.lock``, embeds the base classes' training images, the trials' n-shot images and the setups' test images
once into float16 files under ``runs/<tensorname>/features/`` (resumable), then per setup, trial
and n scores the test images against base and novel prototypes, with and without deformed
examples on the same draws (each finished step kept in ``runs/<tensorname>/trials/``, reused by a
rerun with the same settings: a stopped evaluation continues). Writes ``runs/<tensorname>/lowshot_imagenet.json`` (every metric),
``lowshot_imagenet.csv`` and ``args.json``, and prints the table.
"""
from __future__ import annotations

from utils.runtime import set_process_env

set_process_env()  # before torch loads

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from datasets import Gallery
from datasets.lowshot import RECONSTRUCTION_WARNING
from engine.episode import GalleryBank
from engine.lowshot import (Benchmark, TrialStore, embedding_key, evaluate_setup, feature_stores, format_table,
                            lowshot_config, read_benchmark, report, table_rows, trial_settings)
from engine.options import lowshot_parser, resolve_lowshot_args
from engine.run import run_lock
from engine.stage2 import build_model
from models.idemenet import IDeMeNet
from utils.distributed import DistInfo, barrier, run_distributed
from utils.files import RUNS_DIR, write_csv, write_json
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt, Interrupted
from utils.options import configure_backend, resolve_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    """The flags (``engine/options.py``)."""
    return lowshot_parser()


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    resolve_lowshot_args(args, device)
    return run_distributed(evaluate, args, device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak allocated GPU memory on CUDA), in MB."""
    peak = {"peak_cpu_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak


def evaluate(args: argparse.Namespace, device: torch.device, info: DistInfo) -> int:
    """Check every input (nothing is written before), then evaluate holding the run's lock."""
    bench = read_benchmark(args)
    configure_backend(device, args.deterministic, args.seed, tf32=bool(args.tf32))
    model = build_model(args, device)
    if info.is_main and bench.images.reconstructed:
        print(f"warning: {RECONSTRUCTION_WARNING}", file=sys.stderr, flush=True)
    run_dir = RUNS_DIR / args.tensorname
    with run_lock(run_dir, info):
        return evaluate_checked(bench, model, run_dir, args, device, info)


def evaluate_checked(bench: Benchmark, model: IDeMeNet, run_dir: Path, args: argparse.Namespace,
                     device: torch.device, info: DistInfo) -> int:
    """Features, the setups' trials and the report of a checked benchmark, into ``run_dir``."""
    folder = run_dir / "features" / f"{embedding_key(model)}_{args.imageSize}px{'_bf16' if args.amp else ''}"
    with GracefulInterrupt() as interrupt:
        stop = lambda: interrupt.requested  # noqa: E731
        try:
            # Every rank checks the feature folders (a refusal is raised by all of them); the main
            # process writes the manifests.
            stores = feature_stores(bench, folder, args.imageSize, create=info.is_main)
            if info.is_main:
                write_json(run_dir / "args.json", vars(args))
            start = time.perf_counter()
            missing = {name: store.missing() for name, store in stores.items()}
            barrier(info)  # every rank has read the same missing blocks before any is written
            to_embed = sum(len(stores[name].files[b * stores[name].block:(b + 1) * stores[name].block])
                           for name, blocks in missing.items() for b in blocks)
            for name, store in stores.items():
                store.extract(model.embed, device, args.batchSize, args.nthreads, bool(args.amp), info, stop,
                              bool(args.progress) and info.is_main, name, missing[name])
            features_s = time.perf_counter() - start
            barrier(info)
            if not info.is_main:
                return 0
            start = time.perf_counter()
            trials = TrialStore(run_dir / "trials", trial_settings(model, stores, args))
            features = {name: store.load() for name, store in stores.items()}
            bank = None
            if bench.gallery_split is not None:
                gallery = Gallery(bench.gallery_split, args.galleryNum, args.imageSize, args.nthreads,
                                  progress=bool(args.progress), stop=stop)
                # No original to follow here: the gallery is embedded with the GNet's saved statistics.
                bank = GalleryBank(gallery, model, device, args.batchSize, bool(args.amp), stop=stop,
                                   batch_norm="eval")
            results = {name: evaluate_setup(bench, setup, model, bank, features, args, device, stop, trials)
                       for name, setup in bench.setups.items()}
        except Interrupted as stopped:
            print(f"stopped {stopped}; the finished feature files and trials are kept (the same command continues "
                  "from them)", flush=True)
            return INTERRUPTED_EXIT
    evaluation_s = time.perf_counter() - start
    deformed = 0 if args.deform == "none" else sum(
        len(bench.setups[name].novel) * n * lowshot_config(args, n, 0).augnum for name, _, n in trials.computed)
    reused = len(bench.setups) * len(args.trials) * len(args.lowshotn) - len(trials.computed)
    timing = {"images_embedded": to_embed, "features_s": features_s,
              "s_per_image": features_s / to_embed if to_embed else None, "deformed_images": deformed,
              "evaluation_s": evaluation_s, "s_per_deformed_image": evaluation_s / deformed if deformed else None,
              "steps_reused": reused, "processes": info.world_size, "device": str(device), **peak_memory_mb(device)}
    result = report(bench, results, args, timing)
    write_json(run_dir / "lowshot_imagenet.json", result)
    rows = table_rows(result)
    write_csv(run_dir / "lowshot_imagenet.csv", rows, list(rows[0]))
    print(format_table(result))
    again = f", {reused} finished (setup, trial, n) steps reused" if reused else ""
    print(f"features: {to_embed} images embedded in {features_s:.1f} s; evaluation ({deformed} deformed images{again}) "
          f"{evaluation_s:.1f} s; peak memory {timing['peak_cpu_memory_mb']:.0f} MB; "
          f"wrote {run_dir / 'lowshot_imagenet.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
