"""Stage 1 (docs/original.md §3): soft-random data, network, optimiser, training epoch, val few-shot monitor."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import SeededSampler, SoftRandomDataset, blend_batch, scan_split
from datasets.loaders import image_loader
from datasets.lowshot import read_stage_split
from engine.features import FeatureCache
from engine.fewshot import evaluate_embedding
from engine.options import Stage1Config
from engine.precise_bn import reestimate
from engine.timing import NO_TIMER, Timer, timed_items
from models import DEFAULT_BACKBONE, EmbeddingNet, load_embedding
from models.batchnorm import convert_to_gloo_sync
from utils.checkpoint import resolve_checkpoint
from utils.distributed import DistInfo, step_verdict
from utils.errors import OptionError, TrainingDiverged
from utils.forward import autocast, compute_layout, layout_model, step_optimizers
from utils.interrupt import Interrupted
from utils.metrics import mean_ci95

METRICS = ["epoch", "loss", "accuracy", "lr", "val_1shot", "val_1shot_ci", "val_5shot", "val_5shot_ci",
           "val_1shot_precise", "val_1shot_precise_ci", "val_5shot_precise", "val_5shot_precise_ci", "images_per_s"]
RESUME_KEYS = ("dataroot", "lowshotmeta", "imageSize", "Fang", "network", "backbone", "LR", "batchSize", "seed",
               "filesPerClass", "crop", "memoryFormat", "preciseBN")


def load_data(config: Stage1Config, device: torch.device, info: DistInfo):
    """The soft-random training set, its sampler and loader (this process's share), and the val split."""
    (train, dropped), (val, dropped_val) = (
        scan_split(read_stage_split(config.dataroot, name, config.lowshotmeta), config.skipBadImages, config.nthreads)
        for name in ("train", "val"))
    if dropped + dropped_val and info.is_main:
        print(f"left out {dropped + dropped_val} unreadable image(s) (--skipBadImages)")
    if config.valEpisodes and val.min_class_size() < 5 + config.valQueries:
        raise OptionError(f"--valQueries {config.valQueries}: val classes need 5 + {config.valQueries} images, "
                          f"the smallest has {val.min_class_size()}")
    dataset = SoftRandomDataset(train, config.imageSize, config.Fang, config.filesPerClass, crop=config.crop)
    sampler = SeededSampler(len(dataset), config.seed, info.rank, info.world_size)
    if config.batchSize % info.world_size:
        raise OptionError(f"--batchSize {config.batchSize} is not divisible by the {info.world_size} processes")
    loader = image_loader(dataset, config.batchSize // info.world_size, config.nthreads, device, sampler=sampler,
                          persistent_workers=config.nthreads > 0)
    return train, val, sampler, loader


def build_model(config: Stage1Config, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The network (random of ``--backbone``, or ``--network``) and Adam with the original's learning-rate
    groups. Raises OptionError when ``--backbone`` contradicts the ``--network`` checkpoint."""
    if config.network == "None":
        model = EmbeddingNet(num_classes, config.backbone or DEFAULT_BACKBONE)
        groups = [{"params": model.parameters(), "lr": config.LR}]
    else:
        path = resolve_checkpoint(config.network, "--network")
        model = load_embedding(path, num_classes)
        if config.backbone not in (None, model.backbone_name):
            raise OptionError(f"--backbone {config.backbone} contradicts --network {config.network}: {path} holds a "
                              f"{model.backbone_name}")
        fc = list(model.convnet.fc.parameters())
        rest = [p for n, p in model.named_parameters() if not n.startswith("convnet.fc.")]
        groups = [{"params": fc, "lr": config.LR * 0.1}, {"params": rest, "lr": config.LR}]
    return model, torch.optim.Adam(groups)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device, epoch: int, config: Stage1Config, info: DistInfo, progress: dict,
                    stop: Callable[[], bool], timer: Timer = NO_TIMER,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Train the epoch's batches, adding each to ``progress``; ``scaler``: float16 loss scaling.

    Under distribution every rank runs the same number of batches (the sampler pads the epoch) and they
    agree before each backward pass whether to go on, so they stop or fail together; that verdict brings
    the loss and correct count to the host, the step's one synchronisation. Raises Interrupted (after the
    batch is stepped) and TrainingDiverged (that batch not stepped) when any process stops or diverges."""
    model.train()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not (config.progress and info.is_main), leave=False)
    start = time.perf_counter()
    for pairs, labels, weights, blended in timed_items(loader, timer):
        with timer.section("prepare"):
            images = compute_layout(blend_batch(pairs, weights, blended, device))
            labels = labels.to(device, non_blocking=True)
        with timer.section("forward"), autocast(device, config.amp):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        with timer.section("bookkeeping"):
            statistics = torch.stack([loss.detach(), (logits.detach().argmax(1) == labels).sum().float()])
            diverged, stopping, (loss_value, correct) = step_verdict(torch.isfinite(loss.detach()), stop(), info,
                                                                     statistics)
            if diverged:
                where = f" on rank {', '.join(map(str, diverged))}" if info.enabled else ""
                bar.close()
                raise TrainingDiverged(f"non-finite loss{where} at epoch {epoch}, step {progress['step']}")
        with timer.section("optimizer"):
            optimizer.zero_grad(set_to_none=True)
        with timer.section("backward"):
            (loss if scaler is None else scaler.scale(loss)).backward()
        with timer.section("optimizer"):
            step_optimizers([optimizer], scaler)
        with timer.section("bookkeeping"):
            n = len(labels)
            progress["step"] += 1
            progress["loss_sum"] += loss_value * n
            progress["correct"] += int(correct)
            progress["seen"] += n
            progress["time"] += time.perf_counter() - start
            start = time.perf_counter()
        timer.end_step()
        bar.update()
        bar.set_postfix(loss=f"{progress['loss_sum'] / progress['seen']:.3f}",
                        img_s=f"{progress['seen'] * info.world_size / max(progress['time'], 1e-9):.0f}")
        if stopping:
            bar.close()
            raise Interrupted(f"in training epoch {epoch}, after step {progress['step']}")
    bar.close()


def new_progress() -> dict[str, float]:
    """This process's running sums of an epoch (:data:`SUMMED_PROGRESS` add up over processes)."""
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}


SUMMED_PROGRESS = ("loss_sum", "correct", "seen")


def distribute(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """The model on ``device``; under torchrun in DistributedDataParallel with synchronised BatchNorm (whole-batch
    statistics, as the original's one GPU). Otherwise one device: DataParallel would normalise shares apart."""
    model = layout_model(model.to(device))
    if info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_to_gloo_sync(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def multi_gpu_hint(device: torch.device, info: DistInfo) -> str | None:
    """How to use several visible GPUs when stage 1 runs on one of them, else None."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if info.enabled or gpus < 2:
        return None
    return (f"stage 1 runs on one GPU of the {gpus} visible (BatchNorm over the whole batch, as the original); "
            f"to use all of them: torchrun --nproc_per_node={gpus} classification.py ... (synchronised BatchNorm, "
            "the same statistics)")


def evaluate(model: nn.Module, val, config: Stage1Config, device, info: DistInfo = DistInfo(),
             stop: Callable[[], bool] | None = None, suffix: str = "") -> dict[str, float]:
    """5-way 1- and 5-shot prototype accuracy (mean, 95% half-interval, %) as ``val_<K>shot<suffix>`` and
    ``..._ci``, each val image embedded once. Under distribution every rank must call it and gets all the
    episodes' numbers. Raises Interrupted when ``stop()`` becomes true in any rank."""
    net = unwrap(model)
    net.eval()
    cache = FeatureCache(net.features, len(val), device, config.batchSize, bool(config.amp))
    out = {}
    for shots in (1, 5):
        accs = evaluate_embedding(net.features, val, config.imageSize, 5, shots, config.valQueries, config.valEpisodes,
                                  config.seed, device, 1, config.batchSize, config.nthreads, config.amp,
                                  desc=f"val {shots}-shot", progress=bool(config.progress) and info.is_main, stop=stop,
                                  cache=cache, info=info)
        out[f"val_{shots}shot{suffix}"], out[f"val_{shots}shot{suffix}_ci"] = mean_ci95([100 * a for a in accs])
    return out


def precise_copy(model: nn.Module, files: list, config: Stage1Config, device: torch.device,
                 stop: Callable[[], bool] | None = None) -> EmbeddingNet:
    """A plain copy of ``model`` with BatchNorm statistics re-estimated over ``files`` (``--preciseBN``)."""
    net = unwrap(model)
    twin = EmbeddingNet(net.convnet.fc.out_features, net.backbone_name)
    twin.load_state_dict(plain_state(model))
    twin = layout_model(twin.to(device))
    reestimate(twin, files, config.imageSize, config.batchSize, config.nthreads, device, bool(config.progress), stop)
    return twin


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network (inside DistributedDataParallel under torchrun), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside (Distributed)DataParallel, else ``model``."""
    return model.module if hasattr(model, "module") else model
