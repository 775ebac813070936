"""Benchmark of stage 1 (SPEC 2): images/s with data loading vs the same batches preloaded.

    python benchmarks/stage1.py --imageSize 84 --batchSize 64 --steps 10
    python benchmarks/stage1.py --device cuda --amp --steps 30

Builds what classification.py builds (load_data: SoftRandomDataset + SeededSampler + DataLoader
with --nthreads workers; build_model: ResNet-18 + Adam; CrossEntropyLoss) and times:
  1. loader: the body of ``classification.train_one_epoch`` on batches from the DataLoader;
  2. preloaded: the same batches (kept from phase 1), already in memory, no loader.
Medians over the timed steps (after --warmup). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import torch
from torch import nn

import benchmarks.common as common_module
import classification as stage1
from benchmarks.common import (
    MemoryProbe,
    SectionClock,
    children_cpu_s,
    emit_json,
    environment,
    maxrss_mb,
    print_table,
    section_medians,
    synchronize,
    toy_dataset,
    toy_size,
)
from utils.distributed import DistInfo
from utils.errors import InputError
from utils.evaluation import autocast, compute_layout
from utils.options import configure_backend, resolve_device

ROWS = [
    ("data_wait", "data wait (loader)"),
    ("h2d", "to device"),
    ("forward", "forward + loss"),
    ("backward", "backward"),
    ("optimizer", "optimiser (zero_grad, step)"),
    ("other", "checks, stats (.item)"),
    ("total", "TOTAL per step"),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage-1 benchmark: images/s with vs without data loading",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataroot", default=None, help="dataset root; default: a generated toy dataset")
    p.add_argument("--toyDir", default=None, help="generate the toy dataset here and reuse it on later runs")
    p.add_argument("--toySize", type=int, default=None, help="toy image side (default: ceil(imageSize*256/224))")
    p.add_argument("--toyPerClass", type=int, default=30, help="toy images per class")
    p.add_argument("--imageSize", type=int, default=224)
    p.add_argument("--batchSize", type=int, default=128)
    p.add_argument("--filesPerClass", type=int, default=500)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--nthreads", type=int, default=4, help="DataLoader workers")
    p.add_argument("--torchThreads", type=int, default=None, help="torch.set_num_threads in this process")
    p.add_argument("--pssInterval", type=float, default=2.0,
                   help="seconds between PSS samples of the process and its workers (0: none; each costs ~10 ms/GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    return p


def script_args(a: argparse.Namespace, root: Path) -> argparse.Namespace:
    argv = ["--dataroot", str(root), "--tensorname", "benchmark", "--imageSize", str(a.imageSize),
            "--batchSize", str(a.batchSize), "--filesPerClass", str(a.filesPerClass), "--nthreads", str(a.nthreads),
            "--seed", str(a.seed), "--amp", str(int(a.amp)), "--progress", "0", "--valEpisodes", "0"]
    if a.device:
        argv += ["--device", a.device]
    return stage1.get_args_parser().parse_args(argv)


def train_step(model, criterion, optimizer, images, labels, device, amp, clock: SectionClock) -> None:
    """The body of classification.train_one_epoch, with timers."""
    with clock.section("h2d"):
        images = compute_layout(images.to(device, non_blocking=True), device)
        labels = labels.to(device, non_blocking=True)
    with clock.section("forward"), autocast(device, amp):
        logits = model(images)
        loss = criterion(logits.float(), labels)
    with clock.section("other"):
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss in the benchmark")
    with clock.section("optimizer"):
        optimizer.zero_grad(set_to_none=True)
    with clock.section("backward"):
        loss.backward()
    with clock.section("optimizer"):
        optimizer.step()
    with clock.section("other"):
        loss.item()
        (logits.argmax(1) == labels).sum().item()


def run(model, criterion, optimizer, batches, steps, warmup, device, amp, keep: list | None, probe=None):
    clock, rows = SectionClock(device), []
    iterator = iter(batches)
    for step in range(warmup + steps):
        tick = time.perf_counter()
        images, labels = next(iterator)
        clock.add("data_wait", time.perf_counter() - tick)
        if keep is not None:
            keep.append((images, labels))
        train_step(model, criterion, optimizer, images, labels, device, amp, clock)
        synchronize(device)
        row = clock.collect()
        row["total"] = time.perf_counter() - tick
        row["images"] = len(labels)
        if step >= warmup:
            rows.append(row)
    if probe is not None:
        probe.sample_now()
    del iterator
    return rows


def main(argv: list[str] | None = None) -> dict:
    a = get_args_parser().parse_args(argv)
    if a.torchThreads:
        torch.set_num_threads(a.torchThreads)
    common_module.PSS_INTERVAL = a.pssInterval
    env_start = environment()
    root, toy_s, holder = toy_dataset(a.dataroot, a.toyPerClass, a.toySize or toy_size(a.imageSize), a.toyDir)
    args = script_args(a, root)
    device = resolve_device(args)
    args.device_obj = device
    configure_backend(device, False, args.seed)
    tick = time.perf_counter()
    train, _, sampler, loader = stage1.load_data(args, DistInfo())
    scan_s = time.perf_counter() - tick
    need = a.warmup + a.steps
    if len(loader) < need:
        raise SystemExit(f"error: the loader has {len(loader)} batches, --warmup + --steps need {need} "
                         f"(raise --toyPerClass or lower --batchSize)")
    model, optimizer = stage1.build_model(args, train.num_classes)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    criterion = nn.CrossEntropyLoss()

    # Decode cost of one item (transform + soft-random blend) in this process, single-threaded.
    sampler.set_epoch(0)
    keys = list(iter(sampler))[:16]
    tick = time.perf_counter()
    for key in keys:
        loader.dataset[key]
    item_s = (time.perf_counter() - tick) / len(keys)

    kept: list = []
    cpu0 = children_cpu_s()
    with MemoryProbe(device) as mem_loader:
        loader_rows = run(model, criterion, optimizer, loader, a.steps, a.warmup, device, bool(args.amp), kept,
                          mem_loader)
        # persistent workers: shut them down before the preloaded phase
        loader._iterator = None
    workers_cpu_s = children_cpu_s() - cpu0
    with MemoryProbe(device) as mem_pre:
        pre_rows = run(model, criterion, optimizer, kept, a.steps, a.warmup, device, bool(args.amp), None)

    names = [k for k, _ in ROWS]
    columns = {"loader": section_medians(loader_rows, names), "preloaded": section_medians(pre_rows, names)}
    print()
    print_table(f"median ms per step, {device.type}{' amp' if args.amp else ''}, {args.imageSize} px, batch "
                f"{args.batchSize}, nthreads {args.nthreads}, {a.steps}+{a.warmup} warmup steps",
                list(columns), [(label, [columns[c][k] for c in columns]) for k, label in ROWS])
    ips_loader = sum(r["images"] for r in loader_rows) / sum(r["total"] for r in loader_rows)
    ips_pre = sum(r["images"] for r in pre_rows) / sum(r["total"] for r in pre_rows)
    batch_mb = kept[0][0].element_size() * kept[0][0].nelement() / 2**20
    env_end = environment()
    summary = {
        "benchmark": "stage1", "device": str(device), "amp": bool(args.amp), "imageSize": args.imageSize,
        "batchSize": args.batchSize, "nthreads": args.nthreads, "steps": a.steps, "warmup": a.warmup,
        "images_per_s_loader": ips_loader, "images_per_s_preloaded": ips_pre,
        "loading_ratio": columns["loader"]["total"] / columns["preloaded"]["total"],
        "throughput_ratio": ips_pre / ips_loader,
        "step_ms_loader": 1000 * columns["loader"]["total"], "step_ms_preloaded": 1000 * columns["preloaded"]["total"],
        "data_wait_ms": 1000 * columns["loader"]["data_wait"],
        "decode_ms_per_image": 1000 * item_s, "decode_s_per_batch_one_core": item_s * args.batchSize,
        "workers_cpu_s_loader_phase": workers_cpu_s, "batch_mb": batch_mb,
        "batch_dtype": str(kept[0][0].dtype).replace("torch.", ""),
        "peak_rss_mb": maxrss_mb(), "loader_peak_rss_mb": mem_loader.rss_mb,
        "loader_peak_total_mb": mem_loader.total_mb, "loader_peak_total_pss_mb": mem_loader.total_pss_mb,
        "loader_workers_private_mb": mem_loader.workers_private_mb,
        "preloaded_peak_rss_mb": mem_pre.rss_mb, "children_maxrss_mb": maxrss_mb(resource.RUSAGE_CHILDREN),
        "scan_s": scan_s, "toy_generate_s": toy_s,
        "breakdown_ms": {c: {k: 1000 * v for k, v in vals.items()} for c, vals in columns.items()},
    }
    if device.type == "cuda":
        summary.update(cuda_peak_loader_mb=mem_loader.cuda_mb, cuda_peak_preloaded_mb=mem_pre.cuda_mb,
                       gpu=torch.cuda.get_device_name(device))
    summary.update({k: v for k, v in env_start.items() if k != "load_avg"}, load_avg_start=env_start["load_avg"],
                   load_avg_end=env_end["load_avg"])
    print()
    print(f"images/s: {ips_loader:.1f} with the loader, {ips_pre:.1f} preloaded "
          f"(step time ratio {summary['loading_ratio']:.3f}, medians); data wait {summary['data_wait_ms']:.1f} ms/step")
    print(f"one item in this process: {1000 * item_s:.1f} ms (a batch: {item_s * args.batchSize:.2f} s on one core); "
          f"worker CPU over the loader phase {workers_cpu_s:.1f} s; a batch is {batch_mb:.1f} MB "
          f"{summary['batch_dtype']}")
    print(f"memory: loader phase RSS {mem_loader.rss_mb:.0f} MB + workers' private {mem_loader.workers_private_mb:.0f} MB "
          f"= {mem_loader.total_mb:.0f} MB (sampled PSS total {mem_loader.total_pss_mb:.0f} MB); "
          f"preloaded phase RSS {mem_pre.rss_mb:.0f} MB")
    print(f"load average {env_start['load_avg']} at start, {env_end['load_avg']} at end "
          f"({env_start['cpu_count']} CPUs, {env_start['torch_threads']} torch threads)")
    emit_json(summary, a.json)
    if holder is not None:
        holder.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:  # bad flags or data: one line, status 2, like the scripts
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
