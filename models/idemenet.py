"""The stage-2 network (the original's GNet): embedding, base-class fc, deformation, scale."""
from __future__ import annotations

import torch
from torch import nn

from models.deformation import DEFORM_NETS, blend_patches, resnet_body
from models.embedding import DEFAULT_BACKBONE, feature_size


class IDeMeNet(nn.Module):
    """Embedding (``backbone``: a key of ``BACKBONES``) plus deformation sub-network (``deform_net``: a key of
    ``DEFORM_NETS``) on an F x F grid; keys ``backbone.*`` (ResNet, no fc), ``fc.*``, ``deformer.*``, ``scale``."""

    def __init__(self, num_classes: int = 64, image_size: int = 224, fang: int = 3, deform_net: str = "small",
                 backbone: str = DEFAULT_BACKBONE) -> None:
        super().__init__()
        self.image_size, self.fang, self.deform_net = image_size, fang, deform_net
        self.backbone_name, self.feature_size = backbone, feature_size(backbone)
        self.backbone = resnet_body(backbone)
        self.fc = nn.Linear(self.feature_size, num_classes)
        if deform_net not in DEFORM_NETS:
            raise ValueError(f"unknown deformation sub-network {deform_net!r} (known: {', '.join(DEFORM_NETS)})")
        self.deformer = DEFORM_NETS[deform_net](image_size, fang, backbone)
        self.scale = nn.Parameter(torch.ones(1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> features ``[N, D]``."""
        return self.backbone(images)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> base-class logits ``[N, num_classes]``."""
        return self.fc(features)

    def deform(self, probe: torch.Tensor, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe and gallery ``[N, 3, S, S]`` -> (deformed ``[N, 3, S, S]``, weights ``[N, F*F]``)."""
        weights = self.deformer(probe, gallery)
        return blend_patches(probe, gallery, weights), weights
