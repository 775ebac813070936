"""BatchNorm layers (PyTorch 0.4.0's, docs/original.md §4.2; lean when frozen) and their running statistics."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init


class _FrozenBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm whose backward, ``dy * invstd * weight``, matches the stock CPU kernel bit for bit."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, invstd, weight_4d):
        ctx.save_for_backward(invstd, weight_4d)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        invstd, weight = ctx.saved_tensors
        grad_x = grad * invstd * weight
        return grad_x.to(grad.dtype), None, None, None, None, None, None, None


def frozen_invstd(running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(running_var + eps)`` computed in double, in ``running_var``'s dtype, ``[1, C, 1, 1]``."""
    return (1 / torch.sqrt(running_var.double() + eps)).to(running_var.dtype).view(1, -1, 1, 1)


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same keys and numbers) that keeps no ``[N, C, H, W]`` input for the backward when frozen
    (eval mode, no weight gradients, input with one: the embedding under ``--fixCls 1``, 330 MB saved for 35 images
    at 224 px). After a write through ``running_var.data`` call :meth:`forget_frozen_factors`."""

    _frozen_cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.training and self.track_running_stats and self.weight is not None
        if frozen and torch.is_grad_enabled() and x.requires_grad and not (self.weight.requires_grad
                                                                          or self.bias.requires_grad):
            invstd, weight = self.frozen_factors()
            return _FrozenBatchNorm.apply(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                          invstd, weight)
        if self.training and self.track_running_stats:
            self.forget_frozen_factors()  # this forward updates the running statistics
        return super().forward(x)

    def frozen_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(:func:`frozen_invstd`, ``weight``) ``[1, C, 1, 1]``, cached while tensors, versions and ``eps`` hold."""
        var, tracked, weight = self.running_var, self.num_batches_tracked, self.weight
        key = (var._version, var.data_ptr(), None if tracked is None else tracked._version, weight.data_ptr(),
               self.eps)
        cached = self._frozen_cache
        if cached is not None and cached[0] is var and cached[1] is tracked and cached[2] is weight \
                and cached[3] == key:
            return cached[4], cached[5]
        with torch.no_grad():
            factors = frozen_invstd(var, self.eps), weight.detach().view(1, -1, 1, 1)
        self._frozen_cache = (var, tracked, weight, key, *factors)
        return factors

    def forget_frozen_factors(self) -> None:
        self._frozen_cache = None


class Torch04BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` initialised as PyTorch 0.4.0 did (docs/original.md §4.2): weight ~ U(0, 1), bias 0."""

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.uniform_(self.weight, 0.0, 1.0)
            init.zeros_(self.bias)


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``module`` that keeps running statistics, in module order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s BatchNorm layers in training mode leave their running statistics untouched."""
    norms = batch_norms(module)
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


def running_variances(module: nn.Module) -> torch.Tensor:
    """A copy of the ``running_var`` of every BatchNorm layer of ``module``, concatenated ``[channels]``."""
    return torch.cat([norm.running_var.detach().flatten().float() for norm in batch_norms(module)]).cpu()


@torch.no_grad()
def reestimate_bn_statistics(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to the size-weighted mean over ``batches`` (``[B, 3, S, S]``, B >= 2)
    of each batch's mean and unbiased variance, computed as in training; returns the number of images seen."""
    layers = batch_norms(module)
    sums = {layer: [0.0, 0.0, 0] for layer in layers}  # sums of n * mean, of n * unbiased variance, of n

    def accumulate(layer: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0].double()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        sums[layer][0] = sums[layer][0] + x.mean(dims) * n
        sums[layer][1] = sums[layer][1] + x.var(dims, correction=1) * n
        sums[layer][2] += n

    modes = {m: m.training for m in module.modules()}
    hooks = [layer.register_forward_pre_hook(accumulate) for layer in layers]
    seen = 0
    try:
        module.train()
        with running_statistics_kept(module):  # batch statistics normalise; the running ones are replaced below
            for images in batches:
                if len(images) < 2:
                    raise ValueError("reestimate_bn_statistics: every batch needs at least two images")
                module(images)
                seen += len(images)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.train(training)
    for layer, (mean_sum, var_sum, count) in sums.items():
        if count:
            layer.running_mean.copy_(mean_sum / count)
            layer.running_var.copy_(var_sum / count)
    return seen
