"""The flags of both stages and of the low-shot evaluation, shared with the benchmarks and scripts, and
the typed configurations built from them, checked as far as no data is needed."""
from __future__ import annotations

import argparse
import math
from dataclasses import make_dataclass, replace
from typing import Any, get_type_hints

import torch

from datasets.transforms import CROPS
from engine.episode import DEFORM_MODES, GALLERY_BN, GALLERY_EXCLUDE, GALLERY_MODES
from models import BACKBONES, DEFAULT_BACKBONE, DEFORM_NETS
from utils.errors import OptionError
from utils.forward import DEFAULT_MEMORY_FORMAT, MEMORY_FORMATS
from utils.options import (
    HelpFormatter,
    add_dataroot_flag,
    add_progress_flag,
    add_runtime_flags,
    check_positive,
    resolve_device,
)

CUDA_CHUNK, CPU_CHUNK = 128, 16  # stage 2's default --batchSize per device
CHUNK_HELP = (f"images per forward chunk; smaller chunks need less memory and run faster on the CPU "
              f"(default: {CUDA_CHUNK} on CUDA, {CPU_CHUNK} on the CPU)")
# The shot-dependent defaults of --augnum and --chooseNum: (1 shot, more shots).
AUGNUM_DEFAULTS, CHOOSE_DEFAULTS = (7, 5), (15, 30)
GALLERY_NUM = 30  # --galleryNum's default: gallery images per base class


def shot_defaults(shots: int) -> tuple[int, int]:
    """``(augnum, chooseNum)`` by default for ``shots`` support images per class."""
    return AUGNUM_DEFAULTS[shots != 1], CHOOSE_DEFAULTS[shots != 1]


# --- flags declared once (with utils.options' runtime, dataroot and progress flags) -------------

def add_image_size_flag(parser: argparse.ArgumentParser, default: int | None = 224,
                        use: str = "(84 and 224 are usual)", grid: bool = False) -> None:
    """``--imageSize`` (required when ``default`` is None), with ``grid`` the patch grid's ``--Fang`` too."""
    parser.add_argument("--imageSize", type=int, default=default, required=default is None,
                        help=f"image side S in pixels {use}".rstrip())
    if grid:
        parser.add_argument("--Fang", type=int, default=3, help="the patch grid is Fang x Fang")


def add_batch_flag(parser: argparse.ArgumentParser, default: int | None = None, use: str = CHUNK_HELP) -> None:
    """``--batchSize``: by default (None) the forward chunk of the device (:func:`forward_chunk`)."""
    parser.add_argument("--batchSize", type=int, default=default, help=use)


def forward_chunk(batch_size: int | None, device: torch.device) -> int:
    return batch_size if batch_size is not None else CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK


def add_lowshotmeta_flag(parser: argparse.ArgumentParser, use: str, required: bool = False) -> None:
    parser.add_argument("--lowshotmeta", default=None, required=required,
                        help=f"label_idx.json of the ImageNet-1K low-shot benchmark: {use}")


def add_tensorname_flag(parser: argparse.ArgumentParser, of: str) -> None:
    parser.add_argument("--tensorname", required=True, help=f"name of {of}")


def add_network_flag(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument("--network", default="None", help=f"stage-1 checkpoint (models/<name>.t7) {use}")


def add_gnet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--GNet", default="None",
                        help="stage-2 checkpoint (models/<name>.t7; ours or the authors' metaNet_*shot.t7)")


def add_gallery_flags(parser: argparse.ArgumentParser, per: str = "support image", one: str = "1-shot") -> None:
    """``--augnum`` and ``--chooseNum`` (:func:`shot_defaults`, ``one`` naming one shot), ``--galleryNum``."""
    parser.add_argument("--augnum", type=int, default=None,
                        help=f"deformed copies per {per} (default: {AUGNUM_DEFAULTS[0]} for {one}, "
                        f"{AUGNUM_DEFAULTS[1]} otherwise)")
    parser.add_argument("--chooseNum", type=int, default=None,
                        help=f"nearest gallery images per class (default: {CHOOSE_DEFAULTS[0]} for {one}, "
                        f"{CHOOSE_DEFAULTS[1]} otherwise)")
    add_gallery_num_flag(parser)


def add_gallery_num_flag(parser: argparse.ArgumentParser, default: int | None = GALLERY_NUM, use: str = "") -> None:
    parser.add_argument("--galleryNum", type=int, default=default, required=default is None,
                        help=f"gallery images per base class{use}")


def add_files_per_class_flag(parser: argparse.ArgumentParser, default: int | None = 500, use: str = "") -> None:
    parser.add_argument("--filesPerClass", type=int, default=default, required=default is None,
                        help=f"first files of each base class used{use} (0: every file)")


def add_deform_net_flag(parser: argparse.ArgumentParser, use: str = "") -> None:
    parser.add_argument("--deformNet", default="small", choices=tuple(DEFORM_NETS),
                        help="deformation sub-network (models.deformation.DEFORM_NETS): small, the released encoder; "
                        f"twobranch, the paper's two ResNet branches (of the embedding's backbone){use}")


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deform", default="learned", choices=DEFORM_MODES,
                        help="ablation: learned weights (the stage-2 network), random U(0,1) weights per cell, or "
                        "none, no deformed images (prototypes only)")
    parser.add_argument("--gallerySelect", default="nearest", choices=GALLERY_MODES,
                        help="ablation: gallery images from each class's chooseNum nearest, or uniform over the "
                        "gallery")


def add_common_args(parser: argparse.ArgumentParser, batch_default: int | None, batch_help: str, lr_help: str,
                    epochs: int, val_help: str) -> None:
    """The flags both training scripts share, with each script's defaults and helps."""
    add_dataroot_flag(parser)
    add_lowshotmeta_flag(parser, use="--dataroot then holds ILSVRC-2012 train/ and val/ class folders; training "
                         "uses the 389 base classes, val the validation setup's novel classes and test the test "
                         "setup's (ILSVRC val images)")
    add_image_size_flag(parser, grid=True)
    add_tensorname_flag(parser, "the run: models/<name>.t7 and runs/<name>/")
    add_network_flag(parser, "to start from, or None")
    parser.add_argument("--LR", type=float, default=1e-3, help=lr_help)
    parser.add_argument("--numEpochs", type=int, default=epochs, help="training epochs")
    parser.add_argument("--valEpisodes", type=int, default=600, help=val_help)
    add_batch_flag(parser, batch_default, batch_help)
    add_runtime_flags(parser, "every random draw of the run")
    parser.add_argument("--memoryFormat", default=DEFAULT_MEMORY_FORMAT, choices=tuple(MEMORY_FORMATS),
                        help="memory layout of images and convolution weights (float rounding only; see "
                        "docs/outcome.md)")
    parser.add_argument("--resume", action="store_true", help="continue the run from runs/<tensorname>/resume.pt")
    parser.add_argument("--overwrite", action="store_true", help="start anew even if runs/<tensorname>/ holds a run")
    parser.add_argument("--skipBadImages", action="store_true",
                        help="leave unreadable or truncated images out (reported) instead of stopping")
    add_progress_flag(parser)


def stage1_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IDeMe-Net stage 1: soft-random embedding pre-training",
                                     formatter_class=HelpFormatter)
    add_common_args(parser, 128, "global batch (split over the processes under torchrun)", "learning rate", 35,
                    "val episodes per few-shot evaluation")
    parser.add_argument("--backbone", default=None, choices=tuple(BACKBONES),
                        help=f"embedding ResNet (models.embedding.BACKBONES) (default: {DEFAULT_BACKBONE} for a new "
                        "network, the checkpoint's own with --network)")
    add_files_per_class_flag(parser)
    parser.add_argument("--crop", default="tv02", choices=CROPS,
                        help="random crop of the training images: tv02, torchvision 0.2's RandomResizedCrop (the "
                        "original's: aspect ratio uniform on [3/4, 4/3], w and h swapped half the time, a centre "
                        "square when 10 attempts fail); current, today's torchvision (log-uniform ratio, no swap, "
                        "the whole image clamped to the ratio range when they fail)")
    parser.add_argument("--valEvery", type=int, default=5,
                        help="val few-shot evaluation every N epochs (0: only at the end)")
    parser.add_argument("--valQueries", type=int, default=15, help="query images per class in val episodes")
    parser.add_argument("--preciseBN", type=int, default=0,
                        help="re-estimate the BatchNorm running statistics of every saved file as a plain average over "
                        "N clean training images (evaluation crop, no blend); the val monitor reports both and "
                        "selects _best.t7 on the re-estimated; 0: the original's statistics, as training left them")
    return parser


def scale_init(text: str) -> float | str:
    """``--scaleInit``'s type: ``auto`` or a positive finite number."""
    try:
        value = text if text == "auto" else float(text)
    except ValueError:
        value = math.nan
    if value != "auto" and not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected auto or a positive number, got {text!r}")
    return value


def stage2_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IDeMe-Net stage 2: deformation meta-learning and evaluation",
                                     formatter_class=HelpFormatter)
    add_common_args(parser, None, CHUNK_HELP, "learning rate of the deformation sub-network and of the scale", 120,
                    "episodes of each per-epoch evaluation")
    add_gnet_flag(parser)
    parser.add_argument("--shots", type=int, default=1, help="support images per class")
    parser.add_argument("--ways", type=int, default=5, help="classes per val/test episode")
    parser.add_argument("--trainways", type=int, default=5, help="classes per training episode")
    parser.add_argument("--test_num", type=int, default=15, help="query images per class")
    add_gallery_flags(parser)
    parser.add_argument("--epoch", type=int, default=600, help="training episodes per epoch")
    parser.add_argument("--clsLR", type=float, default=1e-3,
                        help="learning rate of the fc (the embedding's is clsLR * 0.1)")
    parser.add_argument("--fixCls", type=int, default=0, choices=(0, 1), help="1: freeze the embedding and fc")
    parser.add_argument("--fixAttention", type=int, default=0, choices=(0, 1),
                        help="1: freeze the deformation sub-network")
    parser.add_argument("--fixScale", type=int, default=0, choices=(0, 1), help="1: freeze the distance scale")
    parser.add_argument("--scaleInit", type=scale_init, default=None,
                        help="initial distance scale of a new run: a positive number, or auto, 1 / the mean over the "
                        "first training episode's queries of the standard deviation of their squared distances to the "
                        "plain prototypes, so that each query's logits start with unit spread; a resume key (default: "
                        "the checkpoint's, 1 from a stage-1 --network as in the original)")
    add_deform_net_flag(parser)
    add_ablation_flags(parser)
    parser.add_argument("--galleryExclude", default="none", choices=GALLERY_EXCLUDE,
                        help="ablation: episode leaves the training episode's own classes out of the gallery "
                        "shortlists, so training sees what testing sees (none: the original)")
    parser.add_argument("--galleryBN", default="train", choices=GALLERY_BN,
                        help="the gallery pass before training or --evaluate: train, the original's (the embedding "
                        "in training mode, 128 images a call in 4 shares normalised each with its own batch "
                        "statistics, the running statistics updated by each call's first share and kept for "
                        "everything after); eval, the embedding in evaluation mode, its statistics untouched")
    parser.add_argument("--selectOn", default="val", choices=("val", "test"),
                        help="weights kept by best val accuracy, or (the original's protocol) lowest test loss "
                        "(refused with --lowshotmeta)")
    parser.add_argument("--testWeights", default="kept", choices=("kept", "last"),
                        help="weights of the final test evaluation: kept, those --selectOn kept (models/<name>.t7, "
                        "report evaluate_<K>shot_seed<S>.json); last, the last epoch's (report "
                        "evaluate_<K>shot_seed<S>_last.json); with --resume after the last epoch it only evaluates")
    parser.add_argument("--overlap", type=int, default=0, choices=(0, 1),
                        help="1: draw support and query independently, so they may overlap (the original's protocol)")
    parser.add_argument("--dataParallel", type=int, default=0, choices=(0, 1),
                        help="1: split each embedding chunk over all visible GPUs with DataParallel (0: --device "
                        "alone; chunks of 5 to 75 images usually run faster on one GPU)")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate --GNet on test episodes")
    parser.add_argument("--testEpisodes", type=int, default=600, help="test episodes of the final evaluation")
    return parser


def lowshot_parser() -> argparse.ArgumentParser:
    """The flags of ``lowshot_imagenet.py`` (the benchmark's own names where it has them)."""
    parser = argparse.ArgumentParser(description="IDeMe-Net on the ImageNet-1K low-shot benchmark "
                                     "(Hariharan & Girshick 2017): top-1/top-5 over five trials",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--imagenet", required=True, help="ILSVRC-2012 root holding train/<wnid>/ and val/<wnid>/ "
                        "(scripts/fold_imagenet_val.py makes val/ class folders)")
    add_lowshotmeta_flag(parser, required=True, use="its class split into base and novel classes")
    parser.add_argument("--experimentpath", required=True,
                        help="the trials' split files, with {:d} for the trial: 'splitfile_{:d}.json'")
    parser.add_argument("--trainlist", default=None, help="the release's train.json (image_names, image_labels), which "
                        "the split files index; without it the list is rebuilt as each class's files sorted by name, "
                        "so the shots differ from the benchmark's (a warning says so)")
    add_tensorname_flag(parser, "the evaluation: runs/<name>/")
    add_gnet_flag(parser)
    add_network_flag(parser, "for the baselines without a learned deformation (--deform none or random)")
    parser.add_argument("--testsetup", type=int, default=1, choices=(0, 1),
                        help="1: the test setup (novel_classes_2), after the validation setup that chooses the "
                        "prior; 0: the validation setup only")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="trials (split files) to run")
    parser.add_argument("--lowshotn", type=int, nargs="+", default=[1, 2, 5, 10, 20],
                        help="novel examples per class, n")
    add_gallery_flags(parser, per="example", one="n = 1")
    add_ablation_flags(parser)
    add_deform_net_flag(parser, "; it must be the --GNet checkpoint's")
    add_image_size_flag(parser, grid=True)
    add_batch_flag(parser)
    add_runtime_flags(parser, "the deformation draws")
    add_progress_flag(parser)
    return parser


# --- the typed configurations ---------------------------------------------------------------
# Built from the parsers: one frozen field per flag, named as the flag, so that ``dataclasses.asdict(config)``
# is the dict args.json and resume.pt record, and each flag is declared once (its default and help stay above).

def parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every flag's default, by flag name (None for a required flag)."""
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def flag_type(action: argparse.Action) -> Any:
    """The type of a flag's value: the parser's ``type`` (a function's return annotation), ``bool`` for a switch,
    else ``str``; a list for a flag of several values; optional when it may be left at a default of None."""
    kind = action.type or (bool if action.nargs == 0 else str)
    if not isinstance(kind, type):
        kind = get_type_hints(kind).get("return", Any)
    if action.nargs in ("+", "*"):
        kind = list[kind]
    return kind | None if action.default is None and not action.required else kind


def config_class(name: str, parser: argparse.ArgumentParser, doc: str) -> type:
    """A frozen dataclass with a typed field per flag of ``parser`` (:func:`flag_type`, in the parser's order; the
    defaults stay in the parser)."""
    fields = [(action.dest, flag_type(action)) for action in parser._actions if action.dest != "help"]
    return make_dataclass(name, fields, frozen=True,
                          namespace={"__doc__": doc, "__module__": __name__})  # picklable: to torchrun's ranks


Stage1Config = config_class("Stage1Config", stage1_parser(), "The flags of ``classification.py``, checked "
                            "(:func:`stage1_config`).")
Stage2Config = config_class("Stage2Config", stage2_parser(), "The flags of ``onlyBasetwoLoss.py``, filled and "
                            "checked (:func:`stage2_config`).")
LowShotConfig = config_class("LowShotConfig", lowshot_parser(), "The flags of ``lowshot_imagenet.py``, checked "
                             "(:func:`lowshot_eval_config`); ``augnum`` and ``chooseNum`` None for the defaults of "
                             "each n (:func:`shot_defaults`).")
TrainConfig = Stage1Config | Stage2Config


def stage1_config(**flags: Any) -> Stage1Config:
    """Stage 1's configuration: :func:`stage1_parser`'s defaults, then ``flags`` (by flag name), checked
    (:class:`OptionError` names a flag out of its range)."""
    config = Stage1Config(**{**parser_defaults(stage1_parser()), **flags})
    check_positive(config, "imageSize", "Fang", "batchSize", "numEpochs")
    if config.preciseBN < 0 or config.preciseBN == 1:
        raise OptionError(f"--preciseBN must be 0 (off) or at least 2 images, got {config.preciseBN}")
    if config.filesPerClass < 0:
        raise OptionError(f"--filesPerClass must be at least 0 (0: every file of each class), got "
                          f"{config.filesPerClass}")
    if config.imageSize < config.Fang:
        raise OptionError(f"--imageSize {config.imageSize} cannot hold a {config.Fang} x {config.Fang} grid")
    return config


def stage2_config(device: torch.device | None = None, /, **flags: Any) -> Stage2Config:
    """Stage 2's configuration: :func:`stage2_parser`'s defaults, then ``flags``, with the defaults of the
    shots (:func:`shot_defaults`) and of ``device`` (default: ``--device``'s) filled, checked likewise."""
    config = Stage2Config(**{**parser_defaults(stage2_parser()), **flags})
    augnum, choose_num = shot_defaults(config.shots)
    config = replace(config, augnum=augnum if config.augnum is None else config.augnum,
                     chooseNum=choose_num if config.chooseNum is None else config.chooseNum,
                     batchSize=forward_chunk(config.batchSize, device or resolve_device(config)))
    check_positive(config, "imageSize", "Fang", "batchSize", "shots", "ways", "trainways", "test_num", "augnum",
                   "chooseNum", "galleryNum", "epoch", "numEpochs", "valEpisodes", "testEpisodes")
    smallest = DEFORM_NETS[config.deformNet].min_image_size
    if config.imageSize < smallest:
        raise OptionError(f"--imageSize {config.imageSize} is too small for --deformNet {config.deformNet} "
                          f"(at least {smallest} px)")
    if config.imageSize < config.Fang:
        raise OptionError(f"--imageSize {config.imageSize} cannot hold a {config.Fang} x {config.Fang} grid")
    if config.GNet == "None" and config.network == "None":
        raise OptionError("--network (a stage-1 checkpoint) or --GNet (a stage-2 checkpoint) is required")
    if config.evaluate and config.GNet == "None":
        raise OptionError("--evaluate needs --GNet (the stage-2 checkpoint to evaluate)")
    if config.selectOn == "test" and config.lowshotmeta:
        raise OptionError("--selectOn test with --lowshotmeta would select stage 2's weights on the test setup's "
                          "novel classes of the ImageNet-1K low-shot benchmark; use --selectOn val (the validation "
                          "setup's)")
    if config.galleryExclude == "episode" and (config.deform == "none" or config.gallerySelect != "nearest"):
        raise OptionError("--galleryExclude episode acts on the nearest-gallery shortlists: it needs "
                          "--gallerySelect nearest and deformed images (--deform learned or random)")
    return config


def lowshot_eval_config(device: torch.device | None = None, /, **flags: Any) -> LowShotConfig:
    """The low-shot evaluation's configuration: :func:`lowshot_parser`'s defaults, then ``flags``, with the
    forward chunk of ``device`` (default: ``--device``'s) filled, checked likewise."""
    config = LowShotConfig(**{**parser_defaults(lowshot_parser()), **flags})
    config = replace(config, batchSize=forward_chunk(config.batchSize, device or resolve_device(config)))
    check_positive(config, "imageSize", "Fang", "batchSize", "galleryNum",
                   *(flag for flag in ("augnum", "chooseNum") if getattr(config, flag) is not None))
    for flag in ("trials", "lowshotn"):
        values = getattr(config, flag)
        if min(values) < 1 or len(set(values)) != len(values):
            raise OptionError(f"--{flag} {' '.join(map(str, values))}: expected distinct positive integers")
    if len(config.trials) > 1 and "{" not in config.experimentpath:
        raise OptionError(f"--experimentpath {config.experimentpath}: several --trials need a {{:d}} for the "
                          "trial number")
    if config.GNet == "None" and config.network == "None":
        raise OptionError("--GNet (a stage-2 checkpoint) or --network (a stage-1 checkpoint) is required")
    if config.deform == "learned" and config.GNet == "None":
        raise OptionError("--deform learned needs --GNet (a stage-2 checkpoint); with a stage-1 --network use "
                          "--deform none or random")
    if config.imageSize < DEFORM_NETS[config.deformNet].min_image_size and config.deform == "learned":
        raise OptionError(f"--imageSize {config.imageSize} is too small for --deformNet {config.deformNet}")
    return config
