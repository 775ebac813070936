"""The deformation sub-networks (registry: :data:`DEFORM_NETS`), the blend (docs/original.md §4.1)."""
from __future__ import annotations

import torch
from torch import nn

from models.batchnorm import LeanBatchNorm2d, Torch04BatchNorm2d
from models.embedding import DEFAULT_BACKBONE, build_backbone, feature_size
from utils.grid import weight_map

ENCODER_CHANNELS = (6, 32, 64, 64, 32, 16)


def blend_patches(probe: torch.Tensor, gallery: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``W * probe + (1 - W) * gallery`` ``[N, C, S, S]``; ``weights`` ``[N, F*F]``, cell (i, j) at ``i * F + j``."""
    mask = weight_map(weights.to(probe.dtype), probe.shape[-1])
    return mask * probe + (1 - mask) * gallery


class DeformNet(nn.Module):
    """``forward(probe, gallery)``, ``[N, 3, S, S]`` each -> weights ``[N, F*F]``; ``backbone``: the embedding's."""

    min_image_size = 1  # smallest image side S the network accepts

    def __init__(self, image_size: int, fang: int, backbone: str = DEFAULT_BACKBONE) -> None:
        super().__init__()
        if image_size < self.min_image_size:
            raise ValueError(f"{type(self).__name__} needs images of at least {self.min_image_size} px, "
                             f"got {image_size}")

    def state_from_embedding(self, body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of this network's state that start from a stage-1 ResNet body (:func:`resnet_body`'s keys)."""
        return {}


class SmallDeformNet(DeformNet):
    """The released encoder, initialised as PyTorch 0.4.0 did: ``cat(probe, gallery)`` [N,6,S,S] -> five
    Conv-BN-ReLU-MaxPool blocks -> flatten (16 * (S//32)^2) -> ``Linear`` -> weights [N, F*F] (no sigmoid)."""

    min_image_size = 2 ** (len(ENCODER_CHANNELS) - 1)  # one 2x2 max-pool per block: the output map is S // 32

    def __init__(self, image_size: int, fang: int, backbone: str = DEFAULT_BACKBONE) -> None:
        super().__init__(image_size, fang, backbone)
        side = image_size // self.min_image_size
        self.encoder = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), Torch04BatchNorm2d(cout), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2))
            for cin, cout in zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:])
        ])
        self.toWeight = nn.Sequential(nn.Linear(ENCODER_CHANNELS[-1] * side * side, fang * fang))

    def forward(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        code = self.encoder(torch.cat([probe, gallery], dim=1))
        return self.toWeight(torch.flatten(code, 1))


def resnet_body(backbone: str = DEFAULT_BACKBONE) -> nn.Module:
    """The ResNet ``backbone`` giving pooled features ``[N, D]`` (no fc), with :class:`LeanBatchNorm2d` layers."""
    net = build_backbone(backbone, norm_layer=LeanBatchNorm2d)
    net.fc = nn.Identity()
    return net


class TwoBranchDeformNet(DeformNet):
    """The paper's figure: a ResNet for the probe, one for the gallery image, ``[N, 2D]`` -> ``Linear`` -> [N, F*F]."""

    def __init__(self, image_size: int, fang: int, backbone: str = DEFAULT_BACKBONE) -> None:
        super().__init__(image_size, fang, backbone)
        self.probe_branch = resnet_body(backbone)
        self.gallery_branch = resnet_body(backbone)
        self.toWeight = nn.Sequential(nn.Linear(2 * feature_size(backbone), fang * fang))

    def forward(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return self.toWeight(torch.cat([self.probe_branch(probe), self.gallery_branch(gallery)], dim=1))

    def state_from_embedding(self, body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{branch}.{key}": value for branch in ("probe_branch", "gallery_branch")
                for key, value in body.items()}


# ``--deformNet`` name -> class; ``small`` (the released encoder) is the default.
DEFORM_NETS: dict[str, type[DeformNet]] = {"small": SmallDeformNet, "twobranch": TwoBranchDeformNet}
