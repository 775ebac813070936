"""Forward-pass helpers both stages share: autocast, the compute memory layout, chunked passes."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later compute bfloat16 natively (earlier GPUs emulate it)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The ``--amp`` autocast dtype on CUDA ``device``: bfloat16 where the GPU has it natively
    (compute capability 8.0+: A100, RTX 30xx, H100, ...), else float16 (V100, T4, RTX 20xx), whose
    gradients need loss scaling (:func:`grad_scaler`)."""
    capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16


def autocast(device: torch.device, enabled: bool):
    """Autocast in :func:`amp_dtype` on CUDA when ``enabled``, else a no-op context."""
    return torch.autocast("cuda", dtype=amp_dtype(device)) if enabled and device.type == "cuda" else nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (:func:`amp_dtype`); a pass-through (``enabled`` false) for
    bfloat16, float32 and the CPU. Per step: ``scale(loss).backward()`` for each loss,
    ``step(optimizer)`` for each optimiser, one ``update()``."""
    scaled = enabled and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if scaled else "cpu", enabled=scaled)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Continue ``scaler`` from a resumed run's ``state``. A run saved without loss scaling (float32,
    bfloat16, the CPU) saved an empty state, and scaled nothing: resumed where the scaler is enabled
    (``--amp 1`` on a float16 GPU) the scaler starts as it would in a fresh run. A disabled scaler
    ignores any state."""
    if state:
        scaler.load_state_dict(state)


def step_optimizers(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    """Step each optimiser once, through ``scaler`` when it scales (an optimiser whose parameters got
    no gradient this step is left alone, then one ``update``); plainly otherwise."""
    if scaler is None or not scaler.is_enabled():
        for optimizer in optimizers:
            optimizer.step()
        return
    stepped = False
    for optimizer in optimizers:
        if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            scaler.step(optimizer)
            stepped = True
    if stepped:
        scaler.update()


class AutocastReplica(torch.nn.Module):
    """``module`` for :class:`torch.nn.DataParallel`: each replica thread runs it in the caller's
    autocast dtype (:func:`amp_dtype`). DataParallel's threads enter autocast without a dtype, which
    is float16, whatever the caller's."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_cuda and torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", dtype=amp_dtype(images.device)):
                return self.module(images)
        return self.module(images)


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
    Images that fit one chunk go through one call, without slicing and concatenating (the same
    numbers in fewer operations, forward and backward).
    """
    if len(images) == 1:
        return embed(images.expand(2, *images.shape[1:]))[:1].float()
    if len(images) <= chunk:
        return embed(images).float()
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
