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
import sys
from contextlib import ExitStack

import torch

from datasets.loaders import episode_loader
from engine.episode import GalleryBank
from engine.features import FeatureCache
from engine.options import Stage2Config, stage2_config, stage2_parser
from engine.run import Run, run_lock
from engine.stage2 import (
    METRICS,
    RESUME_FORMAT,
    RESUME_KEYS,
    TEST_STREAM,
    TRAIN_STREAM,
    VAL_STREAM,
    episode_config,
    episodes,
    epoch_row,
    evaluate,
    gallery_pass_line,
    initialize_scale,
    make_embed,
    make_optimizers,
    new_progress,
    param_groups,
    prepare,
    report,
    selection_columns,
    step_schedulers,
    train_one_epoch,
    write_figure,
)
from utils.checkpoint import MODELS_DIR, atomic_save, safe_load
from utils.errors import OptionError
from utils.files import RUNS_DIR, write_json
from utils.forward import grad_scaler
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt, Interrupted
from utils.options import resolve_device, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    """The stage-2 flags (``engine/options.py``, where the benchmarks read them too)."""
    return stage2_parser()


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    config = stage2_config(device, **vars(args))
    if config.evaluate:
        return evaluate_checkpoint(config, device)
    main_path, last_path = MODELS_DIR / f"{config.tensorname}.t7", MODELS_DIR / f"{config.tensorname}_last.t7"
    run = Run(config, RESUME_KEYS, METRICS, main_path)
    saved = run.resumed
    if saved is not None and saved.get("format") != RESUME_FORMAT:
        raise OptionError(f"--resume: {run.state_path} was written by an earlier version (the scale's rate "
                          "decayed, gallery features were embedded from flipped images) and cannot be continued "
                          "exactly; start anew with --overwrite")
    with run:
        stop = lambda: run.interrupted  # noqa: E731
        try:
            splits, model, gallery = prepare(config, device, need_train=True, stop=stop)
            groups = param_groups(model, config)
            optimizers, schedulers = make_optimizers(model, config)
            scaler = grad_scaler(device, bool(config.amp))
            stateful = {**optimizers, **schedulers, "scaler": scaler}
            start_epoch, progress, record = run.restore(model, stateful, new_progress(), {"best": None, "rows": 0},
                                                        "episode")
            # A resumed run keeps the features and the statistics (in saved["model"]) of its gallery pass.
            features = saved["gallery_features"] if saved is not None else None
            bank = GalleryBank(gallery, model, device, config.batchSize, bool(config.amp), features, stop,
                               config.galleryBN) if gallery else None
        except Interrupted as stopped:
            return run.stop(str(stopped))
        if bank is not None:
            print(gallery_pass_line(bank), flush=True)
        embed = make_embed(model, device, bool(config.dataParallel))
        gallery_size = len(bank or [])
        # With the embedding frozen for the run, each image is embedded once per run, not once per pass,
        # and a training episode decodes only the images the cache does not hold yet, and its support.
        caches = {name: FeatureCache(embed, len(split), device, config.batchSize, bool(config.amp))
                  for name, split in splits.items()} if not groups[1] else {}
        train_set = episodes(splits["train"], config, config.trainways, config.epoch, TRAIN_STREAM, gallery_size,
                             cache=caches.get("train"))
        train_config = episode_config(config, config.trainways, train=True)
        select_split = config.selectOn
        select_set = episodes(splits[select_split], config, config.ways, config.valEpisodes,
                              VAL_STREAM if select_split == "val" else TEST_STREAM, gallery_size, evaluation=True)
        if saved is None:
            def first_episode() -> dict:
                train_set.set_epoch(0)
                return train_set[0]
            scale_line = initialize_scale(model, config.scaleInit, first_episode, config.trainways, device, embed,
                                          train_config, caches.get("train"))
            if scale_line:
                print(scale_line, flush=True)
        run.start(record["rows"])

        def save_state(epoch: int) -> None:
            run.save_state(epoch, progress, record, model.state_dict(), stateful, format=RESUME_FORMAT,
                           gallery_features=None if bank is None else bank.features.cpu())

        def select(epoch: int) -> dict:
            """Evaluate the selection episodes; keep the weights when they are the best so far."""
            select_set.set_epoch(epoch if select_split == "test" else 0)
            stats = evaluate(model, select_set, bank, config, device, f"{select_split} {epoch}", embed, stop=stop,
                             cache=caches.get(select_split))
            columns = selection_columns(stats, select_split)
            score = columns["select_acc"] if select_split == "val" else -columns["select_loss"]
            run.keep_best(record, "best", score, model.state_dict, main_path)
            return columns

        epoch = start_epoch
        try:
            for epoch in range(start_epoch, config.numEpochs):
                if select_split == "test" and progress["select"] is None:
                    # The original's timing: fresh test episodes before the epoch trains, so its
                    # candidates are the initial weights and those after epochs 0..N-2.
                    progress["select"] = select(epoch)
                train_set.set_epoch(epoch, start=progress["step"])
                last, relation = train_one_epoch(model, episode_loader(train_set, config.nthreads, device), bank,
                                                 train_config, device, epoch, groups, optimizers, embed, progress,
                                                 stop, show=bool(config.progress), cache=caches.get("train"),
                                                 scaler=scaler)
                row = {**epoch_row(epoch, progress, optimizers, model), "gallery_bn": config.galleryBN}
                write_figure(last, config, relation, suffix="_train")
                row.update(progress["select"] if select_split == "test" else select(epoch))
                step_schedulers(*schedulers.values())
                atomic_save(model.state_dict(), last_path)
                record["rows"] = run.log(row)
                progress = new_progress()
                save_state(epoch + 1)
                run.announce(row)
                if run.interrupted:
                    return run.stop(f"after epoch {epoch}")
            epoch = config.numEpochs  # every epoch is done: an interruption from here on redoes the test only
            print(f"saved {main_path} (selected by {'val accuracy' if select_split == 'val' else 'test loss'}) "
                  f"and {last_path}")
            if config.testWeights == "kept":
                model.load_state_dict(safe_load(main_path))
            test_set = episodes(splits["test"], config, config.ways, config.testEpisodes, TEST_STREAM, gallery_size,
                                evaluation=True)
            stats = evaluate(model, test_set, bank, config, device, "test", embed, keep_first=True, stop=stop,
                             cache=caches.get("test"))
        except Interrupted as stopped:
            save_state(epoch)  # the epoch's finished episodes are kept; an interrupted evaluation is redone
            return run.stop(str(stopped))
    suffix = "_last" if config.testWeights == "last" else ""
    write_json(run.dir / f"evaluate_{config.shots}shot_seed{config.seed}{suffix}.json", report(stats, config, "test"))
    figure = write_figure(stats["first"], config)
    if figure:
        print(f"figure: {figure}")
    return 0


def evaluate_checkpoint(config: Stage2Config, device: torch.device) -> int:
    """``--evaluate``: the test episodes of ``--seed`` with and without deformation. Once the inputs are
    read, the run's lock (``runs/<tensorname>/``, as training takes it) is held until the report is written."""
    with GracefulInterrupt() as interrupt, ExitStack() as held:
        stop = lambda: interrupt.requested  # noqa: E731
        try:
            splits, model, gallery = prepare(config, device, need_train=False, stop=stop)
            held.enter_context(run_lock(RUNS_DIR / config.tensorname))
            bank = GalleryBank(gallery, model, device, config.batchSize, bool(config.amp), stop=stop,
                               batch_norm=config.galleryBN) if gallery else None
            if bank is not None:
                print(gallery_pass_line(bank), flush=True)
            dataset = episodes(splits["test"], config, config.ways, config.testEpisodes, TEST_STREAM, len(bank or []),
                               evaluation=True)
            embed = make_embed(model, device, bool(config.dataParallel))
            stats = evaluate(model, dataset, bank, config, device, "test", embed, keep_first=True,
                             stop=stop)
        except Interrupted as stopped:
            print(f"stopped {stopped}; nothing was written: run the same command again", flush=True)
            return INTERRUPTED_EXIT
        write_json(RUNS_DIR / config.tensorname / f"evaluate_{config.shots}shot_seed{config.seed}.json",
                   report(stats, config, "test"))
        figure = write_figure(stats["first"], config)
    if figure:
        print(f"figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
