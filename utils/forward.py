"""Forward-pass helpers both stages share: autocast, the compute memory layout, chunked passes."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later compute bfloat16 natively (earlier GPUs emulate it)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The ``--amp`` dtype on CUDA ``device``: bfloat16 where native (capability 8.0+), else float16 (scaled)."""
    capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16


def autocast(device: torch.device, enabled: bool):
    """Autocast in :func:`amp_dtype` on CUDA when ``enabled``, else a no-op context."""
    return torch.autocast("cuda", dtype=amp_dtype(device)) if enabled and device.type == "cuda" else nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast; a pass-through for bfloat16, float32 and the CPU."""
    scaled = enabled and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if scaled else "cpu", enabled=scaled)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Continue ``scaler`` from a resumed run's ``state``; an empty one (saved without scaling) starts it afresh."""
    if state:
        scaler.load_state_dict(state)


def step_optimizers(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    """Step once each optimiser that holds a gradient (one without would change nothing), through ``scaler``
    when it scales, then one ``update``."""
    stepped = [optimizer for optimizer in optimizers
               if any(p.grad is not None for group in optimizer.param_groups for p in group["params"])]
    scaled = scaler is not None and scaler.is_enabled()
    for optimizer in stepped:
        if scaled:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaled and stepped:
        scaler.update()


class AutocastReplica(torch.nn.Module):
    """``module`` for DataParallel, its threads autocasting in :func:`amp_dtype` (DataParallel's use float16)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_cuda and torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", dtype=amp_dtype(images.device)):
                return self.module(images)
        return self.module(images)


# ``--memoryFormat`` -> memory format of images and convolution weights (it changes only float rounding).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
DEFAULT_MEMORY_FORMAT = "channels_last"
_memory_format = MEMORY_FORMATS[DEFAULT_MEMORY_FORMAT]


def set_memory_format(name: str) -> None:
    """Use ``name`` (a key of :data:`MEMORY_FORMATS`) from now on in this process."""
    global _memory_format
    _memory_format = MEMORY_FORMATS[name]


def compute_layout(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in the compute memory format (channels_last by default: fastest on CUDA and the CPU)."""
    return images.contiguous(memory_format=_memory_format)


def layout_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its convolution weights in the compute memory format (in place)."""
    return model.to(memory_format=_memory_format)


def embed_in_chunks(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int) -> torch.Tensor:
    """``embed`` over ``images`` ``[N, 3, S, S]`` in chunks -> float32 ``[N, D]``; a lone image goes as a pair (the
    CPU kernels round a batch of one differently: cached and per-episode features must agree)."""
    def one_call(part: torch.Tensor) -> torch.Tensor:
        return embed(part.expand(2, *part.shape[1:]))[:1].float() if len(part) == 1 else embed(part).float()

    if len(images) <= chunk or len(images) == 1:
        return one_call(images)
    return torch.cat([one_call(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def deform_in_chunks(deform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                     probes: torch.Tensor, gallery: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``IDeMeNet.deform`` over ``[N, 3, S, S]`` pairs -> (deformed, ``[N, F*F]``), chunked only without autograd."""
    if torch.is_grad_enabled() or len(probes) <= chunk:
        return deform(probes, gallery)
    parts = [deform(probes[i:i + chunk], gallery[i:i + chunk]) for i in range(0, len(probes), chunk)]
    return torch.cat([deformed for deformed, _ in parts]), torch.cat([weights for _, weights in parts])
