"""IDeMe-Net on the ImageNet-1K low-shot benchmark (Hariharan & Girshick, ICCV 2017): the paper's Table 2.

    python lowshot_imagenet.py --imagenet ILSVRC --lowshotmeta label_idx.json \
        --experimentpath 'splitfile_{:d}.json' --trainlist train.json --GNet metaNet_imagenet \
        --tensorname lowshot_imagenet
    torchrun --nproc_per_node=4 lowshot_imagenet.py ...   (feature extraction sharded over the GPUs)

Checks every input before anything is written; then, holding ``runs/<tensorname>/.lock``, embeds the images
once into float16 files under ``runs/<tensorname>/features/`` and scores the test images of each setup, trial
and n against base and novel prototypes, with and without deformed examples on the same draws. Finished
feature files and steps (``trials/``) are reused by a rerun with the same settings. Writes
``lowshot_imagenet.json`` (every metric), ``lowshot_imagenet.csv`` and ``args.json``, and prints the table.
"""
from __future__ import annotations

from utils.runtime import set_process_env

set_process_env()  # before torch loads

import argparse
import resource
import sys
import time
from dataclasses import asdict

import torch

from datasets import Gallery
from datasets.lowshot import RECONSTRUCTION_WARNING
from engine import lowshot
from engine.episode import GalleryBank
from engine.options import LowShotConfig, lowshot_eval_config, lowshot_parser
from engine.run import run_lock
from engine.stage2 import build_model
from utils.distributed import DistInfo, barrier, run_distributed
from utils.files import RUNS_DIR, write_csv, write_json
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt, Interrupted
from utils.options import configure_backend, resolve_device, run_cli

get_args_parser = lowshot_parser  # the flags live in engine/options.py


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    return run_distributed(evaluate, lowshot_eval_config(device, **vars(args)), device)


def evaluate(config: LowShotConfig, device: torch.device, info: DistInfo) -> int:
    """Check every input (nothing is written before), then embed and evaluate holding the run's lock."""
    bench = lowshot.read_benchmark(config)
    configure_backend(device, config.deterministic, config.seed, tf32=bool(config.tf32))
    model = build_model(config, device)
    if info.is_main and bench.images.reconstructed:
        print(f"warning: {RECONSTRUCTION_WARNING}", file=sys.stderr, flush=True)
    run_dir = RUNS_DIR / config.tensorname
    with run_lock(run_dir, info):
        embedding = lowshot.state_digest(model.backbone)  # features of other weights never mix
        folder = run_dir / "features" / f"{embedding}_{config.imageSize}px{'_bf16' if config.amp else ''}"
        with GracefulInterrupt() as interrupt:
            stop = lambda: interrupt.requested  # noqa: E731
            try:
                # Every rank checks the feature folders (all refuse alike); the main one writes the manifests.
                stores = lowshot.feature_stores(bench, folder, config.imageSize, create=info.is_main)
                if info.is_main:
                    write_json(run_dir / "args.json", asdict(config))
                start = time.perf_counter()
                missing = {name: store.missing() for name, store in stores.items()}
                barrier(info)  # every rank has read the same missing blocks before any is written
                to_embed = sum(len(stores[name].block_files(b)) for name, blocks in missing.items() for b in blocks)
                for name, store in stores.items():
                    store.extract(model.embed, device, config.batchSize, config.nthreads, bool(config.amp), info, stop,
                                  bool(config.progress) and info.is_main, name, missing[name])
                features_s = time.perf_counter() - start
                barrier(info)
                if not info.is_main:
                    return 0
                start = time.perf_counter()
                trials = lowshot.TrialStore(run_dir / "trials", model, stores, config)
                features = {name: store.load() for name, store in stores.items()}
                bank = None
                if bench.gallery_split is not None:
                    gallery = Gallery(bench.gallery_split, config.galleryNum, config.imageSize, config.nthreads,
                                      progress=bool(config.progress), stop=stop)
                    # No original to follow here: the gallery is embedded with the GNet's saved statistics.
                    bank = GalleryBank(gallery, model, device, config.batchSize, bool(config.amp), stop=stop,
                                       batch_norm="eval")
                results = {name: lowshot.evaluate_setup(bench, setup, model, bank, features, config, device, stop,
                                                        trials) for name, setup in bench.setups.items()}
            except Interrupted as stopped:
                print(f"stopped {stopped}; the finished feature files and trials are kept (the same command continues "
                      "from them)", flush=True)
                return INTERRUPTED_EXIT
        evaluation_s = time.perf_counter() - start
        augnum = {n: lowshot.lowshot_config(config, n, 0).augnum for n in config.lowshotn}
        deformed = 0 if config.deform == "none" else sum(len(bench.setups[s].novel) * n * augnum[n]
                                                         for s, _, n in trials.computed)
        reused = len(bench.setups) * len(config.trials) * len(config.lowshotn) - len(trials.computed)
        peak = {"peak_cpu_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if device.type == "cuda":
            peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        timing = {"images_embedded": to_embed, "features_s": features_s,
                  "s_per_image": features_s / to_embed if to_embed else None, "deformed_images": deformed,
                  "evaluation_s": evaluation_s, "s_per_deformed_image": evaluation_s / deformed if deformed else None,
                  "steps_reused": reused, "processes": info.world_size, "device": str(device), **peak}
        result = lowshot.report(bench, results, config, timing)
        write_json(run_dir / "lowshot_imagenet.json", result)
        rows = lowshot.table_rows(result)
        write_csv(run_dir / "lowshot_imagenet.csv", rows, list(rows[0]))
        print(lowshot.format_table(result))
        again = f", {reused} finished (setup, trial, n) steps reused" if reused else ""
        print(f"features: {to_embed} images embedded in {features_s:.1f} s; evaluation ({deformed} deformed images"
              f"{again}) {evaluation_s:.1f} s; peak memory {peak['peak_cpu_memory_mb']:.0f} MB; "
              f"wrote {run_dir / 'lowshot_imagenet.json'}")
        return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
