"""Stage 2: meta-train the deformation sub-network with two losses, and evaluate.

    python onlyBasetwoLoss.py --dataroot DATA --network softRandom --shots 1 --augnum 7 \
        --fixCls 1 --chooseNum 15 --tensorname metaNet_1shot
    python onlyBasetwoLoss.py --dataroot DATA --GNet metaNet_1shot --shots 1 --evaluate

Training writes ``models/<tensorname>.t7`` (selected weights: best val accuracy by default),
``models/<tensorname>_last.t7`` (final weights) and ``runs/<tensorname>/``; both modes write
``picture/<tensorname>_deformed.png``.
"""
from __future__ import annotations

from utils.runtime import set_process_env

set_process_env()  # before torch loads

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from datasets import AugmentDraws, EpisodeDataset, Gallery, read_split, scan_split
from models import IDeMeNet, encoder_output_size, load_idemenet
from models.episode import (DEFORM_MODES, EPISODE_CLASS, GALLERY_EXCLUDE, GALLERY_MODES, SAME_CLASS, EpisodeConfig,
                            GalleryBank, episode_gradients, gallery_relation, run_episode)
from utils.checkpoint import MODELS_DIR, atomic_save, resolve_checkpoint, safe_load
from utils.errors import OptionError, TrainingDiverged
from utils.evaluation import episode_loader
from utils.figures import save_deformation_figure
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt
from utils.metrics import format_accuracy, mean_ci95
from utils.options import add_common_args, check_positive, configure_backend, resolve_device, run_cli
from utils.runs import MetricsLog, clear_run_dir, format_row, open_run, write_json

TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1, 2
METRICS = ["epoch", "proto_loss", "cls_loss", "train_acc", "train_plain_acc", "select_split", "select_acc",
           "select_acc_ci", "select_plain_acc", "select_loss", "weight_mean", "weight_std", "lr", "cls_lr", "scale_lr", "scale",
           "episodes_per_s", "train_gallery_same_class", "train_gallery_episode_class", "train_own_distance",
           "train_other_distance", "select_weight_mean", "select_weight_std", "select_own_distance",
           "select_other_distance"]
RESUME_KEYS = ("dataroot", "imageSize", "Fang", "network", "GNet", "shots", "ways", "trainways", "test_num", "augnum",
               "chooseNum", "galleryNum", "epoch", "numEpochs", "fixCls", "fixAttention", "fixScale", "LR", "clsLR",
               "seed", "deformNet", "deform", "gallerySelect", "galleryExclude", "selectOn", "overlap")
RESUME_FORMAT = 2  # 2: the scale has its own Adam without schedule; gallery features of unflipped images
PICTURE_DIR = Path("picture")
CUDA_CHUNK, CPU_CHUNK = 128, 16  # default --batchSize per device


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IDeMe-Net stage 2: deformation meta-learning and evaluation",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, batch_default=None,
                    batch_help=f"images per forward chunk (default: {CUDA_CHUNK} on CUDA, {CPU_CHUNK} on the CPU, "
                    "where smaller chunks need less memory and run faster)")
    parser.set_defaults(tensorname="metaNet")
    parser.add_argument("--GNet", default="None", help="stage-2 checkpoint (ours or the authors' metaNet_*shot.t7)")
    parser.add_argument("--shots", type=int, default=1, help="support images per class")
    parser.add_argument("--ways", type=int, default=5, help="classes per val/test episode")
    parser.add_argument("--trainways", type=int, default=5, help="classes per training episode")
    parser.add_argument("--test_num", type=int, default=15, help="query images per class")
    parser.add_argument("--augnum", type=int, default=None, help="deformed copies per support image (7 for 1-shot, 5 otherwise)")
    parser.add_argument("--chooseNum", type=int, default=None, help="nearest gallery images per class (15 for 1-shot, 30 otherwise)")
    parser.add_argument("--galleryNum", type=int, default=30, help="gallery images per base class")
    parser.add_argument("--epoch", type=int, default=600, help="training episodes per epoch")
    parser.add_argument("--numEpochs", type=int, default=120, help="training epochs")
    parser.add_argument("--clsLR", type=float, default=1e-3, help="fc learning rate (the embedding gets clsLR * 0.1)")
    parser.add_argument("--fixCls", type=int, default=0, choices=(0, 1), help="1: freeze the embedding and fc")
    parser.add_argument("--fixAttention", type=int, default=0, choices=(0, 1), help="1: freeze the deformation sub-network")
    parser.add_argument("--fixScale", type=int, default=0, choices=(0, 1), help="1: freeze the distance scale")
    parser.add_argument("--deformNet", default="small", choices=("small", "twobranch"),
                        help="deformation sub-network: the released encoder or the paper's two ResNet-18 branches")
    parser.add_argument("--deform", default="learned", choices=DEFORM_MODES,
                        help="ablation: learned weights, U(0,1) weights per cell, or no deformed images")
    parser.add_argument("--gallerySelect", default="nearest", choices=GALLERY_MODES,
                        help="ablation: chooseNum nearest gallery images per class, or uniform over the gallery")
    parser.add_argument("--galleryExclude", default="none", choices=GALLERY_EXCLUDE,
                        help="ablation: episode leaves the training episode's own classes out of the gallery "
                        "shortlists, so training sees what testing sees (none: the original)")
    parser.add_argument("--selectOn", default="val", choices=("val", "test"),
                        help="weights kept by best val accuracy, or (the original's protocol) lowest test loss")
    parser.add_argument("--overlap", type=int, default=0, choices=(0, 1),
                        help="1: draw support and query independently, so they may overlap (the original's protocol)")
    parser.add_argument("--valEpisodes", type=int, default=600, help="episodes of each per-epoch evaluation")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate --GNet on test episodes")
    parser.add_argument("--testEpisodes", type=int, default=600, help="test episodes of the final evaluation")
    return parser


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the shot- and device-dependent defaults and check the flags that need no data."""
    if args.batchSize is None:
        args.batchSize = CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
    if args.augnum is None:
        args.augnum = 7 if args.shots == 1 else 5
    if args.chooseNum is None:
        args.chooseNum = 15 if args.shots == 1 else 30
    check_positive(args, "imageSize", "Fang", "batchSize", "shots", "ways", "trainways", "test_num", "augnum",
                   "chooseNum", "galleryNum", "epoch", "numEpochs", "valEpisodes", "testEpisodes")
    if args.deformNet == "small" and encoder_output_size(args.imageSize) < 1:
        raise OptionError(f"--imageSize {args.imageSize} is too small for the deformation encoder (at least 32 px)")
    if args.imageSize < args.Fang:
        raise OptionError(f"--imageSize {args.imageSize} cannot hold a {args.Fang} x {args.Fang} grid")
    if args.GNet == "None" and args.network == "None":
        raise OptionError("--network (a stage-1 checkpoint) or --GNet (a stage-2 checkpoint) is required")
    if args.evaluate and args.GNet == "None":
        raise OptionError("--evaluate needs --GNet (the stage-2 checkpoint to evaluate)")
    if args.galleryExclude == "episode" and (args.deform == "none" or args.gallerySelect != "nearest"):
        raise OptionError("--galleryExclude episode acts on the nearest-gallery shortlists: it needs "
                          "--gallerySelect nearest and deformed images (--deform learned or random)")


def build_model(args: argparse.Namespace, device: torch.device) -> IDeMeNet:
    name, flag = (args.GNet, "--GNet") if args.GNet != "None" else (args.network, "--network")
    model = load_idemenet(resolve_checkpoint(name, flag), image_size=args.imageSize, fang=args.Fang,
                          deform_net=args.deformNet)
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: IDeMeNet, args: argparse.Namespace) -> tuple[list, list]:
    """The parameters the prototype loss trains and those the classification loss trains."""
    meta = [] if args.fixAttention or args.deform != "learned" else model.deformation_parameters()
    meta = meta + ([] if args.fixScale else [model.scale])
    cls = [] if args.fixCls else model.embedding_parameters() + list(model.fc.parameters())
    trainable = {id(p) for p in meta + cls}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return meta, cls


def make_optimizers(model: IDeMeNet, args: argparse.Namespace) -> tuple[dict, dict]:
    """The original's optimisers and schedules (SPEC 3, item 7), by resume-state key.

    Adam for the deformation network (LR), for the scale (LR, its own Adam without a schedule,
    so its rate never decays) and for the embedding (clsLR * 0.1) and fc (clsLR); StepLR(40, 0.5)
    for the deformation network's and the classifier's. Frozen groups keep their optimiser, never
    stepped.
    """
    meta_opt = torch.optim.Adam(model.deformation_parameters(), lr=args.LR)
    scale_opt = torch.optim.Adam([model.scale], lr=args.LR)
    cls_opt = torch.optim.Adam([{"params": model.embedding_parameters(), "lr": args.clsLR * 0.1},
                                {"params": list(model.fc.parameters()), "lr": args.clsLR}])
    schedulers = {"meta_sched": torch.optim.lr_scheduler.StepLR(meta_opt, 40, 0.5),
                  "cls_sched": torch.optim.lr_scheduler.StepLR(cls_opt, 40, 0.5)}
    return {"meta_opt": meta_opt, "scale_opt": scale_opt, "cls_opt": cls_opt}, schedulers


def episode_config(args: argparse.Namespace, ways: int, train: bool = False) -> EpisodeConfig:
    """The episode settings; ``--galleryExclude`` applies to training episodes only (the others'
    classes are never in the gallery)."""
    return EpisodeConfig(ways, args.augnum, args.chooseNum, args.deform, args.gallerySelect,
                         args.galleryExclude if train else "none", args.batchSize, bool(args.amp))


def episodes(split, args, ways: int, count: int, stream: int, gallery_size: int) -> EpisodeDataset:
    draws = None if args.deform == "none" else AugmentDraws(args.augnum, args.chooseNum, gallery_size, args.Fang ** 2)
    return EpisodeDataset(split, args.imageSize, ways, args.shots, args.test_num, count, args.seed, stream,
                          bool(args.overlap), draws)


def make_embed(model: IDeMeNet, device: torch.device):
    """``model.embed``, split over the visible GPUs with DataParallel when there are several."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return nn.DataParallel(model.backbone)
    return model.embed


@torch.no_grad()
def evaluate(model, dataset, bank, args, device, desc, embed, keep_first: bool = False):
    """Accuracies with and without deformation and losses over the dataset's episodes."""
    config = episode_config(args, dataset.ways)
    acc, plain, losses, first, sums = [], [], [], None, new_deformation_sums()
    for episode in tqdm(episode_loader(dataset, args.nthreads, device), desc=desc, disable=not args.progress,
                        leave=False):
        result = run_episode(model, episode, bank, config, device, embed=embed)
        acc.append(result.accuracy)
        plain.append(result.plain_accuracy)
        losses.append(result.proto_loss.item())
        add_deformation(sums, result)
        if keep_first and first is None:
            first = result
    return {"acc": acc, "plain": plain, "loss": losses, "first": first, "deformation": sums}


def write_figure(result, args, relation: torch.Tensor | None = None, suffix: str = "") -> Path | None:
    """``picture/<tensorname>_deformed<suffix>.png`` from an episode's deformed images, if it has any;
    ``relation`` (:func:`models.episode.gallery_relation`) marks each gallery image's class (none: of
    no class of the episode, as at val and test)."""
    if result is None or result.deformed is None:
        return None
    path = PICTURE_DIR / f"{args.tensorname}_deformed{suffix}.png"
    save_deformation_figure(path, result.probes, result.gallery_images, result.weights, result.deformed, relation)
    return path


def report(stats: dict, args, split: str) -> dict:
    """Print the accuracy lines and return the numbers for the JSON summary (percent)."""
    ways = args.ways
    deformed, plain = stats["acc"], stats["plain"]
    diff = [a - b for a, b in zip(deformed, plain)]
    mean, ci = mean_ci95([100 * a for a in deformed])
    pmean, pci = mean_ci95([100 * a for a in plain])
    dmean, dci = mean_ci95([100 * d for d in diff])
    print(format_accuracy(ways, args.shots, split, deformed, args.seed))
    print(format_accuracy(ways, args.shots, split, plain, args.seed).replace(" accuracy:", " accuracy without deformation:"))
    print(f"difference (with - without deformation): {dmean:+.2f} +- {dci:.2f} % (paired, same episodes)")
    return {"split": split, "ways": ways, "shots": args.shots, "episodes": len(deformed), "seed": args.seed,
            "accuracy": mean, "ci95": ci, "plain_accuracy": pmean, "plain_ci95": pci, "difference": dmean,
            "difference_ci95": dci, "loss": sum(stats["loss"]) / len(stats["loss"]), "deform": args.deform,
            "gallerySelect": args.gallerySelect, "checkpoint": args.GNet if args.evaluate else args.tensorname}


def load_splits(args: argparse.Namespace, need_train: bool):
    names = (["train"] if need_train else []) + ["val", "test"]
    out, dropped = {}, 0
    for name in names:
        out[name], bad = scan_split(read_split(args.dataroot, name), args.skipBadImages, args.nthreads)
        dropped += bad
    out.setdefault("train", read_split(args.dataroot, "train"))
    if dropped:
        print(f"left out {dropped} unreadable image(s) (--skipBadImages)")
    for name, ways in (("train", args.trainways), ("val", args.ways), ("test", args.ways)):
        split = out[name]
        if ways > split.num_classes:
            raise OptionError(f"--{'trainways' if name == 'train' else 'ways'} {ways} is larger than the "
                              f"{split.num_classes} classes of split {name}")
        need = args.shots + args.test_num if not args.overlap else max(args.shots, args.test_num)
        if split.min_class_size() < need:
            raise OptionError(f"--shots {args.shots} + --test_num {args.test_num}: split {name} has a class with "
                              f"only {split.min_class_size()} images")
    if args.galleryNum > out["train"].min_class_size():
        raise OptionError(f"--galleryNum {args.galleryNum} is larger than the smallest base class "
                          f"({out['train'].min_class_size()} images)")
    shortlisted = out["train"].num_classes - (args.trainways if args.galleryExclude == "episode" else 0)
    if args.gallerySelect == "nearest" and args.chooseNum > args.galleryNum * shortlisted:
        raise OptionError(f"--chooseNum {args.chooseNum} is larger than the gallery a shortlist draws from "
                          f"({args.galleryNum} x {shortlisted} classes)")
    return out


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    resolve_defaults(args, device)
    if args.evaluate:
        return run_evaluation(args, device)
    return run_training(args, device)


def prepare(args, device, need_train: bool):
    splits = load_splits(args, need_train)
    configure_backend(device, args.deterministic, args.seed)
    model = build_model(args, device)
    if model.fc.out_features != splits["train"].num_classes:
        raise OptionError(f"the checkpoint's fc has {model.fc.out_features} classes, split train has "
                          f"{splits['train'].num_classes}")
    gallery = None
    if args.deform != "none":
        gallery = Gallery(splits["train"], args.galleryNum, args.imageSize, args.nthreads, progress=bool(args.progress))
    return splits, model, gallery


def run_evaluation(args: argparse.Namespace, device: torch.device) -> int:
    splits, model, gallery = prepare(args, device, need_train=False)
    bank = GalleryBank(gallery, model, device, args.batchSize, bool(args.amp)) if gallery else None
    dataset = episodes(splits["test"], args, args.ways, args.testEpisodes, TEST_STREAM, len(bank or []))
    stats = evaluate(model, dataset, bank, args, device, "test", make_embed(model, device), keep_first=True)
    summary = report(stats, args, "test")
    run_dir = Path("runs") / args.tensorname
    write_json(run_dir / f"evaluate_{args.shots}shot_seed{args.seed}.json", summary)
    figure = write_figure(stats["first"], args)
    if figure:
        print(f"figure: {figure}")
    return 0


def run_training(args: argparse.Namespace, device: torch.device) -> int:
    run_dir, resume = open_run(args, RESUME_KEYS)
    if resume is not None and resume.get("format") != RESUME_FORMAT:
        raise OptionError(f"--resume: {run_dir / 'resume.pt'} was written by an earlier version (the scale's rate "
                          "decayed, gallery features were embedded from flipped images) and cannot be continued "
                          "exactly; start anew with --overwrite")
    splits, model, gallery = prepare(args, device, need_train=True)
    meta_params, cls_params = param_groups(model, args)
    optimizers, schedulers = make_optimizers(model, args)
    start_epoch, progress, record = 0, new_progress(), {"best": None, "rows": 0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        for key, obj in {**optimizers, **schedulers}.items():
            obj.load_state_dict(resume[key])
        start_epoch, progress, record = resume["epoch"], resume["progress"], resume["record"]
        print(f"resuming {args.tensorname} at epoch {start_epoch}, episode {progress['step']}")
    features = resume["gallery_features"] if resume is not None and gallery is not None else None
    bank = GalleryBank(gallery, model, device, args.batchSize, bool(args.amp), features) if gallery else None
    embed = make_embed(model, device)
    train_set = episodes(splits["train"], args, args.trainways, args.epoch, TRAIN_STREAM, len(bank or []))
    select_split = args.selectOn
    select_set = episodes(splits[select_split], args, args.ways, args.valEpisodes,
                          VAL_STREAM if select_split == "val" else TEST_STREAM, len(bank or []))
    saved_args = dict(vars(args))
    clear_run_dir(run_dir, args.resume)
    write_json(run_dir / "args.json", saved_args)
    log = MetricsLog(run_dir, METRICS, keep_rows=record["rows"])
    main_path, last_path = MODELS_DIR / f"{args.tensorname}.t7", MODELS_DIR / f"{args.tensorname}_last.t7"

    def save_resume(epoch: int) -> None:
        atomic_save({"format": RESUME_FORMAT, "model": model.state_dict(),
                     **{key: obj.state_dict() for key, obj in {**optimizers, **schedulers}.items()},
                     "epoch": epoch, "progress": progress, "record": record, "args": saved_args,
                     "gallery_features": None if bank is None else bank.features.cpu()}, run_dir / "resume.pt")

    def select(epoch: int) -> dict:
        """Evaluate the selection episodes and keep the weights if they are the best so far."""
        select_set.set_epoch(epoch if select_split == "test" else 0)
        stats = evaluate(model, select_set, bank, args, device, f"{select_split} {epoch}", embed)
        acc, acc_ci = mean_ci95([100 * a for a in stats["acc"]])
        deformation = deformation_columns(stats["deformation"])
        numbers = {"select_split": select_split, "select_acc": acc, "select_acc_ci": acc_ci,
                   "select_plain_acc": mean_ci95([100 * a for a in stats["plain"]])[0],
                   "select_loss": sum(stats["loss"]) / len(stats["loss"]),
                   **{f"select_{key}": deformation[key]
                      for key in ("weight_mean", "weight_std", "own_distance", "other_distance")}}
        score = acc if select_split == "val" else -numbers["select_loss"]
        if record["best"] is None or score > record["best"]:
            record["best"] = score
            atomic_save(model.state_dict(), main_path)
        return numbers

    config = episode_config(args, args.trainways, train=True)
    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, args.numEpochs):
            if select_split == "test" and progress["select"] is None:
                # The original's timing: fresh test episodes before the epoch trains, so its candidates
                # are the initial weights and those after epochs 0..N-2.
                progress["select"] = select(epoch)
            train_set.set_epoch(epoch, start=progress["step"])
            bar = tqdm(episode_loader(train_set, args.nthreads, device), desc=f"epoch {epoch}",
                       disable=not args.progress, leave=False)
            tick, result, relation = time.perf_counter(), None, None
            for episode in bar:
                result = train_step(model, episode, bank, config, device, epoch, (meta_params, cls_params),
                                    optimizers, embed)
                if result is None:
                    classes = [splits["train"].classes[c] for c in episode["classes"].tolist()]
                    raise TrainingDiverged(
                        f"non-finite loss at epoch {epoch}, episode {int(episode['index'])} (classes "
                        f"{' '.join(classes)}); nothing was saved over the last good checkpoint "
                        f"({main_path if main_path.exists() else 'none yet'}; resumable state {run_dir / 'resume.pt'})")
                relation = None if result.gallery_index is None else \
                    gallery_relation(result, bank.gallery.labels, episode["classes"])
                accumulate(progress, result, relation, time.perf_counter() - tick)
                tick = time.perf_counter()
                bar.set_postfix(loss=f"{progress['proto_loss'] / progress['step']:.3f}",
                                acc=f"{100 * progress['acc'] / progress['step']:.1f}")
                if interrupt.requested:
                    save_resume(epoch)
                    print(f"stopped at epoch {epoch}, episode {progress['step']}; continue with --resume")
                    return INTERRUPTED_EXIT
            row = epoch_row(epoch, progress, optimizers, model)
            write_figure(result, args, relation, suffix="_train")
            step_schedulers(*schedulers.values())
            row.update(progress["select"] if select_split == "test" else select(epoch))
            atomic_save(model.state_dict(), last_path)
            log.log(row)
            record["rows"] = log.rows
            progress = new_progress()
            save_resume(epoch + 1)
            print(format_row(row), flush=True)
            if interrupt.requested:
                print(f"stopped after epoch {epoch}; continue with --resume")
                return INTERRUPTED_EXIT
    log.close()
    print(f"saved {main_path} (selected by {'val accuracy' if select_split == 'val' else 'test loss'}) and {last_path}")
    test_set = episodes(splits["test"], args, args.ways, args.testEpisodes, TEST_STREAM, len(bank or []))
    model.load_state_dict(safe_load(main_path))
    stats = evaluate(model, test_set, bank, args, device, "test", embed, keep_first=True)
    write_json(run_dir / f"evaluate_{args.shots}shot_seed{args.seed}.json", report(stats, args, "test"))
    figure = write_figure(stats["first"], args)
    if figure:
        print(f"figure: {figure}")
    return 0


def train_step(model: IDeMeNet, episode: dict[str, torch.Tensor], bank: GalleryBank | None, config: EpisodeConfig,
               device: torch.device, epoch: int, groups: tuple[list, list], optimizers: dict, embed=None):
    """One training episode: forward, gradients of both losses from that one pass, optimiser steps.

    Args:
        groups: (parameters of the prototype loss, parameters of the classification loss),
            as :func:`param_groups` returns them; the classification loss trains from epoch 1 on.
        optimizers: :func:`make_optimizers`' ``meta_opt`` (deformation network), ``scale_opt`` and
            ``cls_opt`` (embedding and fc).

    Returns:
        The :class:`models.episode.EpisodeResult`, or None when a loss is not finite (then
        nothing was stepped).
    """
    meta_params, cls_params = groups
    train_cls = bool(cls_params) and epoch > 0
    result = run_episode(model, episode, bank, config, device, train_cls=train_cls, track_grad=bool(meta_params),
                         embed=embed)
    losses = [result.proto_loss] + ([result.cls_loss] if result.cls_loss is not None else [])
    if not all(torch.isfinite(loss) for loss in losses):
        return None
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    episode_gradients(result, meta_params, cls_params if train_cls else [])
    if meta_params:
        optimizers["meta_opt"].step()
        optimizers["scale_opt"].step()
    if train_cls:
        optimizers["cls_opt"].step()
    return result


def step_schedulers(*schedulers) -> None:
    """Advance every schedule once per epoch, also those of frozen (never stepped) optimisers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for scheduler in schedulers:
            scheduler.step()


def new_deformation_sums() -> dict[str, float]:
    """Running sums behind the deformation columns of metrics.csv (:func:`deformation_columns`)."""
    return {"weight_sum": 0.0, "weight_sq": 0.0, "weight_n": 0, "own_distance": 0.0, "other_distance": 0.0,
            "distance_n": 0, "same_class": 0, "episode_class": 0, "relation_n": 0}


def add_deformation(sums: dict[str, float], result, relation: torch.Tensor | None = None) -> None:
    """Add one episode's predicted weights, deformed-feature distances and, for a training episode,
    the class relation of its gallery images (:func:`models.episode.gallery_relation`)."""
    if result.weights is not None:
        sums["weight_sum"] += result.weights.sum().item()
        sums["weight_sq"] += result.weights.pow(2).sum().item()
        sums["weight_n"] += result.weights.numel()
    if result.own_distance is not None:
        sums["own_distance"] += result.own_distance
        sums["other_distance"] += result.other_distance
        sums["distance_n"] += 1
    if relation is not None:
        sums["same_class"] += (relation == SAME_CLASS).sum().item()
        sums["episode_class"] += (relation == EPISODE_CLASS).sum().item()
        sums["relation_n"] += relation.numel()


def deformation_columns(sums: dict[str, float]) -> dict[str, float | str]:
    """Mean and spread of the predicted weights (0 without any); mean squared distance of the deformed
    images' features to their own class's plain prototype and to the nearest other one; share of
    deformed images whose gallery image is of the probe's class / of another class of the episode.
    Empty where nothing was measured."""
    n = max(sums["weight_n"], 1)
    mean = sums["weight_sum"] / n
    distances, relations = sums["distance_n"], sums["relation_n"]
    return {"weight_mean": mean, "weight_std": math.sqrt(max(sums["weight_sq"] / n - mean * mean, 0.0)),
            "own_distance": sums["own_distance"] / distances if distances else "",
            "other_distance": sums["other_distance"] / distances if distances else "",
            "gallery_same_class": sums["same_class"] / relations if relations else "",
            "gallery_episode_class": sums["episode_class"] / relations if relations else ""}


def new_progress() -> dict[str, float]:
    return {"step": 0, "proto_loss": 0.0, "cls_loss": 0.0, "cls_steps": 0, "acc": 0.0, "plain_acc": 0.0,
            "time": 0.0, "select": None, **new_deformation_sums()}


def accumulate(progress: dict[str, float], result, relation: torch.Tensor | None, seconds: float) -> None:
    """Add one training episode's losses, accuracies and deformation statistics to the epoch sums."""
    progress["step"] += 1
    progress["proto_loss"] += result.proto_loss.item()
    if result.cls_loss is not None:
        progress["cls_loss"] += result.cls_loss.item()
        progress["cls_steps"] += 1
    progress["acc"] += result.accuracy
    progress["plain_acc"] += result.plain_accuracy
    add_deformation(progress, result, relation)
    progress["time"] += seconds


def epoch_row(epoch: int, progress: dict[str, float], optimizers: dict, model: IDeMeNet) -> dict:
    steps = max(progress["step"], 1)
    deformation = deformation_columns(progress)
    cls_loss = progress["cls_loss"] / progress["cls_steps"] if progress["cls_steps"] else ""  # empty: not trained
    return {"epoch": epoch, "proto_loss": progress["proto_loss"] / steps, "cls_loss": cls_loss,
            "train_acc": 100 * progress["acc"] / steps, "train_plain_acc": 100 * progress["plain_acc"] / steps,
            "weight_mean": deformation["weight_mean"], "weight_std": deformation["weight_std"],
            "lr": optimizers["meta_opt"].param_groups[0]["lr"], "cls_lr": optimizers["cls_opt"].param_groups[1]["lr"],
            "scale_lr": optimizers["scale_opt"].param_groups[0]["lr"],
            "scale": model.scale.item(), "episodes_per_s": progress["step"] / max(progress["time"], 1e-9),
            **{f"train_{key}": deformation[key]
               for key in ("gallery_same_class", "gallery_episode_class", "own_distance", "other_distance")}}


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
