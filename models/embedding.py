"""The stage-1 embedding: a torchvision ResNet (ResNet-18 by default), 64-way fc (docs/original.md §3.1)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from utils.errors import CheckpointError

# Backbone name -> (residual block, blocks per stage) of its torchvision ResNet (``torchvision.models.<name>``'s).
BACKBONES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),  # the ImageNet low-shot benchmark's (Hariharan & Girshick 2017)
    "resnet18": (BasicBlock, (2, 2, 2, 2)),  # the paper's
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
DEFAULT_BACKBONE = "resnet18"


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")


def feature_size(backbone: str) -> int:
    """Width D of the backbone's pooled features: 512 (BasicBlock ResNets), 2048 (Bottleneck ones)."""
    check_backbone(backbone)
    return 512 * BACKBONES[backbone][0].expansion


def build_backbone(backbone: str, **resnet_args) -> ResNet:
    """A randomly initialised torchvision ResNet of that name (``resnet_args``: ``ResNet``'s keywords)."""
    check_backbone(backbone)
    block, stages = BACKBONES[backbone]
    return ResNet(block, list(stages), **resnet_args)


def infer_backbone(state: dict[str, torch.Tensor], prefix: str, path: Path | str | None = None) -> str:
    """The backbone whose layout ``state`` holds under ``<prefix>`` (else :class:`CheckpointError` naming ``path``)."""
    stages = tuple(len({key[len(prefix):].split(".")[1] for key in state
                        if key.startswith(f"{prefix}layer{stage}.")}) for stage in range(1, 5))
    bottleneck = any(key.startswith(prefix) and ".conv3." in key for key in state)
    for name, (block, layout) in BACKBONES.items():
        if stages == layout and bottleneck == (block is Bottleneck):
            return name
    known = "; ".join(f"{name} {layout} {block.__name__}" for name, (block, layout) in BACKBONES.items())
    where = f"{path}: " if path is not None else ""
    raise CheckpointError(f"{where}the ResNet under {prefix}* has {stages} blocks per stage of "
                          f"{'Bottleneck' if bottleneck else 'BasicBlock'} kind, no known backbone ({known})")


class EmbeddingNet(nn.Module):
    """A ResNet (keys ``convnet.<torchvision key>``): images ``[N,3,S,S]`` -> logits ``[N, num_classes]``."""

    def __init__(self, num_classes: int = 64, backbone: str = DEFAULT_BACKBONE) -> None:
        super().__init__()
        self.backbone_name, self.feature_size = backbone, feature_size(backbone)
        self.convnet = build_backbone(backbone, num_classes=num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled ResNet features ``[N, D]`` of ``images [N, 3, S, S]``."""
        net = self.convnet
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.convnet(images)

