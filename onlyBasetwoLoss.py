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
from pathlib import Path

import torch

from datasets.loaders import episode_loader
from engine import stage2
from engine.features import FeatureCache
from engine.options import Stage2Config, stage2_config, stage2_parser
from engine.run import Run, run_lock
from utils.checkpoint import MODELS_DIR, atomic_save, safe_load
from utils.errors import OptionError
from utils.files import RUNS_DIR, write_json
from utils.forward import grad_scaler
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt, Interrupted
from utils.options import resolve_device, run_cli

get_args_parser = stage2_parser  # the flags live in engine/options.py, where the benchmarks read them too


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args)
    config = stage2_config(device, **vars(args))
    if config.evaluate:
        return evaluate_checkpoint(config, device)
    main_path, last_path = MODELS_DIR / f"{config.tensorname}.t7", MODELS_DIR / f"{config.tensorname}_last.t7"
    run = Run(config, stage2.RESUME_KEYS, stage2.METRICS, main_path)
    saved = run.resumed
    if saved is not None and saved.get("format") != stage2.RESUME_FORMAT:
        raise OptionError(f"--resume: {run.state_path} was written by an earlier version (the scale's rate "
                          "decayed, gallery features were embedded from flipped images) and cannot be continued "
                          "exactly; start anew with --overwrite")
    with run:
        stop = lambda: run.interrupted  # noqa: E731
        try:
            splits, model, gallery = stage2.prepare(config, device, need_train=True, stop=stop)
            groups = stage2.param_groups(model, config)
            optimizers, schedulers = stage2.make_optimizers(model, config)
            scaler = grad_scaler(device, bool(config.amp))
            stateful = {**optimizers, **schedulers, "scaler": scaler}
            start_epoch, progress = run.restore(model, stateful, stage2.new_progress(), {"best": None}, "episode")
            # A resumed run keeps the features and the statistics (in saved["model"]) of its gallery pass.
            bank = stage2.gallery_bank(gallery, model, config, device, stop,
                                       saved["gallery_features"] if saved is not None else None)
        except Interrupted as stopped:
            return run.stop(str(stopped))
        embed = stage2.make_embed(model, device, bool(config.dataParallel))
        gallery_size = len(bank or [])
        # With the embedding frozen for the run, each image is embedded once per run, not once per pass,
        # and a training episode decodes only the images the cache does not hold yet, and its support.
        caches = {name: FeatureCache(embed, len(split), device, config.batchSize, bool(config.amp))
                  for name, split in splits.items()} if not groups[1] else {}
        train_config = stage2.episode_config(config, config.trainways, train=True)  # the episodes' and the draws'
        train_set = stage2.episodes(splits["train"], config, train_config, config.epoch, stage2.TRAIN_STREAM,
                                    gallery_size, cache=caches.get("train"))
        select_split = config.selectOn
        select_stream = stage2.VAL_STREAM if select_split == "val" else stage2.TEST_STREAM
        select_set = stage2.episodes(splits[select_split], config, stage2.episode_config(config, config.ways),
                                     config.valEpisodes, select_stream, gallery_size, evaluation=True)
        if saved is None and (scale_line := stage2.initialize_scale(model, config.scaleInit, train_set, device, embed,
                                                                    train_config, caches.get("train"))):
            print(scale_line, flush=True)
        run.start()

        def save_state(epoch: int) -> None:
            run.save_state(epoch, progress, model.state_dict(), format=stage2.RESUME_FORMAT,
                           gallery_features=None if bank is None else bank.features.cpu())

        def select(epoch: int) -> dict:
            """Evaluate the selection episodes; keep the weights when they are the best so far."""
            select_set.set_epoch(epoch if select_split == "test" else 0)
            stats = stage2.evaluate(model, select_set, bank, config, device, f"{select_split} {epoch}", embed,
                                    stop=stop, cache=caches.get(select_split))
            columns = stage2.selection_columns(stats, select_split)
            score = columns["select_acc"] if select_split == "val" else -columns["select_loss"]
            run.keep_best("best", score, model.state_dict, main_path)
            return columns

        epoch = start_epoch
        try:
            for epoch in range(start_epoch, config.numEpochs):
                if select_split == "test" and progress["select"] is None:
                    # The original's timing: fresh test episodes before the epoch trains, so its
                    # candidates are the initial weights and those after epochs 0..N-2.
                    progress["select"] = select(epoch)
                train_set.set_epoch(epoch, start=progress["step"])
                loader = episode_loader(train_set, config.nthreads, device)
                last, relation = stage2.train_one_epoch(model, loader, bank, train_config, device, epoch, groups,
                                                        optimizers, embed, progress, stop, show=bool(config.progress),
                                                        cache=caches.get("train"), scaler=scaler)
                row = {**stage2.epoch_row(epoch, progress, optimizers, model), "gallery_bn": config.galleryBN}
                stage2.write_figure(last, config, relation, suffix="_train")
                row.update(progress["select"] if select_split == "test" else select(epoch))
                stage2.step_schedulers(*schedulers.values())
                atomic_save(model.state_dict(), last_path)
                run.log(row)
                progress = stage2.new_progress()
                save_state(epoch + 1)
                run.announce(row)
                if run.interrupted:
                    return run.stop(f"after epoch {epoch}")
            epoch = config.numEpochs  # every epoch is done: an interruption from here on redoes the test only
            print(f"saved {main_path} (selected by {'val accuracy' if select_split == 'val' else 'test loss'}) "
                  f"and {last_path}")
            if config.testWeights == "kept":
                model.load_state_dict(safe_load(main_path))
            stats = stage2.test(model, splits["test"], bank, config, device, embed, stop, caches.get("test"))
        except Interrupted as stopped:
            save_state(epoch)  # the epoch's finished episodes are kept; an interrupted evaluation is redone
            return run.stop(str(stopped))
    write_report(run.dir, stats, config, "_last" if config.testWeights == "last" else "")
    return 0


def write_report(run_dir: Path, stats: dict, config: Stage2Config, suffix: str = "") -> None:
    """The test report, ``evaluate_<K>shot_seed<S><suffix>.json``, and the figure of its first episode."""
    write_json(run_dir / f"evaluate_{config.shots}shot_seed{config.seed}{suffix}.json",
               stage2.report(stats, config, "test"))
    if figure := stage2.write_figure(stats["first"], config):
        print(f"figure: {figure}")


def evaluate_checkpoint(config: Stage2Config, device: torch.device) -> int:
    """``--evaluate``: the test episodes of ``--seed`` with and without deformation. Once the inputs are
    read, the run's lock (``runs/<tensorname>/``, as training takes it) is held until the report is written."""
    with GracefulInterrupt() as interrupt, ExitStack() as held:
        stop = lambda: interrupt.requested  # noqa: E731
        try:
            splits, model, gallery = stage2.prepare(config, device, need_train=False, stop=stop)
            held.enter_context(run_lock(RUNS_DIR / config.tensorname))
            bank = stage2.gallery_bank(gallery, model, config, device, stop)
            embed = stage2.make_embed(model, device, bool(config.dataParallel))
            stats = stage2.test(model, splits["test"], bank, config, device, embed, stop)
        except Interrupted as stopped:
            print(f"stopped {stopped}; nothing was written: run the same command again", flush=True)
            return INTERRUPTED_EXIT
        write_report(RUNS_DIR / config.tensorname, stats, config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
