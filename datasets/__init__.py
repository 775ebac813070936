"""miniImageNet splits, transforms, the stage-1 and episodic datasets, the gallery, toy data."""
from datasets.episodes import AugmentDraws, CroppedImages, EpisodeDataset, collate_episode
from datasets.gallery import Gallery, gallery_files
from datasets.images import image_problem, load_rgb, scan_split
from datasets.seeding import SeededSampler, item_rng
from datasets.softrandom import SoftRandomDataset, blend_batch
from datasets.splits import SPLITS, Split, class_list, detect_layout, read_split
from datasets.transforms import eval_crop, normalize_uint8, train_transform
from utils.errors import DataError

__all__ = [
    "AugmentDraws", "CroppedImages", "DataError", "EpisodeDataset", "Gallery", "SPLITS", "SeededSampler",
    "SoftRandomDataset", "Split", "blend_batch", "class_list", "collate_episode", "detect_layout", "eval_crop",
    "gallery_files", "image_problem", "item_rng", "load_rgb", "normalize_uint8", "read_split", "scan_split",
    "train_transform",
]
