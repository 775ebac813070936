"""Image transforms of SPEC section 1 for any image size S."""
from __future__ import annotations

import torch
from torchvision import transforms as T

from utils.forward import compute_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: ``round(S * 256 / 224)`` (256 for S = 224)."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int) -> T.Compose:
    """``RandomResizedCrop(S)``, horizontal flip, ImageNet normalisation -> float ``[3, S, S]``."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_crop(image_size: int) -> T.Compose:
    """``Resize(round(S*256/224))``, ``CenterCrop(S)`` -> uint8 ``[3, S, S]`` (not yet normalised)."""
    return T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.PILToTensor()])


def eval_transform(image_size: int) -> T.Compose:
    """The evaluation transform: centre crop then normalisation -> float ``[3, S, S]``."""
    return T.Compose([eval_crop(image_size), T.ConvertImageDtype(torch.float32),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, S, S]`` -> normalised float32 of the same shape (same as ToTensor + Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[N, 3, S, S]`` -> ``[0, 1]`` RGB (the inverse of :func:`normalize_uint8`, clipped)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def prepare_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` (CPU, possibly pinned) -> normalised float on ``device``."""
    return compute_layout(normalize_uint8(images.to(device, non_blocking=True)))
