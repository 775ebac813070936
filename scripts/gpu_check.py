"""The first command to run on a GPU machine: speed, memory and correctness of the engine's own code
on generated toy data, within a time budget (``--budget``; docs/gpus.md lists every figure and check).

    python -m scripts.gpu_check                      # cuda, 224 px, the outcome check included
    python -m scripts.gpu_check --device cpu --imageSize 32 --quick --dataroot DIR   # the CPU dry run

Stage 1 images/s and stage 2 seconds per episode, in float32 and with ``--amp``, peak memory; checks of finite
losses, CPU against GPU features, cached against per-episode evaluation, host waits per episode, float16
with its GradScaler, DataParallel's autocast dtype, torchrun (one process's loss on two ranks, an uneven
split, SIGTERM then ``--resume``, a NaN on one rank) and ``benchmarks/outcome.py``. It prints a table,
writes ``--json`` and exits with status 1 when a check failed.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.gpu_check\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import argparse
import json
import math
import os
import platform
import re
import runpy
import time
import warnings
from collections.abc import Callable
from itertools import islice
from unittest import mock

import torch
import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmarks.common import Stopwatch, environment
from benchmarks.episode import Stage2Run
from benchmarks.ops import OpCounter
from benchmarks.stage1 import Stage1Run
from datasets import read_split, toy
from datasets.episodes import CroppedImages
from datasets.loaders import episode_loader
from datasets.transforms import prepare_images
from engine import experiments, stage2
from engine.experiments import REPO
from engine.options import (
    Stage1Config,
    add_batch_flag,
    add_image_size_flag,
    stage1_config,
    stage1_parser,
    stage2_config,
)
from models import EmbeddingNet, IDeMeNet
from utils.distributed import DistInfo, run_distributed
from utils.errors import InputError, OptionError, TrainingDiverged
from utils.files import read_csv, write_json
from utils.forward import NATIVE_BF16_CAPABILITY, amp_dtype, autocast
from utils.options import (
    HelpFormatter,
    add_dataroot_flag,
    add_device_flag,
    add_threads_flag,
    configure_backend,
    resolve_device,
    run_cli,
)

PER_CLASS = 21  # toy images per class: 5-shot episodes need 5 + 15 per class
LOADER_SIZES = (84, 224)  # stage 1 through its loader on a GPU at the usual sizes (--loaderSizes)
BUDGET_S, QUICK_BUDGET_S = 480, 180  # the whole check's seconds on one H100, set-up included (--budget)
# The caps of the phases run as processes (a share of the budget, at most what is left); an in-process
# phase runs a fixed small number of steps, and one that would start after the budget is spent is skipped.
PHASE_SHARES = {"torchrun": 0.15, "outcome": 0.45}
RANKS, RANK_BATCH = 2, 8  # the distributed checks' ranks and stage 1's images per rank and step
DISTRIBUTED_CHECKS = ("torchrun_uneven_split", "torchrun_sigterm_resume", "torchrun_nan_on_one_rank")
# torchrun passes a SIGTERM on to the ranks and SIGKILLs those still running after its shutdown grace (30 s
# unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise, where torch reads it): on a loaded CPU the ranks'
# last step, the save and the exit can take longer, and a killed rank saves nothing.
SHUTDOWN_GRACE_S = 300
STEP_DONE = re.compile(r"epoch 0:[^\r\n]*\| *[1-9]\d*/")  # rank 0's progress bar past its first step


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_device_flag(p)
    add_image_size_flag(p, use="of every phase")
    add_batch_flag(p, use="stage 1's batch (default: 128; 16 with --quick)")
    p.add_argument("--quick", action="store_true", help="a few steps and episodes, no outcome check (the dry run)")
    add_dataroot_flag(p, None, "toy dataset folder (generated there when it holds none; default: <workdir>/toy)")
    p.add_argument("--workdir", default="runs/gpu_check", help="folder of the check's files")
    p.add_argument("--json", default="gpu_check.json", help="the report")
    add_threads_flag(p, at_most=8, use="loader workers and processes generating toy data")
    p.add_argument("--loaderSizes", type=int, nargs="*", default=None, metavar="S",
                   help="image sizes at which stage 1 is also timed through its real loader, float32, each on toy "
                        "files made for it (default: 84 224 on a GPU, none on the CPU)")
    p.add_argument("--outcomeSeeds", type=int, default=2, help="seeds of the outcome check (0: skip; --quick skips)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds the whole check may take (default: {BUDGET_S}; {QUICK_BUDGET_S} with --quick)")
    p.add_argument("--distributedChecks", type=int, default=None, choices=(0, 1),
                   help="torchrun checks: an epoch over data that does not split evenly (same steps per rank), SIGTERM "
                        "to the process group then --resume, a NaN loss on one rank (NCCL with 2+ GPUs, else gloo on "
                        "the CPU; default: on with 2+ GPUs)")
    p.add_argument("--worker", default=None, choices=("stage1", "steps", "nan"),
                   help="internal: one rank of a distributed check, as torchrun starts it "
                        "(gpu_check.py --worker KIND -- STAGE-1 FLAGS)")
    p.add_argument("stage1Flags", nargs="*", help=argparse.SUPPRESS)
    return p


def describe(device: torch.device) -> dict:
    """benchmarks.common's environment with the versions, the device, its compute capability and whether it
    has bfloat16 natively."""
    env = {**environment(), "python": platform.python_version(), "torchvision": torchvision.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "device": str(device), "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type != "cuda":
        return {**env, "name": platform.processor() or platform.machine()}
    capability = tuple(torch.cuda.get_device_capability(device))
    return {**env, "name": torch.cuda.get_device_name(device), "capability": ".".join(map(str, capability)),
            "native_bf16": capability >= NATIVE_BF16_CAPABILITY, "amp_dtype": str(amp_dtype(device)).split(".")[-1],
            "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)}


class Budget:
    """The check's time budget: each phase's cap (:data:`PHASE_SHARES`) and its seconds (``phases``)."""

    def __init__(self, total: float) -> None:
        self.total, self.start, self.phases = total, time.perf_counter(), {}

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def cap(self, kind: str) -> float:
        return max(0.0, min(PHASE_SHARES[kind] * self.total, self.left()))

    def run(self, report: dict, name: str, work: Callable[[], object]):
        """``work()``'s value, its seconds in ``phases[name]``; None when the budget was spent before it
        started (check ``phase_<name>`` skipped) or when it raised (that check failed, naming the error: a
        NaN loss, a crash, an out-of-memory), so that every failure reaches the table and the exit status."""
        checks, start = report["checks"], time.perf_counter()
        if self.left() <= 0:
            checks[f"phase_{name}"] = {"ok": None, "detail": f"skipped: the {self.total:.0f} s budget was spent "
                                                             "(--budget)"}
            return None
        try:
            return work()
        except InputError:
            raise
        except Exception as error:  # a check reports every failure instead of stopping
            first = (str(error).strip().splitlines() or [""])[0]
            checks[f"phase_{name}"] = {"ok": False, "detail": f"{type(error).__name__}: {first}"}
        finally:
            self.phases[name] = round(time.perf_counter() - start, 2)


def toy_data(root: Path, image_size: int, workers: int) -> Path:
    """``root``, holding toy data with files of the size that ``image_size`` is cropped from (generated by
    ``workers`` processes unless it holds some: 2,100 images, at 256 px some 35 s in one)."""
    if not (root / "train.csv").is_file():
        print(f"generating toy data in {root}", flush=True)
        toy.generate(root, per_class=PER_CLASS, size=math.ceil(image_size * 256 / 224), seed=0, workers=workers)
    return root


def stage1_speed(root: Path, a: argparse.Namespace, device: torch.device, amp: bool, steps: int,
                 image_size: int | None = None, tf32: bool = True) -> dict:
    """Training images/s of stage 1 through the real loader (``loader_images_per_s``: decoding, blending, the
    copy; the mean loss) and on the same batches decoded ahead (the network's speed; the peak memory), the
    first batch of each pass untimed; at ``image_size`` (default ``--imageSize``), ``tf32`` as ``--tf32``."""
    config = stage1_config(dataroot=str(root), imageSize=image_size or a.imageSize, batchSize=a.batchSize,
                           tensorname="gpu_check", device=str(device), amp=int(amp), nthreads=a.nthreads,
                           filesPerClass=0, progress=0, tf32=int(tf32))
    configure_backend(device, False, 0, config.memoryFormat, tf32)
    watches = {phase: Stopwatch(device, skip=1) for phase in ("loader", "preloaded")}
    batches, _, progress = Stage1Run(config, device).loader_then_preloaded(steps + 1, watches)
    images = sum(len(batch[1]) for batch in batches[1:])
    return {"images_per_s": round(images / watches["preloaded"].seconds, 1),
            "peak_memory_mb": watches["preloaded"].peak_mb, "loss": progress["loss_sum"] / progress["seen"],
            "loader_images_per_s": round(images / watches["loader"].seconds, 2)}


def stage2_setup(root: Path, a: argparse.Namespace, device: torch.device, amp: bool, shots: int,
                 **flags) -> Stage2Run:
    """Stage 2 as the script builds it (``flags`` on top) from the stage-1 file ``gpu_check_stage1``."""
    config = stage2_config(device, dataroot=str(root), imageSize=a.imageSize, network="gpu_check_stage1",
                           shots=shots, device=str(device), amp=int(amp), nthreads=a.nthreads, galleryNum=5,
                           chooseNum=5, progress=0, tensorname="gpu_check", **flags)
    splits, model, gallery = stage2.prepare(config, device, need_train=True)
    return Stage2Run(config, device, splits, gallery, model, config.galleryBN)


def stage2_speed(root: Path, a: argparse.Namespace, device: torch.device, amp: bool, shots: int,
                 episodes: int) -> tuple[dict, dict, dict]:
    """Seconds per training episode (epoch 1: both losses train; decoded ahead: the networks' speed, after an
    untimed first one) and per test episode, peak memory; the check that cached and per-episode test features
    give the same evaluation; the host waits."""
    run = stage2_setup(root, a, device, amp, shots)
    items = training_items(run, episodes)
    with Stopwatch(device, skip=1) as training:
        run.train(items, 1, timer=training)
    syncs = training_syncs(run, items[1:])
    test_set, fresh_set = (run.episodes("test", episodes, evaluation=cached) for cached in (True, False))
    with Stopwatch(device) as testing:
        run.evaluate(test_set)
    check = cached_features_check(lambda: run.evaluate(test_set), lambda: run.evaluate(fresh_set, cached=False),
                                  amp, f"{shots}-shot{' amp' if amp else ''}", run.config.ways * run.config.test_num)
    return ({"train_episode_s": round(training.seconds / episodes, 4),
             "test_episode_s": round(testing.seconds / episodes, 4),
             "train_peak_memory_mb": training.peak_mb, "test_peak_memory_mb": testing.peak_mb}, check, syncs)


def training_items(run: Stage2Run, episodes: int) -> list[dict]:
    """``episodes`` + 1 training episodes of epoch 1 (both losses train), decoded ahead."""
    train_set = run.episodes("train", episodes + 1, epoch=1)
    return [train_set[i] for i in range(len(train_set))]


def training_syncs(run: Stage2Run, items: list[dict]) -> dict:
    """:func:`host_syncs` of training on ``items`` as epoch 1, a scaled step allowed per optimiser that trains."""
    training = [optimizer for optimizer in run.optimizers.values()
                if any(p.requires_grad for group in optimizer.param_groups for p in group["params"])]
    return host_syncs(run.device, lambda: run.train(items, 1), len(items),
                      len(training) if run.scaler.is_enabled() else 0)


# Cached against per-episode evaluation: the same images embedded in batches of other sizes, so cuDNN
# may pick other kernels. In full float32 (TF32 off for the comparison) those round differently by about
# 1e-6 of a value, so a relative loss gap of 1e-4 leaves a margin of 100, while a wrong feature (another
# image's, a stale cache entry) moves an episode's loss by 1e-2 and more. Under --amp the features are
# rounded to 8 bits of mantissa: 1e-2, and an accuracy may move by one query whose two classes tie.
CACHED_LOSS_RTOL = {False: 1e-4, True: 1e-2}


def cached_features_check(cached_pass: Callable[[], dict], fresh_pass: Callable[[], dict], amp: bool, what: str,
                          queries: int) -> dict:
    """Run both evaluation passes (:func:`engine.stage2.evaluate`: ``acc`` and ``loss`` per episode) in full
    float32 (under ``--amp`` its autocast dtype) and compare them: per-episode accuracies equal (under amp
    within one of the episode's ``queries``), losses within :data:`CACHED_LOSS_RTOL`."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # no TensorFloat-32
    try:
        cached, fresh = cached_pass(), fresh_pass()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    gap = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(cached["loss"], fresh["loss"]))
    moved = max(abs(x - y) for x, y in zip(cached["acc"], fresh["acc"]))
    acc_ok = moved <= (1 / queries + 1e-9 if amp else 0.0)
    return {"ok": acc_ok and gap < CACHED_LOSS_RTOL[amp],
            "detail": f"{what}: accuracies {'equal' if moved == 0 else f'differ by up to {moved:.4f}'}, largest "
                      f"relative loss gap {gap:.2e} (limit {CACHED_LOSS_RTOL[amp]:g}, TF32 off)"}


def host_syncs(device: torch.device, train: Callable[[], None], episodes: int, scaled_steps: int) -> dict:
    """How often ``train()`` (``episodes`` training episodes) made the host wait: on CUDA counted by its
    sync debug mode, on the CPU as reads of a value (``item()``, ``bool()``: ``aten._local_scalar_dense``)
    outside an optimiser's own step (what it reads there are host tensors: no wait on a GPU either).
    Allowed: one read of the sums every ``stage2.SYNC_EVERY`` episodes and at the end, and one per optimiser
    stepped through a float16 GradScaler (``scaled_steps`` per episode, up to three: ``scaler.step`` reads
    its inf check)."""
    allowed = -(-episodes // stage2.SYNC_EVERY) + episodes * scaled_steps
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train()  # its last read waits for the GPU to finish
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(warning.message) for warning in caught)
    else:
        counter = OpCounter()
        hooks = [register(lambda *_, value=value: setattr(counter, "counting", value)) for register, value in
                 ((register_optimizer_step_pre_hook, False), (register_optimizer_step_post_hook, True))]
        try:
            with counter:
                train()
        finally:
            for hook in hooks:
                hook.remove()
        syncs = counter.counts["aten._local_scalar_dense.default"]
    scaler = f" and {scaled_steps} scaler step(s) per episode" if scaled_steps else ""
    return {"ok": syncs <= allowed, "detail": f"{syncs} host wait(s) in {episodes} training episodes (at most "
                                              f"{allowed}: the sums' reads{scaler})"}


def stage2_round(root: Path, a: argparse.Namespace, device: torch.device, amp: bool, fix_cls: int,
                 episodes: int) -> float:
    """Training episodes/s of stage 2, 1-shot, through the real episode loader: round 1 (``fix_cls`` 1,
    the feature cache warm: a first pass over the same episodes filled it, so each episode decodes only its
    support, as in the script) or round 2 (``fix_cls`` 0, epoch 1: both losses train). Episodes
    2..``episodes`` of the second pass are timed."""
    run = stage2_setup(root, a, device, amp, 1, fixCls=fix_cls)
    cache = run.feature_cache()
    train_set = run.episodes("train", episodes, cache=cache)
    for _ in range(2):  # the first pass warms the cache, cuDNN's choices and the allocator
        train_set.set_epoch(1)  # plans the decoding from the cache as it is now
        with Stopwatch(device, skip=1) as watch:
            run.train(episode_loader(train_set, run.config.nthreads, device), 1, cache=cache, timer=watch)
    return round((episodes - 1) / watch.seconds, 2)


def cpu_gpu_features(root: Path, device: torch.device, amp: bool, image_size: int) -> dict:
    """The embedding of one batch of val images on the CPU (float32) and on ``device``."""
    if device.type != "cuda":
        return {"ok": None, "detail": "skipped: the device is the CPU"}
    split = read_split(root, "val")
    images = torch.stack([CroppedImages(split.files[c][:1], image_size)[0] for c in range(8)])
    torch.manual_seed(0)
    net = EmbeddingNet(5).eval()
    with torch.no_grad():
        reference = net.features(prepare_images(images, torch.device("cpu")))
        net = net.to(device)
        with autocast(device, amp):
            features = net.features(prepare_images(images, device)).float().cpu()
    error = ((features - reference).abs().max() / reference.abs().max()).item()
    limit = 5e-2 if amp else 1e-2  # TF32 convolutions round to 10-bit mantissas
    return {"ok": error < limit, "detail": f"{'amp' if amp else 'fp32'}: largest difference {error:.2e} of the "
                                           f"largest feature (limit {limit})"}


def replica_dtypes(device: torch.device, image_size: int) -> dict:
    """The autocast dtype inside DataParallel's replicas (each GPU) under --amp."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"ok": None, "detail": "skipped: fewer than 2 GPUs"}
    model = IDeMeNet(5, image_size=image_size).to(device).eval()
    seen = {}
    hook = model.backbone.register_forward_hook(
        lambda module, inputs, output: seen.__setitem__(output.device.index, output.dtype))
    embed = stage2.make_embed(model, device, data_parallel=True)
    with torch.no_grad(), autocast(device, True):
        embed(torch.randn(4 * torch.cuda.device_count(), 3, image_size, image_size, device=device))
    hook.remove()
    want = amp_dtype(device)
    return {"ok": len(seen) == torch.cuda.device_count() and set(seen.values()) == {want},
            "detail": f"replica dtypes {sorted((k, str(v)) for k, v in seen.items())}, expected {want}"}


def check_env() -> dict[str, str]:
    """The environment of the processes the check starts: torchrun's shutdown grace, this checkout importable."""
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_GRACE_S), **os.environ, "PYTHONPATH": str(REPO)}


def torchrun(kind: str, flags: list[str], cwd: Path, ranks: int = RANKS, timeout: float = 600,
             stop_at: re.Pattern | None = None) -> tuple[str, list[int | None], list[dict]]:
    """``torchrun`` of ``ranks`` ``--worker KIND`` processes in ``cwd`` (:func:`engine.experiments.run`): its
    output, each rank's exit status (None: the rank wrote no report: it was killed) and the ranks' reports."""
    for old in cwd.glob(f"{kind}_rank*.json"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "scripts.gpu_check", "--worker", kind, "--", *flags]
    output = experiments.run(command, cwd / "logs" / f"torchrun_{kind}.log", cwd, check_env(), timeout,
                             stop_at=stop_at)[2]
    reports = [json.loads(path.read_text()) for path in sorted(cwd.glob(f"{kind}_rank*.json"))]
    exits = {report["rank"]: report["exit"] for report in reports}
    return output, [exits.get(rank) for rank in range(ranks)], reports


def torchrun_loss(root: Path, a: argparse.Namespace, device: torch.device, workdir: Path, timeout: float) -> dict:
    """Two ranks (NCCL, synchronised BatchNorm) give one process's first-epoch loss (each run stopped
    after ``timeout`` seconds)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"ok": None, "detail": "skipped: fewer than 2 GPUs"}
    flags = ["--dataroot", str(root), "--imageSize", str(min(a.imageSize, 64)), "--numEpochs", "1", "--batchSize",
             "64", "--nthreads", "2", "--filesPerClass", "1", "--valEpisodes", "0", "--progress", "0", "--tf32", "0",
             "--overwrite"]
    one, _, output = experiments.run([sys.executable, str(REPO / "classification.py"), *flags, "--tensorname", "one",
                                      "--device", str(device)], workdir / "logs" / "one.log", workdir, check_env(),
                                     timeout)
    more, two, _ = torchrun("stage1", [*flags, "--tensorname", "two"], workdir, timeout=timeout)
    if one != 0 or two != [0] * RANKS:
        return {"ok": False, "detail": f"exit {one} / {two}: {(output + more)[-500:]}"}
    single, double = (float(read_csv(workdir / f"runs/{name}/metrics.csv")[0]["loss"]) for name in ("one", "two"))
    return {"ok": math.isclose(single, double, rel_tol=1e-3),
            "detail": f"loss {single:.6f} (1 GPU) vs {double:.6f} (2)"}


# --------------------------------------------------------------- torchrun on two ranks (2+ GPUs, or gloo on the CPU)

def rank_epoch(kind: str, args: Stage1Config, device: torch.device, info: DistInfo, outcome: dict) -> int:
    """Stage 1 on this rank as classification.py builds it (padded sampler, loader, distributed model):
    ``steps``, one epoch (``outcome`` gets the items, this rank's share and its steps); ``nan``, three
    batches, the loss of the second NaN on rank 1 alone (the loss, not the images: synchronised BatchNorm
    would carry NaN images into every rank's statistics and loss; ``outcome`` gets the error raised)."""
    configure_backend(device, args.deterministic, args.seed + info.rank, args.memoryFormat, bool(args.tf32))
    run, calls = Stage1Run(args, device, info), iter(range(3))
    criterion = run.criterion

    def poisoned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = criterion(logits, labels)
        return loss * float("nan") if next(calls) == 1 and info.rank == 1 else loss

    if kind == "nan":
        run.criterion = poisoned
    try:
        progress = run.train(list(islice(iter(run.loader), 3)) if kind == "nan" else run.loader)
    except TrainingDiverged as error:
        outcome["error"] = str(error)
        raise
    outcome.update(items=run.sampler.size, share=len(run.sampler), steps=int(progress["step"]))
    return 0


def worker(a: argparse.Namespace) -> int:
    """One rank of a distributed check, started by torchrun (``--worker KIND -- STAGE-1 FLAGS``): ``stage1``
    runs classification.py itself, ``steps`` and ``nan`` :func:`rank_epoch`, each with the scripts' exit
    statuses; writes ``<KIND>_rank<RANK>.json`` (the exit status and what the rank saw) here."""
    outcome = {"rank": int(os.environ.get("RANK", "0"))}
    try:
        if a.worker == "stage1":
            sys.argv = [str(REPO / "classification.py"), *a.stage1Flags]
            runpy.run_path(sys.argv[0], run_name="__main__")
            status = 0
        else:
            status = run_cli(lambda args: run_distributed(lambda *call: rank_epoch(a.worker, *call, outcome),
                                                          stage1_config(**vars(args)), resolve_device(args)),
                             stage1_parser(), a.stage1Flags)
    except SystemExit as exit_:  # the script's own exit, or a flag refused by argparse
        status = exit_.code or 0
    write_json(Path(f"{a.worker}_rank{outcome['rank']}.json"), {**outcome, "exit": status})
    return status


def uneven_split_check(flags: list[str], cwd: Path, ranks: int) -> dict:
    """An epoch of stage 1 on ``ranks`` processes: every rank finishes, with the same steps (the sampler
    pads the epoch to a multiple of ``ranks``)."""
    output, exits, reports = torchrun("steps", [*flags, "--tensorname", "steps"], cwd, ranks)
    if not reports:
        return {"ok": False, "detail": f"no rank reported: {output[-500:]}"}
    items, share = reports[0]["items"], -(-reports[0]["items"] // ranks)
    shares, steps = ({report.get(key) for report in reports} for key in ("share", "steps"))
    ok = exits == [0] * ranks and shares == {share} and steps == {-(-share // RANK_BATCH)}
    seen = f"{sorted(shares, key=str)} items and {sorted(steps, key=str)} steps per rank"
    return {"ok": ok, "detail": f"{items} items on {ranks} ranks ({'padded' if items % ranks else 'an even split'}): "
                                f"exit {exits}, {seen}" + ("" if ok else f": {output[-500:]}")}


def sigterm_check(flags: list[str], cwd: Path) -> dict:
    """classification.py on two ranks, SIGTERM to torchrun's process group once the first training step is
    done (every rank is in the loop): every rank exits 130 with ``resume.pt`` written, and ``--resume``
    finishes the run."""
    epochs, state_path = 2, cwd / "runs/stopped/resume.pt"
    common = [*flags, "--tensorname", "stopped", "--numEpochs", str(epochs)]
    output, exits, _ = torchrun("stage1", [*common, "--overwrite", "--progress", "1"], cwd, stop_at=STEP_DONE)
    stopped = next((line for line in output.splitlines() if line.startswith("stopped ")), "no stop line")
    if exits != [130] * RANKS or not state_path.is_file():
        killed = ", killed by torchrun after its shutdown grace" if "forcefully exiting" in output else ""
        return {"ok": False, "detail": f"after SIGTERM: exit {exits}{killed}, resume.pt "
                                       f"{'written' if state_path.is_file() else 'missing'}: {output[-500:]}"}
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    output, exits, _ = torchrun("stage1", [*common, "--resume", "--progress", "0"], cwd)
    rows = len(read_csv(cwd / "runs/stopped/metrics.csv")) if exits == [0] * RANKS else 0
    return {"ok": exits == [0] * RANKS and rows == epochs,
            "detail": f"SIGTERM: exit {[130] * RANKS}, {stopped}, resume.pt at epoch {state['epoch']} step "
                      f"{state['progress']['step']}; --resume: exit {exits}, {rows} of {epochs} epochs logged"
                      + ("" if rows == epochs else f": {output[-500:]}")}


def nan_check(flags: list[str], cwd: Path) -> dict:
    """A NaN loss on rank 1 alone: every rank exits 3 naming rank 1."""
    output, exits, reports = torchrun("nan", [*flags, "--tensorname", "nan"], cwd)
    errors = sorted({report.get("error") for report in reports}, key=str)
    ok = exits == [3] * RANKS and errors == ["non-finite loss on rank 1 at epoch 0, step 1"]
    return {"ok": ok, "detail": f"exit {exits}: {errors}" + ("" if ok else f": {output[-500:]}")}


def distributed_checks(a: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, dict]:
    """torchrun on toy data of 2 images per class (stage 1 lists each twice: 256 items), NCCL on the GPUs
    when ``device`` is CUDA and 2+ are visible, else gloo on the CPU. Two ranks; three for the uneven
    split where there are 3+ GPUs or on the CPU (256 items split evenly over two)."""
    cuda = device.type == "cuda" and torch.cuda.device_count() >= RANKS
    cwd = workdir / "distributed"
    size = min(a.imageSize, 64)
    toy.generate(cwd / "toy", per_class=2, size=math.ceil(size * 256 / 224), seed=0)

    def flags(ranks: int) -> list[str]:
        return ["--dataroot", str(cwd / "toy"), "--imageSize", str(size), "--batchSize", str(RANK_BATCH * ranks),
                "--filesPerClass", "0", "--valEpisodes", "0", "--nthreads", str(a.nthreads), "--device",
                "cuda" if cuda else "cpu"]

    uneven = RANKS + 1 if not cuda or torch.cuda.device_count() > RANKS else RANKS
    checks = dict(zip(DISTRIBUTED_CHECKS, (uneven_split_check(flags(uneven), cwd, uneven),
                                           sigterm_check(flags(RANKS), cwd), nan_check(flags(RANKS), cwd))))
    backend = "nccl, GPUs" if cuda else "gloo, CPU"
    return {name: {**check, "detail": f"{backend}: {check['detail']}"} for name, check in checks.items()}


def outcome(root: Path, a: argparse.Namespace, device: torch.device, workdir: Path,
            timeout: float) -> tuple[dict | None, dict]:
    """benchmarks/outcome.py: short stage-1 runs per memory layout and with --amp, over seeds (:func:`outcome_run`)."""
    variants = ["channels_last:--memoryFormat channels_last", "contiguous:--memoryFormat contiguous"]
    variants += ["amp:--amp 1"] if device.type == "cuda" else []
    (workdir / "outcome.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.outcome", "--data", "toy", "--imageSize",
               str(min(a.imageSize, 84)), "--seeds", *map(str, range(a.outcomeSeeds)), "--device", str(device),
               "--workdir", str(workdir / "outcome"), "--json", str(workdir / "outcome.json"), "--nthreads",
               str(a.nthreads), *[arg for v in variants for arg in ("--variant", v)]]
    return outcome_run(command, workdir / "outcome.json", timeout)


def outcome_run(command: list[str], json_path: Path, timeout: float) -> tuple[dict | None, dict]:
    """``command`` (the outcome benchmark, writing ``json_path``) with its output streamed and a
    ``timeout``: (its report or None, the check ``outcome_benchmark``: failed when it failed or timed out)."""
    status, seconds, output = experiments.run(command, json_path.with_suffix(".log"), REPO, check_env(), timeout,
                                              "outcome| ")
    tail = output.rstrip()[-300:]
    if status is None:
        return None, {"ok": False, "detail": f"timed out after {timeout:.0f} s (--budget): {tail}"}
    if status or not json_path.is_file():
        return None, {"ok": False, "detail": f"exit {status} after {seconds:.0f} s: {tail}"}
    return json.loads(json_path.read_text()), {"ok": True, "detail": f"finished in {seconds:.0f} s"}


def main(a: argparse.Namespace) -> int:
    if a.worker:
        return worker(a)
    if a.stage1Flags:
        raise OptionError(f"unexpected arguments {' '.join(a.stage1Flags)} (stage-1 flags follow --worker KIND --)")
    for flag, size in [("--imageSize", a.imageSize), *(("--loaderSizes", size) for size in a.loaderSizes or ())]:
        if size < 32:
            raise OptionError(f"{flag} must be at least 32, got {size}")
    a.batchSize = a.batchSize or (16 if a.quick else 128)
    budget = Budget(a.budget or (QUICK_BUDGET_S if a.quick else BUDGET_S))  # set-up included
    device = resolve_device(argparse.Namespace(device=a.device, amp=0))
    workdir, json_path = Path(a.workdir).resolve(), Path(a.json).resolve()
    root = toy_data(Path(a.dataroot).resolve() if a.dataroot else workdir / "toy", a.imageSize, a.nthreads)
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the engine reads and writes models/ and runs/ relative to here
    torch.manual_seed(0)
    torch.save(EmbeddingNet(read_split(root, "train").num_classes).state_dict(), "models/gpu_check_stage1.t7")
    steps, episodes = (2, 2) if a.quick else (20, 10)
    env = describe(device)
    report = {"device": env["name"], "environment": env, "quick": a.quick, "imageSize": a.imageSize, "stage1": {},
              "stage2": {}, "checks": {}}
    checks = report["checks"]

    def stage2_phase(name: str, work: Callable[[], tuple]) -> None:
        measured = budget.run(report, f"stage2_{name}", work)
        if measured is not None:
            report["stage2"][name], checks[f"cached_features_{name}"], checks[f"stage2_host_syncs_{name}"] = measured

    for amp in [False, True] if device.type == "cuda" else [False]:
        name = "amp" if amp else "fp32"
        stage1_phase(report, budget, name, lambda: stage1_speed(root, a, device, amp, steps))
        checks[f"cpu_gpu_features_{name}"] = cpu_gpu_features(root, device, amp, a.imageSize)
        for shots in (1, 5):
            stage2_phase(f"{shots}shot_{name}", lambda: stage2_speed(root, a, device, amp, shots, episodes))
        for round_, fix_cls in ((1, 1), (2, 0)):
            rate = budget.run(report, f"stage2_round{round_}_{name}",
                              lambda: stage2_round(root, a, device, amp, fix_cls, episodes + 1))
            if rate is not None:
                report["stage2"].setdefault(f"rounds_{name}", {})[f"round{round_}_episodes_per_s"] = rate
    if device.type == "cuda" and amp_dtype(device) == torch.bfloat16:  # --amp never takes the GradScaler's path:
        with mock.patch("utils.forward.amp_dtype", lambda device: torch.float16):  # float16, as on a V100 or T4
            stage2_phase("1shot_fp16", lambda: stage2_speed(root, a, device, True, 1, episodes))
    else:
        checks["phase_stage2_1shot_fp16"] = {"ok": None, "detail": "skipped: float16 autocast with its GradScaler: "
                                             + ("--amp is float16 here" if device.type == "cuda" else "CUDA only")}
    # the headline numbers: float32
    report["stage1"].update(report["stage1"].get("fp32", {}))
    report["stage2"].update({**report["stage2"].get("1shot_fp32", {}), **report["stage2"].get("rounds_fp32", {})})
    checks["dataparallel_replica_dtype"] = replica_dtypes(device, a.imageSize)
    loss = budget.run(report, "torchrun_loss", lambda: torchrun_loss(root, a, device, workdir, budget.cap("torchrun")))
    if loss is not None:
        checks["torchrun_two_ranks_loss"] = loss
    if a.distributedChecks if a.distributedChecks is not None else (
            device.type == "cuda" and torch.cuda.device_count() >= RANKS):
        checks.update(budget.run(report, "distributed", lambda: distributed_checks(a, device, workdir)) or {})
    else:
        checks.update({name: {"ok": None, "detail": "skipped: --distributedChecks 0 (on by default with 2+ GPUs)"}
                       for name in DISTRIBUTED_CHECKS})
    if not a.quick and a.outcomeSeeds:
        done = budget.run(report, "outcome", lambda: outcome(root, a, device, workdir, budget.cap("outcome")))
        if done is not None:
            report["outcome"], checks["outcome_benchmark"] = done
    more_stage1_figures(report, budget, root, a, device, workdir, steps)  # last: the budget may skip them
    report["phases_s"], report["total_s"] = budget.phases, round(time.perf_counter() - budget.start, 1)
    write_json(json_path, report)
    print_table(report)
    print(f"wrote {json_path}")
    return exit_status(report)


def stage1_phase(report: dict, budget: Budget, name: str, work: Callable[[], dict]) -> None:
    """``work()`` (:func:`stage1_speed`) as phase ``stage1_<name>``: ``report["stage1"][name]``, a finite-loss check."""
    speed = budget.run(report, f"stage1_{name}", work)
    if speed is not None:
        report["stage1"][name] = speed
        report["checks"][f"stage1_{name}_finite_loss"] = {"ok": math.isfinite(speed["loss"]),
                                                          "detail": f"loss {speed['loss']:.4f}"}


def more_stage1_figures(report: dict, budget: Budget, root: Path, a: argparse.Namespace, device: torch.device,
                        workdir: Path, steps: int) -> None:
    """Stage 1 at ``--loaderSizes`` (``by_size``, float32, each on toy files made for it; the ``fp32`` phase's
    figures at ``--imageSize``) and, where ``--amp`` is bfloat16 and ``fp32`` had TF32 convolutions (compute
    capability 8.0 on), in float16 with its GradScaler (as on a V100 or T4) and in full float32."""
    if device.type == "cuda" and amp_dtype(device) == torch.bfloat16:
        with mock.patch("utils.forward.amp_dtype", lambda device: torch.float16):
            stage1_phase(report, budget, "fp16", lambda: stage1_speed(root, a, device, True, steps))
        stage1_phase(report, budget, "fp32_tf32_off", lambda: stage1_speed(root, a, device, False, steps, tf32=False))
    for size in LOADER_SIZES if a.loaderSizes is None and device.type == "cuda" else a.loaderSizes or ():
        speed = report["stage1"].get("fp32") if size == a.imageSize else budget.run(
            report, f"stage1_loader_{size}px",
            lambda: stage1_speed(toy_data(workdir / f"toy_{size}px", size, a.nthreads), a, device, False, steps, size))
        if speed is not None:
            report["stage1"].setdefault("by_size", {})[str(size)] = {
                key: speed[key] for key in ("loader_images_per_s", "images_per_s", "peak_memory_mb")}


def exit_status(report: dict) -> int:
    """1 when a check failed (a phase that raised included), else 0."""
    return 1 if any(check["ok"] is False for check in report["checks"].values()) else 0


def print_table(report: dict) -> None:
    env = report["environment"]
    print(f"\n{env['name']} ({env['device']}{', capability ' + env['capability'] if 'capability' in env else ''}"
          f"{', native bf16' if env.get('native_bf16') else ''}); torch {env['torch']}, CUDA {env['cuda']}")
    print(f"{'phase':<21}{'images/s':>10}{'train ep s':>12}{'test ep s':>11}{'peak MB':>10}")
    stage1 = [(f"{size} px", numbers, ", float32") for size, numbers in report["stage1"].get("by_size", {}).items()]
    stage1 += [(name, numbers, "") for name, numbers in report["stage1"].items()
               if isinstance(numbers, dict) and name != "by_size"]
    for name, numbers, note in stage1:
        print(f"{'stage1 ' + name:<21}{numbers['images_per_s']:>10}{'':>23}{str(numbers['peak_memory_mb']):>10}"
              f"  (through the loader: {numbers['loader_images_per_s']} images/s{note})")
    for name, numbers in report["stage2"].items():
        if isinstance(numbers, dict) and name.startswith("rounds_"):
            print(f"{'stage2 ' + name:<21} episodes/s through the loader: round 1 (warm cache) "
                  f"{numbers.get('round1_episodes_per_s')}, round 2 {numbers.get('round2_episodes_per_s')}")
        elif isinstance(numbers, dict):
            peak = max(filter(None, [numbers["train_peak_memory_mb"], numbers["test_peak_memory_mb"]]), default=None)
            print(f"{'stage2 ' + name:<21}{'':>10}{numbers['train_episode_s']:>12}{numbers['test_episode_s']:>11}"
                  f"{str(peak):>10}")
    print("phase seconds: " + ", ".join(f"{name} {seconds}" for name, seconds in report["phases_s"].items())
          + f"; total {report['total_s']}")
    for name, check in report["checks"].items():
        print(f"{ {True: 'ok', False: 'FAILED', None: '-'}[check['ok']]:<7}{name}: {check['detail']}")


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
