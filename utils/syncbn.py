"""Synchronised BatchNorm for CPU processes (gloo), where ``nn.SyncBatchNorm`` does not run."""
from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training moments are summed over processes by a differentiable all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        moments = torch.cat([x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3)), count])
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
