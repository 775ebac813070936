"""Networks of IDeMe-Net and loading them from checkpoints (ours and the authors')."""
from models.deformation import DEFORM_NETS, SmallDeformNet, TwoBranchDeformNet, blend_patches
from models.embedding import BACKBONES, DEFAULT_BACKBONE, EmbeddingNet, feature_size, infer_backbone
from models.idemenet import IDeMeNet
from models.loading import load_embedding, load_idemenet

__all__ = [
    "BACKBONES", "DEFAULT_BACKBONE", "DEFORM_NETS", "EmbeddingNet", "IDeMeNet", "SmallDeformNet", "TwoBranchDeformNet",
    "blend_patches", "feature_size", "infer_backbone", "load_embedding", "load_idemenet",
]
