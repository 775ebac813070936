"""Stage 2 (docs/original.md §4): model, optimisers, episodes, training step and epoch, evaluation, report."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from datasets import AugmentDraws, EpisodeDataset, Gallery, scan_split
from datasets.loaders import episode_loader
from datasets.lowshot import read_stage_split
from datasets.transforms import prepare_images
from engine.diagnostics import DIAGNOSTICS, DeviceSums, columns, new_sums
from engine.episode import (
    GALLERY_CALL,
    GALLERY_SHARES,
    EpisodeConfig,
    EpisodeResult,
    GalleryBank,
    episode_gradients,
    episode_on_device,
    gallery_relation,
    run_episode,
)
from engine.features import FeatureCache
from engine.figures import save_deformation_figure
from engine.options import GALLERY_NUM, Stage2Config, shot_defaults
from engine.timing import NO_TIMER, Timer, timed_items
from models import IDeMeNet, load_idemenet
from models.protonet import prototypes, squared_distances
from utils.checkpoint import resolve_checkpoint
from utils.errors import OptionError, TrainingDiverged
from utils.forward import AutocastReplica, autocast, embed_in_chunks, layout_model, step_optimizers
from utils.interrupt import Interrupted, check_stop
from utils.metrics import format_accuracy, mean_ci95
from utils.options import configure_backend

TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1, 2
METRICS = ["epoch", *(d.train for d in DIAGNOSTICS if d.train), "lr", "cls_lr", "scale_lr", "scale", "episodes_per_s",
           "select_split", "select_acc", "select_acc_ci", "select_plain_acc", "select_loss",
           *(d.select for d in DIAGNOSTICS if d.select), "gallery_bn"]
RESUME_KEYS = ("dataroot", "lowshotmeta", "imageSize", "Fang", "network", "GNet", "shots", "ways", "trainways",
               "test_num", "augnum", "chooseNum", "galleryNum", "epoch", "fixCls", "fixAttention", "fixScale", "LR",
               "clsLR", "seed", "deformNet", "deform", "gallerySelect", "galleryExclude", "galleryBN", "selectOn",
               "overlap", "memoryFormat", "scaleInit")
RESUME_FORMAT = 2  # 2: the scale has its own Adam without schedule; gallery features of unflipped images
SYNC_EVERY = 16  # training episodes between the host's reads of the device-side sums (a read waits for the GPU)
PICTURE_DIR = Path("picture")


def load_splits(config: Stage2Config, need_train: bool):
    out, dropped = {}, 0
    for name in (["train"] if need_train else []) + ["val", "test"]:
        out[name], bad = scan_split(read_stage_split(config.dataroot, name, config.lowshotmeta), config.skipBadImages,
                                    config.nthreads)
        dropped += bad
    out.setdefault("train", read_stage_split(config.dataroot, "train", config.lowshotmeta))
    if dropped:
        print(f"left out {dropped} unreadable image(s) (--skipBadImages)")
    for name, ways in (("train", config.trainways), ("val", config.ways), ("test", config.ways)):
        split = out[name]
        if ways > split.num_classes:
            raise OptionError(f"--{'trainways' if name == 'train' else 'ways'} {ways} is larger than the "
                              f"{split.num_classes} classes of split {name}")
        need = config.shots + config.test_num if not config.overlap else max(config.shots, config.test_num)
        if split.min_class_size() < need:
            raise OptionError(f"--shots {config.shots} + --test_num {config.test_num}: split {name} has a class with "
                              f"only {split.min_class_size()} images")
    if config.galleryNum > out["train"].min_class_size():
        raise OptionError(f"--galleryNum {config.galleryNum} is larger than the smallest base class "
                          f"({out['train'].min_class_size()} images)")
    shortlisted = out["train"].num_classes - (config.trainways if config.galleryExclude == "episode" else 0)
    if config.gallerySelect == "nearest" and config.chooseNum > config.galleryNum * shortlisted:
        gallery = f"{config.galleryNum} images x {shortlisted} classes"
        if config.chooseNum == shot_defaults(config.shots)[1]:  # --chooseNum's default, so --galleryNum is at fault
            raise OptionError(f"--galleryNum {config.galleryNum} leaves a shortlist of {gallery} to draw from, fewer "
                              f"than the {config.chooseNum} nearest images --chooseNum takes (its default for --shots "
                              f"{config.shots}); give a larger --galleryNum or a smaller --chooseNum")
        given = "--galleryNum " if config.galleryNum != GALLERY_NUM else ""
        raise OptionError(f"--chooseNum {config.chooseNum} is larger than the gallery a shortlist draws from "
                          f"({given}{gallery})")
    return out


def prepare(config: Stage2Config, device: torch.device, need_train: bool,
            stop: Callable[[], bool] | None = None) -> tuple[dict, IDeMeNet, Gallery | None]:
    """The checked splits, the model (seeded: a fresh deformation network) and the gallery (or None)."""
    splits = load_splits(config, need_train)
    configure_backend(device, config.deterministic, config.seed, config.memoryFormat, bool(config.tf32))
    model = build_model(config, device)
    if model.fc.out_features != splits["train"].num_classes:
        raise OptionError(f"the checkpoint's fc has {model.fc.out_features} classes, split train has "
                          f"{splits['train'].num_classes}")
    gallery = None
    if config.deform != "none" or config.galleryBN == "train":  # the pass sets the statistics of every variant
        gallery = Gallery(splits["train"], config.galleryNum, config.imageSize, config.nthreads,
                          progress=bool(config.progress), stop=stop)
    return splits, model, gallery


def build_model(config: Stage2Config, device: torch.device) -> IDeMeNet:
    name, flag = (config.GNet, "--GNet") if config.GNet != "None" else (config.network, "--network")
    model = load_idemenet(resolve_checkpoint(name, flag), image_size=config.imageSize, fang=config.Fang,
                          deform_net=config.deformNet)
    return layout_model(model.to(device).eval())


def param_groups(model: IDeMeNet, config: Stage2Config) -> tuple[list, list]:
    """The parameters the prototype loss trains and those the classification loss trains."""
    meta = [] if config.fixAttention or config.deform != "learned" else list(model.deformer.parameters())
    meta = meta + ([] if config.fixScale else [model.scale])
    cls = [] if config.fixCls else list(model.backbone.parameters()) + list(model.fc.parameters())
    trainable = {id(p) for p in meta + cls}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return meta, cls


def make_optimizers(model: IDeMeNet, config: Stage2Config) -> tuple[dict, dict]:
    """The original's optimisers and schedules (docs/original.md §4.6), by resume-state key: Adam for the
    deformation network (LR), the scale (LR, no schedule: its rate never decays), the embedding (clsLR * 0.1) and
    fc (clsLR); StepLR(40, 0.5) for the deformation network's and the classifier's. Frozen groups keep theirs."""
    meta_opt = EpisodeAdam(list(model.deformer.parameters()), lr=config.LR)
    scale_opt = EpisodeAdam([model.scale], lr=config.LR)
    cls_opt = EpisodeAdam([{"params": list(model.backbone.parameters()), "lr": config.clsLR * 0.1},
                           {"params": list(model.fc.parameters()), "lr": config.clsLR}])
    schedulers = {"meta_sched": torch.optim.lr_scheduler.StepLR(meta_opt, 40, 0.5),
                  "cls_sched": torch.optim.lr_scheduler.StepLR(cls_opt, 40, 0.5)}
    return {"meta_opt": meta_opt, "scale_opt": scale_opt, "cls_opt": cls_opt}, schedulers


class EpisodeAdam(torch.optim.Adam):
    """torch's multi-tensor Adam step (default betas and eps; no weight decay, amsgrad or maximize), its arithmetic
    unchanged (bit-identical to the per-parameter loop, tests/test_stage2_ops.py), that reads a group's step counts
    in one stacked copy where torch reads each twice per parameter: on a GPU those reads are host time for every
    parameter of every episode. Its state is torch Adam's, so either resumes from the other's; a state with
    other settings is refused."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, lr=lr, foreach=True)
        self.register_load_state_dict_post_hook(_refuse_other_settings)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:  # as torch starts it: the count a float32 on the host, the averages in p's layout
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            (beta1, beta2), lr = group["betas"], group["lr"]
            torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            counts = torch.stack(steps).tolist()
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, [(1 - beta2 ** t) ** 0.5 for t in counts])
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denominators, [(lr / (1 - beta1 ** t)) * -1 for t in counts])
        return loss


# Adam's settings that EpisodeAdam's step does not implement: a loaded state must have each off (0, False, None).
UNIMPLEMENTED = ("weight_decay", "amsgrad", "maximize", "capturable", "differentiable", "fused")


def _refuse_other_settings(optimizer: EpisodeAdam) -> None:
    for group in optimizer.param_groups:
        other = {key: group[key] for key in UNIMPLEMENTED if group.get(key)}
        if other:
            raise ValueError(f"an Adam state with settings EpisodeAdam does not implement: {other}")


def step_schedulers(*schedulers) -> None:
    """Advance every schedule once per epoch, also those of frozen (never stepped) optimisers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for scheduler in schedulers:
            scheduler.step()


def episode_config(config: Stage2Config, ways: int, train: bool = False) -> EpisodeConfig:
    """The episode settings; ``--galleryExclude`` only in training (other classes are never in the gallery)."""
    return EpisodeConfig(ways, config.augnum, config.chooseNum, config.deform, config.gallerySelect,
                         config.galleryExclude if train else "none", config.batchSize, bool(config.amp))


def episodes(split, config: Stage2Config, episode: EpisodeConfig, count: int, stream: int, gallery_size: int,
             evaluation: bool = False, cache: FeatureCache | None = None) -> EpisodeDataset:
    """The episodes of ``split`` with ``episode``'s ways, the draws sharing it (:func:`episode_config`): evaluation
    decodes only the support (to deform it); training with the run's ``cache`` (``--fixCls 1``) also the queries
    it lacks (``set_epoch`` right before iterating, in order)."""
    draws = None if episode.deform == "none" else AugmentDraws(episode, gallery_size, config.Fang ** 2)
    decode = ("none" if episode.deform == "none" else "support") if evaluation else "all" if cache is None else "new"
    return EpisodeDataset(split, config.imageSize, episode.ways, config.shots, config.test_num, count, config.seed,
                          stream, bool(config.overlap), draws, decode, None if decode != "new" else cache.known)


def make_embed(model: IDeMeNet, device: torch.device, data_parallel: bool = False):
    """``model.embed``; with ``--dataParallel 1`` and several GPUs, DataParallel over all of them gathering on
    ``device``, each replica in the run's autocast dtype (chunks of 5 to 75 images usually run faster on one)."""
    if data_parallel and device.type == "cuda" and torch.cuda.device_count() > 1:
        others = [index for index in range(torch.cuda.device_count()) if index != device.index]
        return nn.DataParallel(AutocastReplica(model.backbone), device_ids=[device.index, *others],
                               output_device=device.index)
    return model.embed


@torch.no_grad()
def initialize_scale(model: IDeMeNet, value: float | str | None, dataset: EpisodeDataset, device: torch.device,
                     embed, config: EpisodeConfig, cache: FeatureCache | None = None) -> str | None:
    """Set ``model.scale`` for ``--scaleInit``: a number, or ``auto``, 1 / the mean over the first training
    episode's (``dataset``'s epoch 0) queries of the standard deviation of their squared distances ``[Q, W]``
    to its plain prototypes, so that the logits ``-scale * d`` start with unit spread. Returns the log line,
    None when the scale stays."""
    if value is None:
        return None
    if value == "auto":
        dataset.set_epoch(0)
        episode, features = episode_on_device(dataset[0], device), []
        for part in ("support", "query"):
            if cache is not None:
                features.append(cache.lookup(episode[f"{part}_ids"], episode.get(part)))
            else:
                with autocast(device, config.amp):
                    features.append(embed_in_chunks(embed, prepare_images(episode[part], device), config.chunk))
        support, query = (f.float() for f in features)
        distances = squared_distances(query, prototypes(support, episode["support_labels"], config.ways))
        scale = 1.0 / distances.std(dim=1).mean().item()
    else:
        scale = float(value)
    if not math.isfinite(scale) or scale <= 0:
        raise OptionError(f"--scaleInit auto: the first training episode's distances give no usable scale ({scale})")
    model.scale.data.fill_(scale)
    return f"initial scale {scale:.6g} (--scaleInit {value})"


def optimizer_step(result: EpisodeResult, groups: tuple[list, list], optimizers: dict, train_cls: bool,
                   timer: Timer = NO_TIMER, scaler: torch.amp.GradScaler | None = None) -> None:
    """Both losses' gradients (``groups`` from :func:`param_groups`), then a step of each optimiser given one;
    ``train_cls``: the classification loss trains (epoch 1 on); ``scaler``: float16 loss scaling."""
    meta_params, cls_params = groups
    for param in (*meta_params, *cls_params):  # what zero_grad(set_to_none=True) does, without its profiler records
        param.grad = None
    with timer.section("backward"):
        episode_gradients(result, meta_params, cls_params if train_cls else [], scaler)
    with timer.section("optimizer"):
        step_optimizers(list(optimizers.values()), scaler)


def train_one_epoch(model: IDeMeNet, loader: Iterable[dict], bank: GalleryBank | None, config: EpisodeConfig,
                    device: torch.device, epoch: int, groups: tuple[list, list], optimizers: dict, embed,
                    progress: dict, stop: Callable[[], bool] | None = None, timer: Timer = NO_TIMER,
                    show: bool = True, cache: FeatureCache | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[EpisodeResult | None, torch.Tensor | None]:
    """Train on ``loader``'s episodes, adding each to ``progress``; returns the last one's :class:`EpisodeResult`
    and gallery relation (None, None: no episode). The classification loss trains from epoch 1 on; ``cache``
    keeps a frozen embedding's features (``--fixCls 1``). Sums stay on the device (:class:`DeviceSums`), read
    with the finite-loss check every :data:`SYNC_EVERY` episodes, at the end and on a stop. Raises Interrupted,
    and TrainingDiverged naming the first non-finite loss (weights stepped since: the caller must not save)."""
    meta_params, cls_params = groups
    train_cls = bool(cls_params) and epoch > 0
    result = relation = None
    sums, unread = DeviceSums(progress, device), []
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not show, leave=False)
    tick = time.perf_counter()
    for done, episode in enumerate(timed_items(loader, timer), 1):
        episode = episode_on_device(episode, device)
        result = run_episode(model, episode, bank, config, device, train_cls=train_cls, track_grad=bool(meta_params),
                             embed=embed, timer=timer, cache=cache)
        optimizer_step(result, groups, optimizers, train_cls, timer, scaler)
        stopping = stop is not None and stop()
        with timer.section("bookkeeping"):
            relation = None if result.gallery_index is None else \
                gallery_relation(result, bank.gallery.labels, episode["classes"])
            sums.add(result, relation)
            unread.append((episode["index"], episode["classes"]))
            if stopping or len(unread) == SYNC_EVERY or done == len(loader):
                first_bad = sums.read()
                if first_bad is not None:
                    bar.close()
                    index, classes = unread[first_bad]
                    split = getattr(getattr(loader, "dataset", None), "split", None)  # None: classes by id
                    names = " ".join(split.classes[c] if split is not None else str(c) for c in classes.tolist())
                    raise TrainingDiverged(f"non-finite loss at epoch {epoch}, episode {int(index)} (classes {names})")
                unread = []
                bar.set_postfix(loss=f"{progress['proto_loss'] / progress['step']:.3f}",
                                acc=f"{100 * progress['acc'] / progress['step']:.1f}")
            progress["time"] += time.perf_counter() - tick
        timer.end_step()
        tick = time.perf_counter()
        bar.update()
        if stopping:
            bar.close()
            raise Interrupted(f"in training epoch {epoch}, after episode {progress['step']}")
    bar.close()
    return result, relation


@torch.no_grad()
def evaluate(model: IDeMeNet, dataset: EpisodeDataset, bank: GalleryBank | None, options: Stage2Config,
             device: torch.device, desc: str, embed, keep_first: bool = False, timer: Timer = NO_TIMER,
             stop: Callable[[], bool] | None = None, cache: FeatureCache | None = None, cached: bool = True) -> dict:
    """Per episode ``acc``, ``plain`` (without deformation) and ``loss``, the diagnostics' ``sums`` and, with
    ``keep_first``, the ``first`` result. Each distinct image is embedded once in advance into ``cache`` (new
    unless given), so only deformed images go through the networks per episode; ``cached=False`` embeds each
    episode afresh (everything decoded). Raises Interrupted when ``stop()`` becomes true."""
    config = episode_config(options, dataset.ways)
    if cached:
        cache = cache or FeatureCache(embed, len(dataset.split), device, options.batchSize, bool(options.amp))
        cache.fill(dataset, options.nthreads, bool(options.progress), f"{desc} images", stop)
    else:
        cache = None
    per_episode, first, sums = [], None, new_sums()
    device_sums = DeviceSums(sums, device)
    for episode in tqdm(timed_items(episode_loader(dataset, options.nthreads, device), timer), total=len(dataset),
                        desc=desc, disable=not options.progress, leave=False):
        result = run_episode(model, episode, bank, config, device, embed=embed, timer=timer, cache=cache)
        with timer.section("bookkeeping"):
            per_episode.append(torch.stack([result.accuracy, result.plain_accuracy, result.proto_loss.float()]))
            device_sums.add(result)
        if keep_first and first is None:
            first = result
        timer.end_step()
        check_stop(stop, f"in the {desc} evaluation")
    acc, plain, losses = torch.stack(per_episode).T.tolist() if per_episode else ([], [], [])
    device_sums.read()
    return {"acc": acc, "plain": plain, "loss": losses, "first": first, "sums": sums}


def test(model: IDeMeNet, split, bank: GalleryBank | None, config: Stage2Config, device: torch.device, embed,
         stop: Callable[[], bool] | None = None, cache: FeatureCache | None = None) -> dict:
    """The final evaluation (:func:`evaluate`, the first result kept): ``--testEpisodes`` test episodes."""
    dataset = episodes(split, config, episode_config(config, config.ways), config.testEpisodes, TEST_STREAM,
                       len(bank or []), evaluation=True)
    return evaluate(model, dataset, bank, config, device, "test", embed, keep_first=True, stop=stop, cache=cache)


def gallery_bank(gallery: Gallery | None, model: IDeMeNet, config: Stage2Config, device: torch.device,
                 stop: Callable[[], bool] | None = None, features: torch.Tensor | None = None) -> GalleryBank | None:
    """The :class:`GalleryBank` of ``gallery`` (None without one) after ``--galleryBN``'s pass, or with a resumed
    run's ``features`` and no pass; prints how its features came about (:func:`gallery_pass_line`)."""
    if gallery is None:
        return None
    bank = GalleryBank(gallery, model, device, config.batchSize, bool(config.amp), features, stop, config.galleryBN)
    print(gallery_pass_line(bank), flush=True)
    return bank


def gallery_pass_line(bank: GalleryBank) -> str:
    """The log line saying how the gallery features (and BatchNorm statistics) came about."""
    if bank.batch_norm == "restored":
        return "gallery features and BatchNorm statistics restored from the resumable state (no new gallery pass)"
    if bank.batch_norm == "eval":
        return "gallery pass in evaluation mode (--galleryBN eval): BatchNorm running statistics untouched"
    calls = -(-len(bank) // GALLERY_CALL)
    return (f"gallery pass in training mode (--galleryBN train, the original's): {calls} call(s) of up to "
            f"{GALLERY_CALL} images in {GALLERY_SHARES} shares, each share normalised with its own statistics; "
            f"the first shares' updates moved the embedding's BatchNorm running_var by "
            f"{100 * bank.running_var_change:.2f} % (mean relative change), used by everything after")


def selection_columns(stats: dict, split: str) -> dict:
    """The ``select_*`` columns of metrics.csv from an :func:`evaluate` pass over ``split``."""
    acc, acc_ci = mean_ci95([100 * a for a in stats["acc"]])
    return {"select_split": split, "select_acc": acc, "select_acc_ci": acc_ci,
            "select_plain_acc": mean_ci95([100 * a for a in stats["plain"]])[0],
            "select_loss": sum(stats["loss"]) / len(stats["loss"]), **columns(stats["sums"], "select")}


def report(stats: dict, config: Stage2Config, split: str) -> dict:
    """Print the accuracy lines and return the numbers for the JSON summary (percent)."""
    ways, deformed, plain = config.ways, stats["acc"], stats["plain"]
    (mean, ci), (pmean, pci), (dmean, dci) = (mean_ci95([100 * a for a in accuracies]) for accuracies in
                                               (deformed, plain, [a - b for a, b in zip(deformed, plain)]))
    print(format_accuracy(ways, config.shots, split, deformed, config.seed))
    print(format_accuracy(ways, config.shots, split, plain, config.seed)
          .replace(" accuracy:", " accuracy without deformation:"))
    print(f"difference (with - without deformation): {dmean:+.2f} +- {dci:.2f} % (paired, same episodes)")
    return {"split": split, "ways": ways, "shots": config.shots, "episodes": len(deformed), "seed": config.seed,
            "accuracy": mean, "ci95": ci, "plain_accuracy": pmean, "plain_ci95": pci, "difference": dmean,
            "difference_ci95": dci, "loss": sum(stats["loss"]) / len(stats["loss"]), "deform": config.deform,
            "gallerySelect": config.gallerySelect, "galleryBN": config.galleryBN,
            "checkpoint": config.GNet if config.evaluate else config.tensorname,
            "weights": "checkpoint" if config.evaluate else config.testWeights}


def write_figure(result, config: Stage2Config, relation: torch.Tensor | None = None, suffix: str = "") -> Path | None:
    """``picture/<tensorname>_deformed<suffix>.png`` from an episode's deformed images, if any; ``relation``
    (:func:`engine.episode.gallery_relation`; None at val and test) marks each gallery image's class."""
    if result is None or result.deformed is None:
        return None
    path = PICTURE_DIR / f"{config.tensorname}_deformed{suffix}.png"
    save_deformation_figure(path, result.probes, result.gallery_images, result.weights, result.deformed, relation)
    return path


def new_progress() -> dict[str, float]:
    """The running sums of a training epoch (:class:`DeviceSums` keeps most of them on the device)."""
    return {"time": 0.0, "select": None, **new_sums()}


def epoch_row(epoch: int, progress: dict[str, float], optimizers: dict, model: IDeMeNet) -> dict:
    """A training epoch's row of metrics.csv, but the selection pass's columns and ``gallery_bn``."""
    return {"epoch": epoch, **columns(progress, "train"), "lr": optimizers["meta_opt"].param_groups[0]["lr"],
            "cls_lr": optimizers["cls_opt"].param_groups[1]["lr"],
            "scale_lr": optimizers["scale_opt"].param_groups[0]["lr"], "scale": model.scale.item(),
            "episodes_per_s": progress["step"] / max(progress["time"], 1e-9)}
