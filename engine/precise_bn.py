"""Re-estimated BatchNorm statistics (``--preciseBN N``, ``scripts/precise_bn.py``): the embedding's
running statistics recomputed as a plain average over N clean training images (evaluation crop, no
blend, no flip), instead of the exponential average of the last ~10 training batches that training
leaves. Not the original's behaviour: an option, reported beside the as-saved numbers."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from datasets.episodes import CroppedImages
from datasets.loaders import image_loader
from datasets.seeding import item_rng
from datasets.splits import Split
from datasets.transforms import prepare_images
from models.batchnorm import reestimate_bn_statistics
from utils.interrupt import check_stop

PRECISE_STREAM = 7  # the image draw's stream, apart from every training and episode stream


def clean_files(split: Split, count: int, seed: int, files_per_class: int = 0) -> list[Path]:
    """The first ``count`` of ``split``'s files (each class's first ``files_per_class``, 0: all), ``seed``-shuffled."""
    files = [f for class_files in split.files for f in (class_files[:files_per_class] if files_per_class
                                                         else class_files)]
    order = item_rng(seed, PRECISE_STREAM).permutation(len(files))
    return [files[i] for i in order[:count]]


def reestimate(net: nn.Module, files: list[Path], image_size: int, batch: int, workers: int, device: torch.device,
               progress: bool = False, stop: Callable[[], bool] | None = None) -> None:
    """Re-estimate in place the running statistics of ``net``'s (plain) BatchNorms over ``files``' evaluation
    crops in batches of ``batch`` (a last batch of one left out). Raises Interrupted on ``stop()``."""

    def batches():
        loader = image_loader(CroppedImages(files, image_size), batch, workers, device)
        for images in tqdm(loader, desc="preciseBN", disable=not progress, leave=False):
            if len(images) > 1:
                yield prepare_images(images, device)
            check_stop(stop, "while re-estimating the BatchNorm statistics")

    reestimate_bn_statistics(net, batches())
