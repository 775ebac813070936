"""Stage 1: pre-train the ResNet-18 embedding on the base classes with soft-random patch blending.

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
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import SeededSampler, SoftRandomDataset, read_split, scan_split
from models import EmbeddingNet, load_embedding
from utils.checkpoint import MODELS_DIR, atomic_save, resolve_checkpoint
from utils.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from utils.errors import OptionError, TrainingDiverged
from utils.evaluation import autocast, compute_layout, evaluate_embedding, worker_init_for
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt
from utils.metrics import mean_ci95
from utils.options import add_common_args, check_positive, configure_backend, resolve_device, run_cli
from utils.runs import MetricsLog, clear_run_dir, format_row, open_run, write_json
from utils.syncbn import convert_to_gloo_sync

METRICS = ["epoch", "loss", "accuracy", "lr", "val_1shot", "val_1shot_ci", "val_5shot", "val_5shot_ci", "images_per_s"]
RESUME_KEYS = ("dataroot", "imageSize", "Fang", "network", "LR", "batchSize", "numEpochs", "seed", "filesPerClass")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IDeMe-Net stage 1: soft-random embedding pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(tensorname="softRandom")
    parser.add_argument("--numEpochs", type=int, default=35, help="training epochs")
    parser.add_argument("--filesPerClass", type=int, default=500, help="first files of each base class used")
    parser.add_argument("--valEvery", type=int, default=5, help="val few-shot evaluation every N epochs (0: only at the end)")
    parser.add_argument("--valEpisodes", type=int, default=600, help="val episodes per few-shot evaluation")
    parser.add_argument("--valQueries", type=int, default=15, help="query images per class in val episodes")
    return parser


def load_data(args: argparse.Namespace, info: DistInfo):
    """The soft-random training set, its seeded sampler and loader, and the val split."""
    train, dropped = scan_split(read_split(args.dataroot, "train"), args.skipBadImages, args.nthreads)
    val, dropped_val = scan_split(read_split(args.dataroot, "val"), args.skipBadImages, args.nthreads)
    if dropped + dropped_val and info.is_main:
        print(f"left out {dropped + dropped_val} unreadable image(s) (--skipBadImages)")
    if args.valEpisodes and val.min_class_size() < 5 + args.valQueries:
        raise OptionError(f"--valQueries {args.valQueries}: val classes need 5 + {args.valQueries} images, "
                          f"the smallest has {val.min_class_size()}")
    dataset = SoftRandomDataset(train, args.imageSize, args.Fang, args.filesPerClass)
    sampler = SeededSampler(len(dataset), args.seed, info.rank, info.world_size)
    if args.batchSize % info.world_size:
        raise OptionError(f"--batchSize {args.batchSize} is not divisible by the {info.world_size} processes")
    loader = DataLoader(dataset, batch_size=args.batchSize // info.world_size, sampler=sampler,
                        num_workers=args.nthreads, pin_memory=args.device_obj.type == "cuda", drop_last=False,
                        persistent_workers=args.nthreads > 0, prefetch_factor=4 if args.nthreads > 0 else None,
                        worker_init_fn=worker_init_for(args.device_obj))
    return train, val, sampler, loader


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The network (random or ``--network``) and Adam with the original's learning-rate groups."""
    if args.network == "None":
        model = EmbeddingNet(num_classes)
        groups = [{"params": model.parameters(), "lr": args.LR}]
    else:
        model = load_embedding(resolve_checkpoint(args.network, "--network"), num_classes)
        fc = list(model.convnet.fc.parameters())
        rest = [p for n, p in model.named_parameters() if not n.startswith("convnet.fc.")]
        groups = [{"params": fc, "lr": args.LR * 0.1}, {"params": rest, "lr": args.LR}]
    return model, torch.optim.Adam(groups)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, info, progress, interrupt):
    """Train until the epoch ends or an interrupt is requested; ``progress`` holds the running sums.

    Returns:
        True when the epoch finished, False when it stopped early on request.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (args.progress and info.is_main), leave=False)
    start = time.perf_counter()
    for images, labels in bar:
        images = compute_layout(images.to(device, non_blocking=True), device)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss at epoch {epoch}, step {progress['step']}; nothing was saved "
                                   f"over the last good checkpoint ({args.last_good})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(labels)
        progress["step"] += 1
        progress["loss_sum"] += loss.item() * n
        progress["correct"] += (logits.argmax(1) == labels).sum().item()
        progress["seen"] += n
        progress["time"] += time.perf_counter() - start
        start = time.perf_counter()
        bar.set_postfix(loss=f"{progress['loss_sum'] / progress['seen']:.3f}",
                        img_s=f"{progress['seen'] * info.world_size / max(progress['time'], 1e-9):.0f}")
        if all_reduce_sum([float(interrupt.requested)], device, info)[0] > 0:
            return False
    return True


def val_fewshot(model: nn.Module, val, args, device) -> dict[str, float]:
    """5-way 1-shot and 5-shot accuracy (mean, 95% half-interval, in %) of a prototype classifier."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    out = {}
    for shots in (1, 5):
        accs = evaluate_embedding(net.features, val, args.imageSize, 5, shots, args.valQueries, args.valEpisodes,
                                  args.seed, device, 1, args.batchSize, args.nthreads, args.amp,
                                  desc=f"val {shots}-shot", progress=bool(args.progress))
        out[f"val_{shots}shot"], out[f"val_{shots}shot_ci"] = mean_ci95([100 * a for a in accs])
    return out


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    net = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def main(args: argparse.Namespace) -> int:
    check_positive(args, "imageSize", "Fang", "batchSize", "numEpochs", "filesPerClass")
    if args.imageSize < args.Fang:
        raise OptionError(f"--imageSize {args.imageSize} cannot hold a {args.Fang} x {args.Fang} grid")
    device = resolve_device(args)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    args.device_obj = device
    try:
        return _run(args, device, info)
    finally:
        cleanup(info)


def _run(args: argparse.Namespace, device: torch.device, info: DistInfo) -> int:
    run_dir, resume = open_run(args, RESUME_KEYS)
    configure_backend(device, args.deterministic, args.seed + info.rank)
    train, val, sampler, loader = load_data(args, info)
    model, optimizer = build_model(args, train.num_classes)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_to_gloo_sync(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif device.type == "cuda" and torch.cuda.device_count() > 1 and args.device in (None, "cuda"):
        model = nn.DataParallel(model)
    criterion = nn.CrossEntropyLoss()
    main_path, best_path = MODELS_DIR / f"{args.tensorname}.t7", MODELS_DIR / f"{args.tensorname}_best.t7"
    args.last_good = main_path if main_path.exists() else "none yet"

    start_epoch, progress = 0, {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    record = {"best_train_loss": math.inf, "best_val": -1.0, "rows": 0}
    if resume is not None:
        (model.module if hasattr(model, "module") else model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch, progress, record = resume["epoch"], resume["progress"], resume["record"]
        if info.is_main:
            print(f"resuming {args.tensorname} at epoch {start_epoch}, step {progress['step']}")
    saved_args = {k: v for k, v in vars(args).items() if k not in ("device_obj", "last_good")}
    log = None
    barrier(info)
    if info.is_main:
        clear_run_dir(run_dir, args.resume)
        write_json(run_dir / "args.json", saved_args)
        log = MetricsLog(run_dir, METRICS, keep_rows=record["rows"])

    def save_resume(epoch: int) -> None:
        if info.is_main:
            atomic_save({"model": plain_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "progress": progress,
                         "record": record, "args": saved_args}, run_dir / "resume.pt")

    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, args.numEpochs):
            sampler.set_epoch(epoch, start=progress["step"] * loader.batch_size)
            finished = train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, info, progress,
                                       interrupt)
            if not finished:
                barrier(info)
                save_resume(epoch)
                if info.is_main:
                    print(f"stopped at epoch {epoch}, step {progress['step']}; continue with --resume")
                return INTERRUPTED_EXIT
            loss_sum, correct, seen = all_reduce_sum([progress["loss_sum"], progress["correct"], progress["seen"]],
                                                     device, info)
            row = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                   "lr": optimizer.param_groups[-1]["lr"],
                   "images_per_s": seen / max(progress["time"], 1e-9)}
            scheduler.step()
            if info.is_main:
                if row["loss"] < record["best_train_loss"]:
                    record["best_train_loss"] = row["loss"]
                    atomic_save(plain_state(model), main_path)
                    args.last_good = main_path
                if args.valEpisodes and ((args.valEvery and (epoch + 1) % args.valEvery == 0)
                                         or epoch + 1 == args.numEpochs):
                    row.update(val_fewshot(model, val, args, device))
                    if row["val_1shot"] > record["best_val"]:
                        record["best_val"] = row["val_1shot"]
                        atomic_save(plain_state(model), best_path)
                log.log(row)
                record["rows"] = log.rows
            progress = {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
            save_resume(epoch + 1)
            if info.is_main:
                print(format_row(row), flush=True)
            barrier(info)
            if interrupt.requested:
                if info.is_main:
                    print(f"stopped after epoch {epoch}; continue with --resume")
                return INTERRUPTED_EXIT
    if info.is_main:
        log.close()
        write_json(run_dir / "summary.json", {"lowest_train_loss": record["best_train_loss"], "checkpoint": str(main_path),
                                              "best_val_1shot": record["best_val"], "best_checkpoint": str(best_path)})
        print(f"saved {main_path} (lowest training loss {record['best_train_loss']:.4f})"
              + (f" and {best_path} (val 5-way 1-shot {record['best_val']:.2f} %)" if record["best_val"] >= 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
