"""Stage 1: pre-train the ResNet embedding (``--backbone``, ResNet-18 by default) on the base classes with
soft-random patch blending.

    python classification.py --dataroot DATA --tensorname softRandom
    torchrun --nproc_per_node=4 classification.py --dataroot DATA --tensorname softRandom

Writes ``models/<tensorname>.t7`` (lowest training loss, the original's file),
``models/<tensorname>_best.t7`` (best val 5-way 1-shot accuracy of a prototype classifier)
and ``runs/<tensorname>/`` (args.json, metrics.csv, resume.pt, TensorBoard events).
"""
from __future__ import annotations

from utils.runtime import set_process_env

set_process_env()  # before torch loads

import argparse
import functools
import math
import sys

import torch
from torch import nn

from engine.options import stage1_parser
from engine.precise_bn import clean_files
from engine.run import Run
from engine.stage1 import (
    METRICS,
    RESUME_KEYS,
    SUMMED_PROGRESS,
    build_model,
    console_row,
    distribute,
    evaluate,
    load_data,
    multi_gpu_hint,
    new_progress,
    plain_state,
    precise_copy,
    train_one_epoch,
)
from utils.checkpoint import MODELS_DIR, atomic_save
from utils.distributed import DistInfo, all_reduce_sum, barrier, run_distributed
from utils.errors import OptionError
from utils.files import write_json
from utils.forward import grad_scaler, load_scaler_state
from utils.interrupt import Interrupted
from utils.options import check_positive, configure_backend, resolve_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    """The stage-1 flags (``engine/options.py``, where the benchmarks read them too)."""
    return stage1_parser()


def main(args: argparse.Namespace) -> int:
    check_positive(args, "imageSize", "Fang", "batchSize", "numEpochs")
    if args.preciseBN < 0 or args.preciseBN == 1:
        raise OptionError(f"--preciseBN must be 0 (off) or at least 2 images, got {args.preciseBN}")
    if args.filesPerClass < 0:
        raise OptionError(f"--filesPerClass must be at least 0 (0: every file of each class), got {args.filesPerClass}")
    if args.imageSize < args.Fang:
        raise OptionError(f"--imageSize {args.imageSize} cannot hold a {args.Fang} x {args.Fang} grid")
    return run_distributed(train, args, resolve_device(args))


def train(args: argparse.Namespace, device: torch.device, info: DistInfo) -> int:
    main_path, best_path = MODELS_DIR / f"{args.tensorname}.t7", MODELS_DIR / f"{args.tensorname}_best.t7"
    run = Run(args, RESUME_KEYS, METRICS, main_path, info)
    configure_backend(device, args.deterministic, args.seed + info.rank, args.memoryFormat, bool(args.tf32))
    train_split, val, sampler, loader = load_data(args, device, info)
    precise_files = clean_files(train_split, args.preciseBN, args.seed, args.filesPerClass) if args.preciseBN else []
    selected_on = "val_1shot_precise" if precise_files else "val_1shot"
    net, optimizer = build_model(args, train_split.num_classes)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model = distribute(net, device, info)
    hint = multi_gpu_hint(device, info)
    if hint:
        print(hint, flush=True)
    criterion = nn.CrossEntropyLoss()
    scaler = grad_scaler(device, bool(args.amp))
    start_epoch, progress = 0, new_progress()
    record = {"best_train_loss": math.inf, "best_val": -1.0, "rows": 0}
    if run.resumed is not None:
        net.load_state_dict(run.resumed["model"])
        optimizer.load_state_dict(run.resumed["optimizer"])
        scheduler.load_state_dict(run.resumed["scheduler"])
        load_scaler_state(scaler, run.resumed.get("scaler"))
        start_epoch, progress, record = run.resumed["epoch"], run.resumed["progress"], run.resumed["record"]
        if not info.is_main:  # the saved sums cover every process; the main one carries them on
            progress.update({key: 0 for key in SUMMED_PROGRESS})
        if info.is_main:
            print(f"resuming {args.tensorname} at epoch {start_epoch}, step {progress['step']}")
    barrier(info)
    run.start(record["rows"])

    def save_state(epoch: int) -> None:
        """Write the resumable state (every process calls it: the epoch's sums are added up)."""
        totals = dict(zip(SUMMED_PROGRESS, all_reduce_sum([progress[k] for k in SUMMED_PROGRESS], device, info)))
        run.save_state({"model": plain_state(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                        "progress": {**progress, **totals}, "record": record})

    with run:
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, args.numEpochs):
                sampler.set_epoch(epoch, start=progress["step"] * loader.batch_size)
                train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, info, progress,
                                stop=lambda: run.interrupted, scaler=scaler)
                loss_sum, correct, seen = all_reduce_sum([progress[k] for k in SUMMED_PROGRESS], device, info)
                row = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                       "lr": optimizer.param_groups[-1]["lr"], "images_per_s": seen / max(progress["time"], 1e-9)}
                # Every rank keeps the same record and evaluates its share of the val episodes; the
                # main one writes. With --preciseBN the files hold re-estimated statistics, computed
                # once, when first needed, by every rank (no collective inside; the decision to need
                # them is the same on every rank).
                precise_stop = None if info.enabled else (lambda: run.interrupted)
                saved = functools.cache(lambda: precise_copy(model, precise_files, args, device, stop=precise_stop)
                                        if precise_files else model)
                if row["loss"] < record["best_train_loss"]:
                    record["best_train_loss"] = row["loss"]
                    if info.is_main:
                        atomic_save(plain_state(saved()), main_path)
                if args.valEpisodes and ((args.valEvery and (epoch + 1) % args.valEvery == 0)
                                         or epoch + 1 == args.numEpochs):
                    row.update(evaluate(model, val, args, device, info, stop=lambda: run.interrupted))
                    if precise_files:
                        row.update(evaluate(saved(), val, args, device, info, stop=lambda: run.interrupted,
                                            suffix="_precise"))
                    if row[selected_on] > record["best_val"]:
                        record["best_val"] = row[selected_on]
                        if info.is_main:
                            atomic_save(plain_state(saved()), best_path)
                scheduler.step()
                record["rows"] = run.log(row)
                progress = new_progress()
                save_state(epoch + 1)
                run.announce(console_row(row))
                barrier(info)
                if all_reduce_sum([float(run.interrupted)], device, info)[0] > 0:
                    return run.stop(f"after epoch {epoch}")
        except Interrupted as stopped:
            barrier(info)
            save_state(epoch)  # the epoch's finished steps are kept; an interrupted val evaluation is redone
            return run.stop(str(stopped))
    if info.is_main:
        write_json(run.dir / "summary.json", {"lowest_train_loss": record["best_train_loss"],
                                              "checkpoint": str(main_path), "best_val_1shot": record["best_val"],
                                              "best_checkpoint": str(best_path), "selected_on": selected_on,
                                              "preciseBN": args.preciseBN})
        statistics = f", BatchNorm statistics re-estimated over {len(precise_files)} images" if precise_files else ""
        print(f"saved {main_path} (lowest training loss {record['best_train_loss']:.4f}{statistics})"
              + (f" and {best_path} ({selected_on.replace('_', ' ')} {record['best_val']:.2f} %)"
                 if record["best_val"] >= 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
