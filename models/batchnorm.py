"""BatchNorm layers (PyTorch 0.4.0's, docs/original.md §4.2; lean when frozen; synced over gloo), running statistics."""
from __future__ import annotations

import warnings
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


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same keys and numbers) that keeps no ``[N, C, H, W]`` input for the backward when frozen
    (eval mode, no weight gradients, input with one: the embedding under ``--fixCls 1``, 330 MB saved for 35 images
    at 224 px). A write through ``running_var.data`` goes unseen by the cache: write under ``no_grad`` instead."""

    _frozen_cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.training and self.track_running_stats and self.weight is not None
        if frozen and torch.is_grad_enabled() and x.requires_grad and not (self.weight.requires_grad
                                                                          or self.bias.requires_grad):
            invstd, weight = self.frozen_factors()
            return _FrozenBatchNorm.apply(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                          invstd, weight)
        if self.training and self.track_running_stats:
            self._frozen_cache = None  # this forward updates the running statistics
        return super().forward(x)

    def frozen_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``1 / sqrt(running_var + eps)``, computed in double, in ``running_var``'s dtype; ``weight``) ``[1,C,1,1]``,
        cached while tensors, versions and ``eps`` hold (the cache holds the tensors: their ids stay theirs)."""
        var, tracked, weight = self.running_var, self.num_batches_tracked, self.weight
        key = (id(var), var._version, var.data_ptr(), id(tracked), None if tracked is None else tracked._version,
               id(weight), weight.data_ptr(), self.eps)
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            with torch.no_grad():
                invstd = (1 / torch.sqrt(var.double() + self.eps)).to(var.dtype).view(1, -1, 1, 1)
                self._frozen_cache = (key, (var, tracked, weight), (invstd, weight.detach().view(1, -1, 1, 1)))
        return self._frozen_cache[2]


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


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training moments are summed over processes by a differentiable all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        moments = torch.cat([x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3)), count])
        from torch.distributed.nn import functional as dist_fn  # here: builds without distributed lack it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            moments = dist_fn.all_reduce(moments)
        total = moments[-1]
        mean = moments[:channels] / total
        var = moments[channels:2 * channels] / total - mean.pow(2)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


def convert_to_gloo_sync(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by :class:`GlooSyncBatchNorm2d`, weights kept."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm2d):
            sync = GlooSyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_to_gloo_sync(child)
    return module
