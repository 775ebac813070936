"""Benchmark of stage-2 episodes (SPEC 3): the real training and test loops against their compute floor.

    python benchmarks/episode.py --imageSize 84 --shots 1
    python benchmarks/episode.py --imageSize 224 --shots 1 --episodes 3 --toyDir /tmp/toy256
    python benchmarks/episode.py --device cuda --amp --episodes 50

Phases, in this order, in one process:
  1. data: the toy dataset (unless --dataroot), the scripts' split scan (load_splits);
  2. gallery: ``Gallery`` (decode) then ``GalleryBank`` (features), each timed;
  3. train loop: the body of ``onlyBasetwoLoss.run_training`` (episode_loader with --nthreads
     workers, run_episode, the finiteness check, episode_gradients, the optimiser steps,
     accumulate), with timers around the library calls;
  4. train floor: the same network calls on tensors already on the device (no data loading, no
     gallery selection, no batch assembly);
  5. test loop (the body of ``onlyBasetwoLoss.evaluate``) and 6. test floor, likewise.
Medians over the timed episodes (after --warmup). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import torch
import torch.nn.functional as F

import benchmarks.common as common_module
import models.episode as episode_module
import onlyBasetwoLoss as stage2
from benchmarks.common import (
    MemoryProbe,
    SectionClock,
    children_cpu_s,
    emit_json,
    environment,
    maxrss_mb,
    mean,
    median,
    print_table,
    section_medians,
    self_usage,
    synchronize,
    toy_dataset,
    toy_size,
    usage_delta,
)
from datasets import Gallery
from models import IDeMeNet, blend_patches
from models.episode import GalleryBank, episode_gradients, run_episode, select_gallery
from models.protonet import proto_logits, prototypes
from utils.errors import InputError
from utils.evaluation import (
    autocast,
    compute_layout,
    deform_in_chunks,
    embed_in_chunks,
    episode_loader,
    prepare_images,
)
from utils.options import configure_backend, resolve_device

# Sections of the breakdown; the loop and the floor share the network rows.
ROWS = [
    ("data_wait", "data wait (loader)"),
    ("prepare", "prepare (normalise, H2D)"),
    ("embed_plain", "embed support+query, no grad"),
    ("embed_support_grad", "embed support, grad (fixCls 0)"),
    ("select", "gallery selection"),
    ("gallery_batch", "gallery batch assembly"),
    ("deform", "deformation forward"),
    ("embed_deformed", "embed deformed forward"),
    ("rest", "rest of forward / losses"),
    ("backward", "backward"),
    ("optimizer", "optimiser (zero_grad, step)"),
    ("loop_other", "loop other (checks, stats)"),
    ("unaccounted", "unaccounted"),
    ("total", "TOTAL per episode"),
]
INNER = ("prepare", "embed_plain", "embed_support_grad", "select", "gallery_batch", "deform", "embed_deformed")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage-2 episode benchmark: real loop vs compute floor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataroot", default=None, help="dataset root; default: a generated toy dataset")
    p.add_argument("--toyDir", default=None, help="generate the toy dataset here and reuse it on later runs "
                   "(default: a temporary directory, regenerated every run)")
    p.add_argument("--toySize", type=int, default=None, help="toy image side (default: ceil(imageSize*256/224))")
    p.add_argument("--imageSize", type=int, default=224)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--ways", type=int, default=5, help="classes per training and test episode")
    p.add_argument("--queries", type=int, default=15, help="query images per class (the scripts' --test_num)")
    p.add_argument("--augnum", type=int, default=None, help="7 for 1-shot, 5 otherwise")
    p.add_argument("--chooseNum", type=int, default=None, help="15 for 1-shot, 30 otherwise")
    p.add_argument("--galleryNum", type=int, default=30)
    p.add_argument("--fixCls", type=int, default=1, choices=(0, 1),
                   help="1: frozen embedding (round 1); 0: the classification loss trains it (as from epoch 1)")
    p.add_argument("--deformNet", default="small", choices=("small", "twobranch"))
    p.add_argument("--batchSize", type=int, default=None,
                   help="images per forward chunk (default: the script's, 128 on CUDA and 16 on the CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--episodes", type=int, default=5, help="timed training episodes")
    p.add_argument("--testEpisodes", type=int, default=None, help="timed test episodes (default: --episodes)")
    p.add_argument("--warmup", type=int, default=2, help="untimed episodes before each timed block")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the (loop, floor) blocks this many times, alternating; medians over all")
    p.add_argument("--nthreads", type=int, default=4, help="DataLoader workers and gallery decode threads")
    p.add_argument("--torchThreads", type=int, default=None,
                   help="torch.set_num_threads in this process (default: torch's choice, one per core)")
    p.add_argument("--pssInterval", type=float, default=2.0,
                   help="seconds between PSS samples of the process and its workers (0: none; each costs ~10 ms/GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skipTest", action="store_true", help="skip the test-episode phases")
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    return p


def script_args(a: argparse.Namespace, root: Path) -> tuple[argparse.Namespace, torch.device]:
    """The namespace and device onlyBasetwoLoss would resolve for the same run (round 1 of the recipes)."""
    argv = ["--dataroot", str(root), "--tensorname", "benchmark", "--network", "random-init",
            "--imageSize", str(a.imageSize), "--shots", str(a.shots), "--ways", str(a.ways),
            "--trainways", str(a.ways), "--test_num", str(a.queries), "--galleryNum", str(a.galleryNum),
            "--fixCls", str(a.fixCls), "--deformNet", a.deformNet,
            "--nthreads", str(a.nthreads), "--seed", str(a.seed), "--amp", str(int(a.amp)), "--progress", "0"]
    for flag, value in (("--augnum", a.augnum), ("--chooseNum", a.chooseNum), ("--device", a.device),
                        ("--batchSize", a.batchSize)):
        if value is not None:
            argv += [flag, str(value)]
    args = stage2.get_args_parser().parse_args(argv)
    device = resolve_device(args)
    stage2.resolve_defaults(args, device)
    return args, device


class Instrument:
    """Timers around the library calls that run_episode makes, installed for the timed loops only.

    Wraps ``models.episode.select_gallery`` and ``prepare_images`` (module globals that
    run_episode looks up at call time), ``model.deform`` and ``bank.gallery.batch`` (instance
    attributes shadowing the methods), and the ``embed`` callable passed to run_episode. Embedding
    calls after the gallery batch count as the embedding of the deformed images.
    """

    def __init__(self, model, bank, embed, clock: SectionClock) -> None:
        self.model, self.bank, self.embed, self.clock = model, bank, embed, clock
        self.after_gallery = False

    def reset(self) -> None:
        self.after_gallery = False

    def _wrap(self, name, fn, after_gallery: bool = False):
        def timed(*args, **kwargs):
            with self.clock.section(name):
                out = fn(*args, **kwargs)
            if after_gallery:
                self.after_gallery = True
            return out
        return timed

    def timed_embed(self, images):
        if self.after_gallery:
            name = "embed_deformed"
        else:
            name = "embed_plain" if not torch.is_grad_enabled() else "embed_support_grad"
        with self.clock.section(name):
            return self.embed(images)

    def __enter__(self):
        self.saved = (episode_module.select_gallery, episode_module.prepare_images)
        episode_module.select_gallery = self._wrap("select", select_gallery)
        episode_module.prepare_images = self._wrap("prepare", prepare_images)
        self.model.deform = self._wrap("deform", type(self.model).deform.__get__(self.model), after_gallery=True)
        if self.bank is not None:
            self.bank.gallery.batch = self._wrap("gallery_batch", type(self.bank.gallery).batch.__get__(self.bank.gallery),
                                                 after_gallery=True)
        return self

    def __exit__(self, *exc) -> None:
        episode_module.select_gallery, episode_module.prepare_images = self.saved
        del self.model.deform
        if self.bank is not None:
            del self.bank.gallery.batch


def loop_row(row: dict[str, float], total: float) -> dict[str, float]:
    """Add the residual of run_episode and the unaccounted time to one episode's sections."""
    row = dict(row)
    row["rest"] = row.pop("run_episode", 0.0) - sum(row.get(k, 0.0) for k in INNER)
    row["total"] = total
    row["unaccounted"] = total - sum(row.get(k, 0.0) for k in
                                     ("data_wait", "rest", "backward", "optimizer", "loop_other") + INNER)
    return row


def run_loop(model, bank, embed, loader, steps: int, warmup: int, device, train: bool, config, meta_params,
             cls_params, meta_opt, cls_opt, train_cls: bool, probe: MemoryProbe | None = None
             ) -> tuple[list[dict[str, float]], list[float]]:
    """The scripts' loop body with timers. Returns the timed episodes' sections and accuracies."""
    clock = SectionClock(device)
    rows, accuracies, progress = [], [], stage2.new_progress()
    with Instrument(model, bank, embed, clock) as inst, torch.set_grad_enabled(train):
        iterator = iter(loader)
        for step in range(warmup + steps):
            inst.reset()
            usage = self_usage()
            tick = time.perf_counter()
            episode = next(iterator)
            clock.add("data_wait", time.perf_counter() - tick)
            with clock.section("run_episode"):
                if train:
                    result = run_episode(model, episode, bank, config, device, train_cls=train_cls,
                                         track_grad=bool(meta_params), embed=inst.timed_embed)
                else:
                    result = run_episode(model, episode, bank, config, device, embed=inst.timed_embed)
            if train:
                with clock.section("loop_other"):
                    losses = [result.proto_loss] + ([result.cls_loss] if result.cls_loss is not None else [])
                    if not all(torch.isfinite(loss) for loss in losses):
                        raise RuntimeError("non-finite loss in the benchmark")
                with clock.section("optimizer"):
                    meta_opt.zero_grad(set_to_none=True)
                    cls_opt.zero_grad(set_to_none=True)
                with clock.section("backward"):
                    episode_gradients(result, meta_params, cls_params if train_cls else [])
                with clock.section("optimizer"):
                    if meta_params:
                        meta_opt.step()
                    if train_cls:
                        cls_opt.step()
                with clock.section("loop_other"):
                    stage2.accumulate(progress, result, 0.0)
            else:
                with clock.section("loop_other"):
                    result.proto_loss.item()
            accuracies.append(result.accuracy)
            synchronize(device)
            total = time.perf_counter() - tick
            row = loop_row(clock.collect(), total)
            row.update(usage_delta(usage))
            if step >= warmup:
                rows.append(row)
        if probe is not None:
            probe.sample_now()
        del iterator
    return rows, accuracies


def floor_inputs(model, bank, episode: dict, config, device) -> dict:
    """An episode's tensors on the device, as the network calls see them (selection done once here)."""
    with torch.no_grad():
        support = prepare_images(episode["support"], device)
        query = prepare_images(episode["query"], device)
        labels = episode["support_labels"].to(device)
        out = {"support": support, "query": query, "labels": labels,
               "query_labels": episode["query_labels"].to(device), "base": episode["classes"].to(device)}
        if config.deform != "none":
            with autocast(device, config.amp):
                feats = embed_in_chunks(model.embed, support, config.chunk)
            owner = labels.repeat_interleave(config.augnum)
            index = select_gallery(prototypes(feats, labels, config.ways), bank, model.scale, config, owner, episode)
            probes = support.repeat_interleave(config.augnum, dim=0)
            flip = episode["probe_flip"].to(device).view(-1, 1, 1, 1)
            out.update(owner=owner, probes=torch.where(flip, probes.flip(-1), probes),
                       others=bank.gallery.batch(index, episode["gallery_flip"].to(device)),
                       random_weights=episode["random_weights"].to(device))
    return out


def floor_step(model, embed, x: dict, config, device, clock: SectionClock, train: bool, meta_params, cls_params,
               meta_opt, cls_opt, train_cls: bool) -> None:
    """The network calls of one episode and nothing else."""
    with clock.section("embed_plain"), torch.no_grad(), autocast(device, config.amp):
        support = embed_in_chunks(embed, x["support"], config.chunk)
        query = embed_in_chunks(embed, x["query"], config.chunk)
    with torch.set_grad_enabled(train):
        if train_cls:
            with clock.section("embed_support_grad"), autocast(device, config.amp):
                support = embed_in_chunks(embed, x["support"], config.chunk)
        features, labels = [support], [x["labels"]]
        if config.deform != "none":
            with clock.section("deform"), autocast(device, config.amp):
                if config.deform == "learned":
                    deformed, _ = deform_in_chunks(model.deform, x["probes"], x["others"], config.chunk)
                else:
                    deformed = blend_patches(x["probes"], x["others"], x["random_weights"])
            with clock.section("embed_deformed"), autocast(device, config.amp):
                features.append(embed_in_chunks(embed, compute_layout(deformed, device), config.chunk))
            labels.append(x["owner"])
        with clock.section("rest"):
            features, labels = torch.cat(features), torch.cat(labels)
            logits = proto_logits(query, prototypes(features, labels, config.ways), model.scale)
            loss = F.cross_entropy(logits, x["query_labels"])
            cls_loss = F.cross_entropy(model.classify(features).float(), x["base"][labels]) if train_cls else None
    if train:
        with clock.section("optimizer"):
            meta_opt.zero_grad(set_to_none=True)
            cls_opt.zero_grad(set_to_none=True)
        with clock.section("backward"):
            if meta_params:
                loss.backward(inputs=meta_params, retain_graph=cls_loss is not None)
            if cls_loss is not None:
                cls_loss.backward(inputs=cls_params)
        with clock.section("optimizer"):
            if meta_params:
                meta_opt.step()
            if train_cls:
                cls_opt.step()


def run_floor(model, embed, x, steps, warmup, device, config, train, meta_params, cls_params, meta_opt, cls_opt,
              train_cls) -> list[dict[str, float]]:
    clock, rows = SectionClock(device), []
    for step in range(warmup + steps):
        usage = self_usage()
        tick = time.perf_counter()
        floor_step(model, embed, x, config, device, clock, train, meta_params, cls_params, meta_opt, cls_opt,
                   train_cls)
        synchronize(device)
        row = clock.collect()
        row["total"] = time.perf_counter() - tick
        row.update(usage_delta(usage))
        if step >= warmup:
            rows.append(row)
    return rows


class PeakOf:
    """The largest figures of several MemoryProbe results."""

    def __init__(self, probes) -> None:
        for name in ("rss_mb", "total_pss_mb", "workers_private_mb", "total_mb", "cuda_mb"):
            setattr(self, name, max(getattr(p, name) for p in probes))


def decode_seconds(dataset, count: int = 2) -> tuple[float, dict]:
    """Seconds to build one episode (decode + crop) in this process, single-threaded; and the last item."""
    times, item = [], None
    for i in range(count):
        tick = time.perf_counter()
        item = dataset[i]
        times.append(time.perf_counter() - tick)
    return median(times), item


def main(argv: list[str] | None = None) -> dict:
    a = get_args_parser().parse_args(argv)
    test_steps = a.episodes if a.testEpisodes is None else a.testEpisodes
    if a.torchThreads:
        torch.set_num_threads(a.torchThreads)
    common_module.PSS_INTERVAL = a.pssInterval
    env_start = environment()
    per_class = max(a.galleryNum, a.shots + a.queries)
    root, toy_s, holder = toy_dataset(a.dataroot, per_class, a.toySize or toy_size(a.imageSize), a.toyDir)
    args, device = script_args(a, root)
    configure_backend(device, False, args.seed)

    tick = time.perf_counter()
    splits = stage2.load_splits(args, need_train=True)
    scan_s = time.perf_counter() - tick
    model = IDeMeNet(num_classes=splits["train"].num_classes, image_size=args.imageSize, fang=args.Fang,
                     deform_net=args.deformNet).to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    with MemoryProbe(device) as mem_gallery:
        tick = time.perf_counter()
        gallery = Gallery(splits["train"], args.galleryNum, args.imageSize, args.nthreads, progress=False)
        decode_s = time.perf_counter() - tick
        tick = time.perf_counter()
        bank = GalleryBank(gallery, model, device, args.batchSize, bool(args.amp))
        synchronize(device)
        features_s = time.perf_counter() - tick

    meta_params, cls_params = stage2.param_groups(model, args)
    optimizers, _ = stage2.make_optimizers(model, args)
    meta_opt, cls_opt = optimizers["meta_opt"], optimizers["cls_opt"]
    train_cls = bool(cls_params)
    embed = stage2.make_embed(model, device)
    depth = 4 * args.nthreads if args.nthreads > 0 else 0
    common = {"meta_params": meta_params, "cls_params": cls_params, "meta_opt": meta_opt, "cls_opt": cls_opt}

    # Training: the dataset holds `depth` more episodes than are consumed, so the workers keep
    # producing (one new episode per consumed one) during the timed episodes, as mid-epoch.
    train_config = stage2.episode_config(args, args.trainways)
    train_set = stage2.episodes(splits["train"], args, args.trainways, a.warmup + a.episodes + depth,
                                stage2.TRAIN_STREAM, len(bank))
    first_epoch = 1 if train_cls else 0
    train_set.set_epoch(first_epoch)
    train_decode_s, train_item = decode_seconds(train_set)
    test_config = stage2.episode_config(args, args.ways)
    test_set = stage2.episodes(splits["test"], args, args.ways, a.warmup + test_steps + depth,
                               stage2.TEST_STREAM, len(bank))
    test_decode_s, test_item = decode_seconds(test_set)

    # --rounds alternates loop and floor blocks so that both see the same drift in machine load.
    train_rows, train_floor, train_acc, test_rows, test_floor = [], [], [], [], []
    mem = {"train": [], "train_floor": [], "test": [], "test_floor": []}
    workers_cpu_s = 0.0
    for r in range(a.rounds):
        train_set.set_epoch(first_epoch + r)
        cpu0 = children_cpu_s()
        with MemoryProbe(device) as probe:
            rows, acc = run_loop(model, bank, embed, episode_loader(train_set, args.nthreads, device), a.episodes,
                                 a.warmup, device, True, train_config, train_cls=train_cls, probe=probe, **common)
        workers_cpu_s += children_cpu_s() - cpu0
        train_rows += rows
        train_acc += acc
        mem["train"].append(probe)
        with MemoryProbe(device) as probe:
            x = floor_inputs(model, bank, train_item, train_config, device)
            train_floor += run_floor(model, embed, x, a.episodes, a.warmup, device, train_config, True,
                                     train_cls=train_cls, **common)
            del x
        mem["train_floor"].append(probe)
        if a.skipTest:
            continue
        test_set.set_epoch(r)
        with MemoryProbe(device) as probe:
            test_rows += run_loop(model, bank, embed, episode_loader(test_set, args.nthreads, device), test_steps,
                                  a.warmup, device, False, test_config, train_cls=False, probe=probe,
                                  **common)[0]
        mem["test"].append(probe)
        with MemoryProbe(device) as probe, torch.no_grad():
            x = floor_inputs(model, bank, test_item, test_config, device)
            test_floor += run_floor(model, embed, x, test_steps, a.warmup, device, test_config, False,
                                    train_cls=False, **common)
            del x
        mem["test_floor"].append(probe)
    mem_train, mem_train_floor = PeakOf(mem["train"]), PeakOf(mem["train_floor"])
    mem_test = PeakOf(mem["test"]) if mem["test"] else None

    names = [key for key, _ in ROWS] + ["cpu_user", "cpu_sys", "minflt"]
    columns = {"train loop": section_medians(train_rows, names), "train floor": section_medians(train_floor, names),
               "test loop": section_medians(test_rows, names), "test floor": section_medians(test_floor, names)}
    floor_keys = {"embed_plain", "embed_support_grad", "deform", "embed_deformed", "rest", "backward", "optimizer",
                  "total"}
    floor_keys |= {"cpu_user", "cpu_sys"}
    table = [(label, [None if (col.endswith("floor") and key not in floor_keys) else columns[col][key]
                      for col in columns]) for key, label in ROWS + [("cpu_user", "main process CPU, user"),
                                                                      ("cpu_sys", "main process CPU, system")]]
    print()
    print_table(f"median ms per episode, {device.type}{' amp' if args.amp else ''}, {args.imageSize} px, "
                f"{args.ways}-way {args.shots}-shot, augnum {args.augnum}, chooseNum {args.chooseNum}, "
                f"queries {args.test_num}, galleryNum {args.galleryNum}, fixCls {args.fixCls}, "
                f"nthreads {args.nthreads}, chunk {args.batchSize}, {a.rounds} x ({a.episodes}+{a.warmup} warmup) episodes",
                list(columns), table)

    train_ms = columns["train loop"]["total"]
    train_floor_ms = columns["train floor"]["total"]
    summary = {
        "benchmark": "episode", "device": str(device), "amp": bool(args.amp), "imageSize": args.imageSize,
        "ways": args.ways, "shots": args.shots, "augnum": args.augnum, "chooseNum": args.chooseNum,
        "queries": args.test_num, "galleryNum": args.galleryNum, "fixCls": args.fixCls, "nthreads": args.nthreads,
        "batchSize": args.batchSize, "episodes": a.episodes, "test_episodes": 0 if a.skipTest else test_steps, "warmup": a.warmup,
        "rounds": a.rounds,
        "train_ratio": train_ms / train_floor_ms,
        "test_ratio": columns["test loop"]["total"] / columns["test floor"]["total"] if not a.skipTest else None,
        "train_ratio_mean": mean(r["total"] for r in train_rows) / mean(r["total"] for r in train_floor),
        "test_ratio_mean": (mean(r["total"] for r in test_rows) / mean(r["total"] for r in test_floor)
                            if not a.skipTest else None),
        "train_episode_ms": 1000 * train_ms, "train_floor_ms": 1000 * train_floor_ms,
        "test_episode_ms": 1000 * columns["test loop"]["total"], "test_floor_ms": 1000 * columns["test floor"]["total"],
        "train_episodes_per_s": 1 / mean(r["total"] for r in train_rows),
        "train_data_wait_ms": 1000 * columns["train loop"]["data_wait"],
        "test_data_wait_ms": 1000 * columns["test loop"]["data_wait"],
        "decode_ms_per_train_episode": 1000 * train_decode_s, "decode_ms_per_test_episode": 1000 * test_decode_s,
        "workers_cpu_s_train_phase": workers_cpu_s,
        "gallery_images": len(bank), "gallery_decode_s": decode_s, "gallery_features_s": features_s,
        "gallery_ready_s": decode_s + features_s, "gallery_ready_over_features": (decode_s + features_s) / features_s,
        "scan_s": scan_s, "toy_generate_s": toy_s,
        "peak_rss_mb": maxrss_mb(), "gallery_peak_rss_mb": mem_gallery.rss_mb,
        "train_peak_rss_mb": mem_train.rss_mb, "train_peak_total_mb": mem_train.total_mb,
        "train_peak_total_pss_mb": mem_train.total_pss_mb, "train_workers_private_mb": mem_train.workers_private_mb,
        "train_floor_peak_rss_mb": mem_train_floor.rss_mb,
        "test_peak_rss_mb": mem_test.rss_mb if mem_test else None,
        "test_peak_total_mb": mem_test.total_mb if mem_test else None,
        "children_maxrss_mb": maxrss_mb(resource.RUSAGE_CHILDREN),
        "train_accuracy": mean(train_acc),
    }
    if device.type == "cuda":
        summary.update(cuda_peak_gallery_mb=mem_gallery.cuda_mb, cuda_peak_train_mb=mem_train.cuda_mb,
                       cuda_peak_train_floor_mb=mem_train_floor.cuda_mb,
                       cuda_peak_test_mb=mem_test.cuda_mb if mem_test else None,
                       gpu=torch.cuda.get_device_name(device))
    summary["breakdown_ms"] = {col: {k: (v if k == "minflt" else 1000 * v) for k, v in vals.items()
                                     if not math.isnan(v) and (v or k == "total")}
                               for col, vals in columns.items()}
    env_end = environment()
    summary.update({k: v for k, v in env_start.items() if k != "load_avg"}, load_avg_start=env_start["load_avg"],
                   load_avg_end=env_end["load_avg"])

    print()
    print(f"train ratio (episode / floor, medians) {summary['train_ratio']:.3f}"
          + (f", test ratio {summary['test_ratio']:.3f}" if summary["test_ratio"] else "")
          + f"; {summary['train_episodes_per_s']:.2f} training episodes/s")
    print("minor page faults per episode (main process, medians): "
          + ", ".join(f"{col} {vals['minflt']:.0f}" for col, vals in columns.items() if not math.isnan(vals["minflt"])))
    print(f"episode decode in this process (1 core): train {1000 * train_decode_s:.0f} ms, "
          f"test {1000 * test_decode_s:.0f} ms; worker CPU during the train phase {workers_cpu_s:.1f} s")
    print(f"gallery: {len(bank)} images, decode {decode_s:.2f} s ({args.nthreads} threads), "
          f"features {features_s:.2f} s, ready {decode_s + features_s:.2f} s "
          f"= {summary['gallery_ready_over_features']:.2f} x the feature pass; split scan {scan_s:.2f} s")
    print(f"memory: peak RSS {summary['peak_rss_mb']:.0f} MB (process lifetime); train phase RSS "
          f"{mem_train.rss_mb:.0f} MB, + workers' private {mem_train.workers_private_mb:.0f} MB = "
          f"{mem_train.total_mb:.0f} MB (sampled PSS total {mem_train.total_pss_mb:.0f} MB)"
          + (f"; CUDA peak train {mem_train.cuda_mb:.0f} MB" if device.type == "cuda" else ""))
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
