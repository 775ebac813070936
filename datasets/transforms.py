"""Image transforms of docs/original.md §2.2 and §2.3 for any image size S."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from utils.forward import compute_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: ``round(S * 256 / 224)`` (256 for S = 224)."""
    return round(image_size * 256 / 224)


CROPS = ("tv02", "current")  # stage 1's random crop: torchvision 0.2's (the original's) or today's torchvision's
CROP_ATTEMPTS, CROP_SCALE, CROP_RATIO = 10, (0.08, 1.0), (3 / 4, 4 / 3)


def torch_uniform(low: float, high: float) -> float:
    """One draw of U(low, high) from torch's global generator (seeded per item by the datasets)."""
    return low + (high - low) * torch.rand((), dtype=torch.float64).item()


def tv02_crop_box(width: int, height: int, uniform: Callable[[float, float], float] = torch_uniform
                  ) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of torchvision 0.2's ``RandomResizedCrop``: 10 tries of uniform area and ratio
    (today: log-uniform), sides rounded half away from zero, swapped with probability 1/2; else a centre square."""
    area = width * height
    for _ in range(CROP_ATTEMPTS):
        target = uniform(*CROP_SCALE) * area
        ratio = uniform(*CROP_RATIO)
        w = math.floor(math.sqrt(target * ratio) + 0.5)
        h = math.floor(math.sqrt(target / ratio) + 0.5)
        if uniform(0.0, 1.0) < 0.5:
            w, h = h, w
        if w <= width and h <= height:
            top = math.floor(uniform(0.0, height - h + 1))
            left = math.floor(uniform(0.0, width - w + 1))
            return top, left, h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


class TV02RandomResizedCrop:
    """torchvision 0.2's ``RandomResizedCrop(size)`` on a PIL image (:func:`tv02_crop_box`, bilinear resize)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = tv02_crop_box(*image.size)
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)


def train_transform(image_size: int, crop: str = "tv02") -> T.Compose:
    """Random crop (``crop``: ``tv02``, the original's, or ``current``), flip -> uint8 ``[3, S, S]``, normalised on
    the device (:func:`normalize_uint8`: the same numbers as the original's ToTensor + Normalize in the worker)."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r} (known: {', '.join(CROPS)})")
    return T.Compose([
        TV02RandomResizedCrop(image_size) if crop == "tv02" else T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


def eval_crop(image_size: int) -> T.Compose:
    """``Resize(round(S*256/224))``, ``CenterCrop(S)`` -> uint8 ``[3, S, S]`` (:func:`normalize_uint8` follows)."""
    return T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.PILToTensor()])


@functools.lru_cache(maxsize=None)
def normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std ``[3, 1, 1]`` on ``device``, cached (a copy to the GPU blocks); read only."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1))


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, S, S]`` -> normalised float32 of the same shape (same as ToTensor + Normalize)."""
    mean, std = normalization_constants(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[N, 3, S, S]`` -> ``[0, 1]`` RGB (the inverse of :func:`normalize_uint8`, clipped)."""
    mean, std = normalization_constants(images.device)
    return (images.float() * std + mean).clamp(0, 1)


def prepare_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` (CPU, possibly pinned) -> normalised float on ``device``."""
    return compute_layout(normalize_uint8(images.to(device, non_blocking=True)))
