"""Forward-pass helpers both stages share: autocast, the compute memory layout, chunked passes."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled``, else a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


# Name -> memory format of images and convolution weights (``--memoryFormat``). The layout changes
# only float rounding; the outcome benchmark (benchmarks/outcome.py) judges what that does to learning.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
DEFAULT_MEMORY_FORMAT = "channels_last"
_memory_format = MEMORY_FORMATS[DEFAULT_MEMORY_FORMAT]


def set_memory_format(name: str) -> None:
    """Use ``name`` (a key of :data:`MEMORY_FORMATS`) in :func:`compute_layout` and :func:`layout_model`
    from now on in this process (the scripts call it once, from ``--memoryFormat``)."""
    global _memory_format
    _memory_format = MEMORY_FORMATS[name]


def compute_layout(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in the compute memory format: channels_last by default, the layout the networks
    run fastest in on CUDA and on the CPU alike (oneDNN: a ResNet-18 forward at 84 px about 1.3x, the
    small deformation encoder up to 2x faster than contiguous); the weights follow :func:`layout_model`."""
    return images.contiguous(memory_format=_memory_format)


def layout_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its convolution weights in the compute memory format (in place), to match
    :func:`compute_layout`."""
    return model.to(memory_format=_memory_format)


def embed_in_chunks(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int) -> torch.Tensor:
    """``embed`` over ``images`` ``[N, 3, S, S]`` in chunks of ``chunk`` -> float32 ``[N, D]``.

    A chunk of one image is embedded as a pair (the image twice): the CPU kernels take another
    path for a batch of one and round differently, and an image's features must not depend on the
    company it is embedded in (cached and per-episode features are then the same numbers).
    """
    parts = []
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        parts.append(embed(part.expand(2, *part.shape[1:]))[:1].float() if len(part) == 1 else embed(part).float())
    return torch.cat(parts)


def deform_in_chunks(deform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                     probes: torch.Tensor, gallery: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``deform`` (``IDeMeNet.deform``) over probe and gallery images ``[N, 3, S, S]`` -> (deformed
    ``[N, 3, S, S]``, weights ``[N, F*F]``): in chunks of ``chunk`` without autograd, in one call
    with it (the graph keeps every activation anyway; chunks would only add copies)."""
    if torch.is_grad_enabled() or len(probes) <= chunk:
        return deform(probes, gallery)
    parts = [deform(probes[i:i + chunk], gallery[i:i + chunk]) for i in range(0, len(probes), chunk)]
    return torch.cat([deformed for deformed, _ in parts]), torch.cat([weights for _, weights in parts])
