"""Re-estimate the embedding's BatchNorm running statistics of a stage-1 or stage-2 checkpoint (ours or
the authors') as a plain average over N clean training images, and write them to a new file.

    python -m scripts.precise_bn --dataroot data/miniImageNet --checkpoint softRandom --imageSize 224 \
        --images 1024 [--out models/softRandom_preciseBN.t7]

Everything else in the file (weights, the deformation sub-network, the key layout) is kept as it is.
The same computation as stage 1's ``--preciseBN`` (``engine/precise_bn.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.precise_bn\n")
    sys.exit(2)

from utils.runtime import set_process_env

set_process_env()  # before torch loads, as in the scripts

import argparse

import torch

from datasets.lowshot import read_stage_split
from engine.options import add_batch_flag, add_files_per_class_flag, add_image_size_flag, add_lowshotmeta_flag
from engine.precise_bn import clean_files, reestimate
from models import load_embedding
from models.loading import with_embedding_statistics
from utils.checkpoint import atomic_save, load_state_dict, resolve_checkpoint
from utils.errors import OptionError
from utils.forward import layout_model
from utils.options import (
    HelpFormatter,
    add_dataroot_flag,
    add_device_flag,
    add_progress_flag,
    add_seed_flag,
    add_threads_flag,
    check_positive,
    resolve_device,
    run_cli,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="models/<name>.t7 by name, or a path")
    add_dataroot_flag(parser, use="dataset root (its train split is used)")
    add_lowshotmeta_flag(parser, use="--dataroot is an ILSVRC tree (as in stage 1)")
    add_image_size_flag(parser, use="the checkpoint was trained at")
    parser.add_argument("--images", type=int, default=1024, help="clean training images N (at least 2)")
    add_files_per_class_flag(parser, use=" in the draw")
    add_batch_flag(parser, 128, "images per batch")
    add_seed_flag(parser, "the image draw")
    parser.add_argument("--out", default=None, help="file to write (default: <checkpoint>_preciseBN.t7 beside it)")
    add_device_flag(parser)
    add_threads_flag(parser, at_most=4, use="image-decoding workers")
    add_progress_flag(parser, default=1)
    parser.set_defaults(amp=0)
    return parser


def main(args: argparse.Namespace) -> int:
    check_positive(args, "imageSize", "batchSize")
    if args.images < 2:
        raise OptionError(f"--images must be at least 2, got {args.images}")
    device = resolve_device(args)
    path = resolve_checkpoint(args.checkpoint, "--checkpoint")
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_preciseBN.t7")
    if out.resolve() == path.resolve():
        raise OptionError(f"--out {out}: would overwrite the checkpoint it reads; name another file")
    state = load_state_dict(path)
    net = layout_model(load_embedding(path).to(device))
    files = clean_files(read_stage_split(args.dataroot, "train", args.lowshotmeta), args.images, args.seed,
                        args.filesPerClass)
    before = {k: v.clone() for k, v in net.state_dict().items() if k.endswith(".running_var")}
    reestimate(net, files, args.imageSize, args.batchSize, args.nthreads, device, bool(args.progress))
    after = net.state_dict()
    change = torch.stack([((after[k].cpu() - v.cpu()).abs() / v.cpu().clamp_min(1e-12)).mean()
                          for k, v in before.items()])
    atomic_save(with_embedding_statistics(state, {k: v.cpu() for k, v in after.items()}), out)
    print(f"wrote {out}: {len(before)} BatchNorm layers re-estimated over {len(files)} training images "
          f"(running_var moved by {100 * change.mean().item():.1f} % on average)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
