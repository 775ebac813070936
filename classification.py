"""Stage 1: pre-train the ResNet embedding (``--backbone``, ResNet-18 by default) on the base classes with
soft-random patch blending.

    python classification.py --dataroot DATA --tensorname softRandom
    torchrun --nproc_per_node=4 classification.py --dataroot DATA --tensorname softRandom

Writes ``models/<tensorname>.t7`` (lowest training loss, the original's file),
``models/<tensorname>_best.t7`` (best val 5-way 1-shot accuracy of a prototype classifier)
and ``runs/<tensorname>/`` (config.json, metrics.csv, resume.pt, TensorBoard events).
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

from engine import stage1
from engine.options import Stage1Config, stage1_config, stage1_parser
from engine.precise_bn import clean_files
from engine.run import Run
from utils.checkpoint import MODELS_DIR
from utils.distributed import DistInfo, all_reduce_sum, barrier, run_distributed
from utils.files import write_json
from utils.forward import grad_scaler
from utils.interrupt import Interrupted
from utils.options import configure_backend, resolve_device, run_cli

get_args_parser = stage1_parser  # the flags live in engine/options.py, where the benchmarks read them too


def main(args: argparse.Namespace) -> int:
    config = stage1_config(**vars(args))
    return run_distributed(train, config, resolve_device(config))


def train(config: Stage1Config, device: torch.device, info: DistInfo) -> int:
    main_path, best_path = MODELS_DIR / f"{config.tensorname}.t7", MODELS_DIR / f"{config.tensorname}_best.t7"
    run = Run(config, stage1.RESUME_KEYS, stage1.METRICS, main_path, info)
    configure_backend(device, config.deterministic, config.seed + info.rank, config.memoryFormat, bool(config.tf32))
    train_split, val, sampler, loader = stage1.load_data(config, device, info)
    precise_files = clean_files(train_split, config.preciseBN, config.seed, config.filesPerClass) \
        if config.preciseBN else []
    selected_on = "val_1shot_precise" if precise_files else "val_1shot"
    net, optimizer = stage1.build_model(config, train_split.num_classes)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model = stage1.distribute(net, device, info)
    if hint := stage1.multi_gpu_hint(device, info):
        print(hint, flush=True)
    criterion = nn.CrossEntropyLoss()
    scaler = grad_scaler(device, bool(config.amp))
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    start_epoch, progress = run.restore(net, stateful, stage1.new_progress(),
                                        {"best_train_loss": math.inf, "best_val": -1.0}, "step")
    if run.resumed is not None and not info.is_main:  # the saved sums cover every process; the main one goes on
        progress.update({key: 0 for key in stage1.SUMMED_PROGRESS})
    barrier(info)
    run.start()

    def save_state(epoch: int) -> None:
        """Write the resumable state (every process calls it: the epoch's sums are added up)."""
        summed = all_reduce_sum([progress[k] for k in stage1.SUMMED_PROGRESS], device, info)
        totals = dict(zip(stage1.SUMMED_PROGRESS, summed))
        run.save_state(epoch, {**progress, **totals}, stage1.plain_state(model))

    with run:
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, config.numEpochs):
                sampler.set_epoch(epoch, start=progress["step"] * loader.batch_size)
                stage1.train_one_epoch(model, criterion, optimizer, loader, device, epoch, config, info, progress,
                                       stop=lambda: run.interrupted, scaler=scaler)
                loss_sum, correct, seen = all_reduce_sum([progress[k] for k in stage1.SUMMED_PROGRESS], device, info)
                row = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                       "lr": optimizer.param_groups[-1]["lr"], "images_per_s": seen / max(progress["time"], 1e-9)}
                # Every rank keeps the same record and evaluates its share of the val episodes; the main one
                # writes. With --preciseBN the files hold re-estimated statistics, computed once, when first
                # needed, by every rank (no collective inside; the decision to need them is the same on every rank).
                precise_stop = None if info.enabled else (lambda: run.interrupted)
                saved = functools.cache(lambda: stage1.precise_copy(model, precise_files, config, device,
                                                                    stop=precise_stop) if precise_files else model)
                weights = lambda: stage1.plain_state(saved())  # noqa: E731
                run.keep_best("best_train_loss", row["loss"], weights, main_path, lowest=True)
                if config.valEpisodes and ((config.valEvery and (epoch + 1) % config.valEvery == 0)
                                           or epoch + 1 == config.numEpochs):
                    row.update(stage1.evaluate(model, val, config, device, info, stop=lambda: run.interrupted))
                    if precise_files:
                        row.update(stage1.evaluate(saved(), val, config, device, info, stop=lambda: run.interrupted,
                                                   suffix="_precise"))
                    run.keep_best("best_val", row[selected_on], weights, best_path)
                scheduler.step()
                run.log(row)
                progress = stage1.new_progress()
                save_state(epoch + 1)
                run.announce({**row, "accuracy": 100 * row["accuracy"]})  # in percent like val's on the console
                barrier(info)
                if all_reduce_sum([float(run.interrupted)], device, info)[0] > 0:
                    return run.stop(f"after epoch {epoch}")
        except Interrupted as stopped:
            barrier(info)
            save_state(epoch)  # the epoch's finished steps are kept; an interrupted val evaluation is redone
            return run.stop(str(stopped))
    if info.is_main:
        lowest, best = run.record["best_train_loss"], run.record["best_val"]
        write_json(run.dir / "summary.json", {"lowest_train_loss": lowest, "checkpoint": str(main_path),
                                              "best_val_1shot": best, "best_checkpoint": str(best_path),
                                              "selected_on": selected_on, "preciseBN": config.preciseBN})
        statistics = f", BatchNorm statistics re-estimated over {len(precise_files)} images" if precise_files else ""
        print(f"saved {main_path} (lowest training loss {lowest:.4f}{statistics})"
              + (f" and {best_path} ({selected_on.replace('_', ' ')} {best:.2f} %)" if best >= 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
