"""The stage-1 embedding network: torchvision ResNet-18 with a 64-way fc (SPEC 2)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

FEATURE_DIM = 512


class EmbeddingNet(nn.Module):
    """ResNet-18 classifier whose state-dict keys are ``convnet.<torchvision key>``.

    ``forward(images [N,3,S,S]) -> logits [N, num_classes]``; ``features`` gives ``[N, 512]``.
    """

    def __init__(self, num_classes: int = 64) -> None:
        super().__init__()
        self.convnet = resnet18(weights=None, num_classes=num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled ResNet features ``[N, 512]``."""
        net = self.convnet
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.convnet(images)


def backbone_from_embedding(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a stage-1 state dict (``convnet.*``) into ResNet body keys and ``fc`` keys."""
    body = {k[len("convnet."):]: v for k, v in state.items() if k.startswith("convnet.") and not k.startswith("convnet.fc.")}
    fc = {k[len("convnet.fc."):]: v for k, v in state.items() if k.startswith("convnet.fc.")}
    return body, fc
