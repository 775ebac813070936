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
import math
import sys

import torch
from torch import nn

from engine.options import stage1_parser
from engine.run import Run
from engine.stage1 import (METRICS, RESUME_KEYS, build_model, distribute, evaluate, load_data, multi_gpu_hint,
                           new_progress, plain_state, train_one_epoch)
from utils.checkpoint import MODELS_DIR, atomic_save
from utils.distributed import DistInfo, all_reduce_sum, barrier, run_distributed
from utils.errors import OptionError
from utils.files import write_json
from utils.interrupt import Interrupted
from utils.options import check_positive, configure_backend, resolve_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    """The stage-1 flags (``engine/options.py``, where the benchmarks read them too)."""
    return stage1_parser()


def main(args: argparse.Namespace) -> int:
    check_positive(args, "imageSize", "Fang", "batchSize", "numEpochs")
    if args.filesPerClass < 0:
        raise OptionError(f"--filesPerClass must be at least 0 (0: every file of each class), got {args.filesPerClass}")
    if args.imageSize < args.Fang:
        raise OptionError(f"--imageSize {args.imageSize} cannot hold a {args.Fang} x {args.Fang} grid")
    return run_distributed(train, args, resolve_device(args))


def train(args: argparse.Namespace, device: torch.device, info: DistInfo) -> int:
    main_path, best_path = MODELS_DIR / f"{args.tensorname}.t7", MODELS_DIR / f"{args.tensorname}_best.t7"
    run = Run(args, RESUME_KEYS, METRICS, main_path, is_main=info.is_main)
    configure_backend(device, args.deterministic, args.seed + info.rank)
    train_split, val, sampler, loader = load_data(args, device, info)
    net, optimizer = build_model(args, train_split.num_classes)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model = distribute(net, device, info)
    hint = multi_gpu_hint(device, info)
    if hint:
        print(hint, flush=True)
    criterion = nn.CrossEntropyLoss()
    start_epoch, progress = 0, new_progress()
    record = {"best_train_loss": math.inf, "best_val": -1.0, "rows": 0}
    if run.resumed is not None:
        net.load_state_dict(run.resumed["model"])
        optimizer.load_state_dict(run.resumed["optimizer"])
        scheduler.load_state_dict(run.resumed["scheduler"])
        start_epoch, progress, record = run.resumed["epoch"], run.resumed["progress"], run.resumed["record"]
        if info.is_main:
            print(f"resuming {args.tensorname} at epoch {start_epoch}, step {progress['step']}")
    barrier(info)
    run.start(record["rows"])

    def save_state(epoch: int) -> None:
        run.save_state({"model": plain_state(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "progress": progress, "record": record})

    with run:
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, args.numEpochs):
                sampler.set_epoch(epoch, start=progress["step"] * loader.batch_size)
                train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, info, progress,
                                stop=lambda: run.interrupted)
                loss_sum, correct, seen = all_reduce_sum([progress["loss_sum"], progress["correct"],
                                                          progress["seen"]], device, info)
                row = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                       "lr": optimizer.param_groups[-1]["lr"], "images_per_s": seen / max(progress["time"], 1e-9)}
                if info.is_main:
                    if row["loss"] < record["best_train_loss"]:
                        record["best_train_loss"] = row["loss"]
                        atomic_save(plain_state(model), main_path)
                    if args.valEpisodes and ((args.valEvery and (epoch + 1) % args.valEvery == 0)
                                             or epoch + 1 == args.numEpochs):
                        row.update(evaluate(model, val, args, device, stop=lambda: run.interrupted))
                        if row["val_1shot"] > record["best_val"]:
                            record["best_val"] = row["val_1shot"]
                            atomic_save(plain_state(model), best_path)
                scheduler.step()
                record["rows"] = run.log(row)
                progress = new_progress()
                save_state(epoch + 1)
                run.announce(row)
                barrier(info)
                if all_reduce_sum([float(run.interrupted)], device, info)[0] > 0:
                    return run.stop(f"after epoch {epoch}")
        except Interrupted as stopped:
            barrier(info)
            save_state(epoch)  # the epoch's finished steps are kept; an interrupted val evaluation is redone
            return run.stop(str(stopped))
    if info.is_main:
        write_json(run.dir / "summary.json", {"lowest_train_loss": record["best_train_loss"], "checkpoint": str(main_path),
                                              "best_val_1shot": record["best_val"], "best_checkpoint": str(best_path)})
        print(f"saved {main_path} (lowest training loss {record['best_train_loss']:.4f})"
              + (f" and {best_path} (val 5-way 1-shot {record['best_val']:.2f} %)" if record["best_val"] >= 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
