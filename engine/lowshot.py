"""The ImageNet-1K low-shot evaluation (``lowshot_imagenet.py``): the benchmark's images embedded once
into float16 feature files, then per setup, trial and n (each such step's metrics saved on disk):
n-shot prototypes of the novel classes with and without deformed examples, base-class prototypes from
every training image, and the benchmark's metrics (:mod:`utils.lowshot_metrics`)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.episodes import AugmentDraws, CroppedImages
from datasets.gallery import gallery_files
from datasets.loaders import image_loader
from datasets.lowshot import (
    RECONSTRUCTION_WARNING,
    SETUPS,
    LowShotMeta,
    TrainList,
    benchmark_split,
    class_images,
    read_lowshot_meta,
    read_train_list,
    read_trial,
    rebuild_train_list,
    shot_indices,
)
from datasets.seeding import item_rng
from datasets.splits import Split
from datasets.transforms import prepare_images
from engine.episode import EpisodeConfig, GalleryBank, deform_support, select_gallery
from engine.options import LowShotConfig, shot_defaults
from models.idemenet import IDeMeNet
from models.protonet import prototypes
from utils.checkpoint import atomic_save, safe_load
from utils.distributed import DistInfo, all_reduce_sum
from utils.errors import DataError, OptionError
from utils.files import finite_or_null, write_json
from utils.forward import autocast, embed_in_chunks
from utils.interrupt import Interrupted, check_stop
from utils.lowshot_metrics import METRIC_NAMES, TOPK, best_prior, curve_accuracy, lowshot_metrics, prior_curve
from utils.metrics import mean_t_ci95

FEATURE_BLOCK = 2048  # images per feature file
DISTANCE_BUDGET = 2 ** 26  # floats of one gallery-distance computation (256 MB)
LOWSHOT_STREAM = 3  # item_rng stream of the deformation draws (0-2: the stages' episodes)
VARIANTS = ("plain", "deformed")


def state_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def list_digest(files: list[Path]) -> str:
    """A digest of an image list by ``<wnid>/<file>`` names (the tree may move)."""
    return hashlib.sha256("\n".join(f"{p.parent.name}/{p.name}" for p in files).encode()).hexdigest()


class FeatureStore:
    """Embedding features ``[N, D]`` of ``files`` (evaluation crops), kept in ``folder`` as float16 files of
    ``block`` images (``block_00000.pt``, ...), each written atomically: a finished block is never computed
    again, so an interrupted extraction resumes where it stopped. A ``manifest.json`` names the image list
    and size; a folder made for another one is refused by every process that opens it (so all of them
    refuse it together); only one process writes the manifest (``create``)."""

    def __init__(self, folder: Path, files: list[Path], image_size: int, block: int = FEATURE_BLOCK,
                 create: bool = True) -> None:
        self.folder, self.files, self.image_size, self.block = Path(folder), list(files), image_size, block
        self.blocks = range(-(-len(self.files) // block))
        manifest = {"images": len(self.files), "image_size": image_size, "block": block,
                    "files_sha256": list_digest(self.files)}
        path = self.folder / "manifest.json"
        if path.is_file():
            if json.loads(path.read_text()) != manifest:
                raise DataError(f"{path}: these features belong to another image list or size; delete "
                                f"{self.folder} to recompute them")
        elif create:
            write_json(path, manifest)

    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.pt"

    def block_files(self, index: int) -> list[Path]:
        """The images of block ``index`` (``block`` of them, fewer in the last one)."""
        return self.files[index * self.block:(index + 1) * self.block]

    def missing(self) -> list[int]:
        """The blocks not on disk yet."""
        return [b for b in self.blocks if not self.block_path(b).is_file()]

    @torch.no_grad()
    def extract(self, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device, chunk: int, workers: int,
                amp: bool, info: DistInfo, stop: Callable[[], bool] | None, progress: bool, desc: str,
                missing: list[int] | None = None) -> None:
        """Embed this process's share of the ``missing`` blocks (rank r: the r-th, (r + W)-th, ... of them; each
        image decoded once by ``workers`` processes), ``chunk`` images a step. Under distribution every rank
        calls this with the same ``missing`` (read by all of them before any writes) and runs as many steps as
        the largest share has batches; after each step they agree whether a stop was asked (one all-reduce).

        Raises:
            Interrupted: ``stop()`` became true in some process; the blocks finished by then are kept.
        """
        missing = self.missing() if missing is None else missing
        shares = [missing[rank::info.world_size] for rank in range(info.world_size)]
        steps = max(-(-sum(len(self.block_files(b)) for b in share) // chunk) for share in shares)
        mine = shares[info.rank]
        files = [f for b in mine for f in self.block_files(b)]
        batches = iter(image_loader(CroppedImages(files, self.image_size), chunk, workers, device) if files else ())
        parts = []  # features ``[n, D]`` of the images after the last saved block
        with tqdm(total=len(files), desc=f"{desc} features", disable=not progress, leave=False, unit="img") as bar:
            for _ in range(steps):
                batch = next(batches, None)  # None: this share is done, the others are not
                if batch is not None:
                    with autocast(device, amp):
                        parts.append(embed_in_chunks(embed, prepare_images(batch, device), chunk).half().cpu())
                    bar.update(len(batch))
                while mine and sum(map(len, parts)) >= len(self.block_files(mine[0])):
                    done, size = torch.cat(parts), len(self.block_files(mine[0]))
                    atomic_save(done[:size].clone(), self.block_path(mine.pop(0)))
                    parts = [done[size:]]
                stopped_here = stop is not None and stop()
                if all_reduce_sum([float(stopped_here)], device, info)[0] > 0:
                    other = "" if stopped_here else "another process was stopped; "
                    raise Interrupted(f"while extracting the {desc} features ({other}finished blocks are kept)")

    def load(self) -> torch.Tensor:
        """Every block, concatenated: float16 ``[N, D]``."""
        if self.missing():
            raise DataError(f"{self.block_path(self.missing()[0])}: feature block missing")
        return torch.cat([safe_load(self.block_path(b)) for b in self.blocks])


# The flags a step's numbers depend on, besides the network, the feature files and its n-shot images.
TRIAL_FLAGS = ("imageSize", "Fang", "amp", "seed", "deform", "gallerySelect", "galleryNum", "deformNet", "augnum",
               "chooseNum")


class TrialStore:
    """The finished steps (setup, trial, n) of an evaluation, one file each in ``folder``
    (``<setup>_trial<t>_n<n>.pt``, written atomically) with the settings they were computed with: a stopped
    evaluation continues after its last finished step, and a step saved with other settings is computed
    again. The settings: the network's weights, the feature files (named by their image lists),
    :data:`TRIAL_FLAGS` and the step's n-shot images. ``computed`` lists the steps this process computed."""

    def __init__(self, folder: Path, model: IDeMeNet, stores: dict[str, FeatureStore], config: LowShotConfig) -> None:
        self.folder, self.computed = Path(folder), []
        self.settings = {"network": state_digest(model), "features": sorted(s.folder.name for s in stores.values()),
                         **{flag: getattr(config, flag) for flag in TRIAL_FLAGS}}

    def path(self, setup: str, trial: int, n: int) -> Path:
        return self.folder / f"{setup}_trial{trial}_n{n}.pt"

    def load(self, setup: str, trial: int, n: int, shots: str) -> dict | None:
        """The step's metrics per variant when saved with these settings and n-shot images (``shots``, their
        digest), else None."""
        path = self.path(setup, trial, n)
        saved = safe_load(path) if path.is_file() else None
        return saved["metrics"] if saved and saved["settings"] == {**self.settings, "shots": shots} else None

    def save(self, setup: str, trial: int, n: int, shots: str, metrics: dict) -> None:
        atomic_save({"settings": {**self.settings, "shots": shots}, "metrics": metrics}, self.path(setup, trial, n))
        self.computed.append((setup, trial, n))


@dataclass(frozen=True)
class SetupData:
    """One setup's classes (``label_names`` indices; score columns are base then novel), its test images (the
    ILSVRC val images of these classes, class by class in column order) and their columns, long ``[M]``."""

    name: str
    base: tuple[int, ...]
    novel: tuple[int, ...]
    test_files: tuple[Path, ...]
    targets: torch.Tensor


def setup_data(val_dir: Path, meta: LowShotMeta, name: str) -> SetupData:
    base, novel = (meta.lists[key] for key in SETUPS[name])
    per_class = class_images(val_dir, [meta.label_names[k] for k in base + novel], meta)
    targets = torch.tensor([column for column, files in enumerate(per_class) for _ in files], dtype=torch.long)
    return SetupData(name, base, novel, tuple(f for files in per_class for f in files), targets)


def test_scores(test_features: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor, device: torch.device,
                chunk: int = 4096) -> torch.Tensor:
    """``-scale * ||x - p||^2`` of float16 test features ``[M, D]`` against prototypes ``[C, D]`` -> ``[M, C]``
    (matrix-product distances, in chunks of test images)."""
    parts = [torch.cdist(test_features[i:i + chunk].to(device).float(), protos,
                         compute_mode="use_mm_for_euclid_dist").pow(2) for i in range(0, len(test_features), chunk)]
    return -scale.detach() * torch.cat(parts)


def _rows(draws: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in draws.items()}


def shortlisted_gallery(plain: torch.Tensor, bank: GalleryBank, scale: torch.Tensor, config: EpisodeConfig,
                        shots: int, draws: dict[str, torch.Tensor], budget: int = DISTANCE_BUDGET) -> torch.Tensor:
    """Gallery index ``[N*shots*augnum]`` of every deformed copy (:func:`engine.episode.select_gallery`,
    stage 2's selection) for N classes with prototypes ``plain`` ``[N, D]``, a few classes at a time so
    that the distance computation holds at most ``budget`` floats (classes x gallery x D)."""
    per_class = shots * config.augnum
    step = max(1, budget // (len(bank) * plain.shape[1]))
    parts = []
    for first in range(0, len(plain), step):
        count = min(step, len(plain) - first)
        owner = torch.arange(count, device=plain.device).repeat_interleave(per_class)
        parts.append(select_gallery(plain[first:first + count], bank, scale, config, owner,
                                    _rows(draws, slice(first * per_class, (first + count) * per_class))))
    return torch.cat(parts)


@torch.no_grad()
def deformed_prototypes(model: IDeMeNet, bank: GalleryBank, support_files: list[Path], support: torch.Tensor,
                        shots: int, config: EpisodeConfig, draws: dict[str, torch.Tensor], device: torch.device,
                        workers: int, image_size: int) -> torch.Tensor:
    """Prototypes ``[N, D]`` of N classes from their ``shots`` support features each (``support``
    ``[N*shots, D]``, class by class) and ``config.augnum`` deformed copies of every support image;
    each class's gallery shortlist comes from its plain prototype, as in stage 2. The support images
    are decoded by ``workers`` processes and deformed ``config.chunk`` images or so at a time."""
    classes = len(support) // shots
    labels = torch.arange(classes, device=device).repeat_interleave(shots)
    plain = prototypes(support, labels, classes)
    gallery_index = shortlisted_gallery(plain, bank, model.scale.detach(), config, shots, draws)
    features, done = [support], 0
    for images in image_loader(CroppedImages(support_files, image_size), max(1, config.chunk // shots) * shots,
                               workers, device):
        rows = slice(done * config.augnum, (done + len(images)) * config.augnum)
        features.append(deform_support(model, prepare_images(images, device), gallery_index[rows],
                                       _rows(draws, rows), bank, config, device, model.embed)[-1])
        done += len(images)
    return prototypes(torch.cat(features), torch.cat([labels, labels.repeat_interleave(config.augnum)]), classes)


def trial_metrics(scores: torch.Tensor, targets: torch.Tensor, num_base: int) -> dict:
    """One trial's metrics without the prior, and the prior's hits over the temperature and ``mu``
    grids (``prior_curve``) out of ``test_images``."""
    return {**lowshot_metrics(scores, targets, num_base), "prior_curve": prior_curve(scores, targets, num_base),
            "test_images": len(targets)}


Prior = tuple[float, float]  # (temperature, mu) of the all_prior metric


def metric_value(trial: dict, metric: str, k: int, prior: Prior) -> float:
    """A trial's top-``k`` ``metric`` in %, ``all_prior`` read off its curve at ``prior``."""
    if metric != "all_prior":
        return trial[metric][k]
    return curve_accuracy(trial["prior_curve"], *prior, trial["test_images"])[k]


def summarise(per_trial: list[dict], prior: Prior) -> dict:
    """Mean and 95% t-interval over trials of every metric (``all_prior`` at ``prior``), with the trials' values."""
    return _summaries(lambda metric, k: [metric_value(t, metric, k, prior) for t in per_trial])


def difference(deformed: list[dict], plain: list[dict], prior_deformed: Prior, prior_plain: Prior) -> dict:
    """The paired per-trial difference deformed - plain of every metric, summarised like :func:`summarise`."""
    def paired(metric: str, k: int) -> list[float]:
        return [metric_value(d, metric, k, prior_deformed) - metric_value(p, metric, k, prior_plain)
                for d, p in zip(deformed, plain)]

    return _summaries(paired)


def _summaries(trial_values: Callable[[str, int], list[float]]) -> dict:
    """Per metric and top-k, of its ``trial_values``: ``mean`` and ``t_ci95`` (the 95% Student t half-interval over
    the trials, :func:`utils.metrics.mean_t_ci95`), and the trials' values; None where a number is undefined (the
    interval of one trial), so the report is JSON."""
    def summary(values: list[float]) -> dict:
        return finite_or_null(dict(zip(("mean", "t_ci95"), mean_t_ci95(values)), trials=values))

    return {metric: {f"top{k}": summary(trial_values(metric, k)) for k in TOPK} for metric in METRIC_NAMES}


def choose_priors(per_trial: dict[str, dict[int, list[dict]]]) -> dict[str, dict[int, Prior]]:
    """Per variant and n, the ``(temperature, mu)`` with the best mean ``all_prior`` top-5 over the trials."""
    return {variant: {n: best_prior([t["prior_curve"] for t in trials]) for n, trials in by_n.items()}
            for variant, by_n in per_trial.items()}


def lowshot_config(config: LowShotConfig, shots: int, ways: int) -> EpisodeConfig:
    """The deformation settings for n = ``shots``: ``--augnum``/``--chooseNum``, or stage 2's
    defaults for that number of shots (:func:`engine.options.shot_defaults`)."""
    augnum, choose_num = shot_defaults(shots)
    return EpisodeConfig(ways, augnum if config.augnum is None else config.augnum,
                         choose_num if config.chooseNum is None else config.chooseNum, deform=config.deform,
                         gallery_select=config.gallerySelect, gallery_exclude="none", chunk=config.batchSize,
                         amp=bool(config.amp))


@dataclass
class Benchmark:
    """Everything read from the files before any network runs (checked: bad inputs stop here)."""

    meta: LowShotMeta
    images: TrainList
    trials: dict[int, np.ndarray]
    setups: dict[str, SetupData]
    base_classes: list[int]
    novel_rows: np.ndarray  # sorted train-list indices of the trials' n-shot images of both setups' novel classes
    gallery_split: Split | None  # the base classes' training images the gallery is drawn from (None: --deform none)


def read_benchmark(config: LowShotConfig) -> Benchmark:
    """The class split, training list, trials and setups, each checked whole, and the gallery's size against
    ``--galleryNum`` and ``--chooseNum``.

    Raises:
        DataError, OptionError: the first bad input, before anything is computed or written.
    """
    meta, imagenet = read_lowshot_meta(config.lowshotmeta), Path(config.imagenet)
    for folder in ("train", "val"):
        if not (imagenet / folder).is_dir():
            raise DataError(f"{imagenet / folder}: folder not found (--imagenet must hold train/ and val/ class "
                            "folders)")
    images = (read_train_list(config.trainlist, imagenet / "train", meta) if config.trainlist
              else rebuild_train_list(imagenet / "train", meta))
    trials = {t: read_trial(config.experimentpath.format(t), meta, images, max(config.lowshotn))
              for t in config.trials}
    setups = {name: setup_data(imagenet / "val", meta, name)
              for name in (("val", "test") if config.testsetup else ("val",))}
    novel = sorted(meta.lists["novel_classes_1"] + meta.lists["novel_classes_2"])
    novel_rows = np.unique(np.concatenate([trial[novel].ravel() for trial in trials.values()]))
    gallery_split = None
    if config.deform != "none":
        gallery_split = benchmark_split(imagenet, meta, "train")
        gallery_size = len(gallery_files(gallery_split, config.galleryNum))
        choose = {n: lowshot_config(config, n, 0).choose_num for n in config.lowshotn}
        largest = max(choose.values())
        if config.gallerySelect == "nearest" and largest > gallery_size:
            if config.chooseNum is not None:
                raise OptionError(f"--chooseNum {largest} is larger than the {gallery_size}-image gallery")
            raise OptionError(f"--galleryNum {config.galleryNum} makes a {gallery_size}-image gallery, fewer than "
                              f"the {largest} nearest images the default --chooseNum takes for n = "
                              f"{min(n for n in config.lowshotn if choose[n] == largest)}; give a larger "
                              "--galleryNum or a smaller --chooseNum")
    return Benchmark(meta, images, trials, setups, sorted(meta.lists["base_classes"]), novel_rows, gallery_split)


def feature_stores(bench: Benchmark, folder: Path, image_size: int, create: bool) -> dict[str, FeatureStore]:
    """The stores of every base class's training images, the trials' n-shot images of every novel class and
    each setup's test images, each in a folder named by its list (another list gets another folder)."""
    lists = {"base_train": [f for k in bench.base_classes for f in bench.images.class_files(k)],
             "novel_train": [bench.images.files[i] for i in bench.novel_rows],
             **{f"test_{name}": list(setup.test_files) for name, setup in bench.setups.items()}}
    return {name: FeatureStore(folder / f"{name}_{list_digest(files)[:12]}", files, image_size, create=create)
            for name, files in lists.items()}


def evaluate_setup(bench: Benchmark, setup: SetupData, model: IDeMeNet, bank: GalleryBank | None,
                   features: dict[str, torch.Tensor], config: LowShotConfig, device: torch.device,
                   stop: Callable[[], bool] | None, trials: TrialStore) -> dict[str, dict[int, list[dict]]]:
    """Per variant (``plain``, and ``deformed`` unless ``--deform none``) and n, each trial's
    :func:`trial_metrics`; the variants of a trial share its n-shot sets. A step (trial, n) that
    ``trials`` holds is read from it, every other one computed and saved there."""
    per_class = features["base_train"].split([len(bench.images.class_files(k)) for k in bench.base_classes])
    base = dict(zip(bench.base_classes, per_class))
    base_protos = torch.stack([base[k].to(device).float().mean(0) for k in setup.base])
    test, targets, ways = features[f"test_{setup.name}"], setup.targets.to(device), len(setup.novel)
    out = {variant: {n: [] for n in config.lowshotn} for variant in (VARIANTS if bank is not None else ("plain",))}
    steps = [(t, n) for t in config.trials for n in config.lowshotn]
    for t, n in tqdm(steps, desc=f"{setup.name} setup", disable=not config.progress, leave=False):
        index = shot_indices(bench.trials[t], setup.novel, n).reshape(-1)
        files = [bench.images.files[i] for i in index]
        shots = list_digest(files)
        metrics = trials.load(setup.name, t, n, shots)
        if metrics is None:
            support = features["novel_train"][np.searchsorted(bench.novel_rows, index)].to(device).float()
            protos = {"plain": prototypes(support, torch.arange(ways, device=device).repeat_interleave(n), ways)}
            if bank is not None:
                episode = lowshot_config(config, n, ways)
                rng = item_rng(config.seed, LOWSHOT_STREAM, list(SETUPS).index(setup.name), t, n)
                draws = AugmentDraws(episode, len(bank), config.Fang ** 2).draw(rng, len(index))
                protos["deformed"] = deformed_prototypes(model, bank, files, support, n, episode, draws, device,
                                                         config.nthreads, config.imageSize)
            metrics = {variant: trial_metrics(test_scores(test, torch.cat([base_protos, novel]), model.scale, device),
                                              targets, len(setup.base)) for variant, novel in protos.items()}
            trials.save(setup.name, t, n, shots, metrics)
        for variant, values in metrics.items():
            out[variant][n].append(values)
        check_stop(stop, f"in the {setup.name} setup, after trial {t}, n = {n}")
    return out


INTERVAL = ("mean +- 95% Student t-interval over the trials: t(0.975, trials - 1) * sample std / sqrt(trials) "
            "(none for one trial)")
PAPER_NOVEL_TOP5 = {1: 60.1, 2: 69.6, 5: 77.4, 10: 80.2}  # IDeMe-Net, CVPR 2019, Table 2 (test setup)
METHOD_NAMES = {"plain": "prototypes (no deformation)", "deformed": "IDeMe-Net (deformed examples)",
                "difference": "difference (paired)"}


def report(bench: Benchmark, results: dict[str, dict], config: LowShotConfig, timing: dict) -> dict:
    """The JSON report: every metric per setup, variant and n (mean, 95% t-interval, trials), the paired
    differences, and the prior's temperature and ``mu`` chosen on the validation setup."""
    priors = choose_priors(results["val"])
    setups = {}
    for name, per_variant in results.items():
        s = bench.setups[name]
        setups[name] = {"base_classes": len(s.base), "novel_classes": len(s.novel), "test_images": len(s.test_files),
                        **{variant: {str(n): summarise(trials, priors[variant][n]) for n, trials in by_n.items()}
                           for variant, by_n in per_variant.items()}}
        if "deformed" in per_variant:
            setups[name]["difference"] = {str(n): difference(per_variant["deformed"][n], per_variant["plain"][n],
                                                             priors["deformed"][n], priors["plain"][n])
                                          for n in config.lowshotn}
    episodes = {n: lowshot_config(config, n, 0) for n in config.lowshotn}
    chosen = "val setup" + ("" if config.testsetup else " (the setup reported: run --testsetup 1 for a prior chosen "
                                                       "apart from the test)")
    return {"benchmark": "ImageNet-1K low-shot (Hariharan & Girshick, ICCV 2017)",
            "lowshotmeta": str(bench.meta.path), "train_list": bench.images.source,
            "train_list_reconstructed": bench.images.reconstructed,
            "train_list_warning": RECONSTRUCTION_WARNING if bench.images.reconstructed else None,
            "checkpoint": config.GNet if config.GNet != "None" else config.network, "deform": config.deform,
            "trials": config.trials, "lowshotn": config.lowshotn, "interval": INTERVAL,
            "augnum": {str(n): episode.augnum for n, episode in episodes.items()},
            "chooseNum": {str(n): episode.choose_num for n, episode in episodes.items()},
            **{f"prior_{field}": {variant: {str(n): prior[i] for n, prior in by_n.items()}
                                  for variant, by_n in priors.items()} for i, field in ((1, "mu"), (0, "temperature"))},
            "prior_chosen_on": chosen, "setups": setups, "timing": timing}


def table_rows(result: dict) -> list[dict]:
    """The report flattened to CSV rows (setup, method, metric, n, top-1/top-5 mean and interval)."""
    return [{"setup": setup, "method": method, "metric": metric, "n": int(n),
             **{f"{k}{suffix}": values[k][field] for k in ("top1", "top5")
                for suffix, field in (("", "mean"), ("_t_ci95", "t_ci95"))},
             **{f"prior_{field}": result[f"prior_{field}"].get(method, {}).get(n) if metric == "all_prior" else None
                for field in ("mu", "temperature")},
             "train_list_reconstructed": result["train_list_reconstructed"]}
            for setup, data in result["setups"].items() for method in METHOD_NAMES
            for n, metrics in data.get(method, {}).items() for metric, values in metrics.items()]


def format_table(result: dict) -> str:
    """The paper's table (top-5 on the novel classes, test setup when run) and every metric below it."""
    setup = "test" if "test" in result["setups"] else "val"
    data, ns = result["setups"][setup], [str(n) for n in result["lowshotn"]]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:34}" + "".join(cell.rjust(16) for cell in cells)

    def cell(values: dict) -> str:
        interval = f" +- {values['t_ci95']:4.2f}" if values["t_ci95"] is not None else ""
        return f"{values['mean']:6.2f}{interval}"

    header = row("", [f"n={n}" for n in ns])
    train_list = "reconstructed" if result["train_list_reconstructed"] else "from the release"
    lines = [f"ImageNet-1K low-shot, {setup} setup ({data['novel_classes']} novel, {data['base_classes']} base "
             f"classes, {data['test_images']} test images), {len(result['trials'])} trial(s), mean +- 95% t-interval, "
             f"train list {train_list}", "", "top-5 accuracy on the novel classes (%)", header]
    lines += [row(label, [cell(data[method][n]["novel"]["top5"]) for n in ns])
              for method, label in METHOD_NAMES.items() if method in data]
    lines += [row("IDeMe-Net, paper (Table 2)", [f"{PAPER_NOVEL_TOP5[int(n)]:.1f}" if int(n) in PAPER_NOVEL_TOP5
                                                 else "-" for n in ns]),
              "(our reading of the paper's number: novel test images ranked over the novel classes; over base + "
              "novel classes it is novel_joint below)", ""]
    for method in (m for m in VARIANTS if m in data):
        lines += [f"{METHOD_NAMES[method]}: top-1 / top-5 (%)", header]
        for metric in METRIC_NAMES:
            values = [data[method][n][metric] for n in ns]
            lines.append(row(metric, [f"{v['top1']['mean']:6.2f} / {v['top5']['mean']:5.2f}" for v in values]))
        temperature, mu = result["prior_temperature"][method], result["prior_mu"][method]
        lines += [row("all_prior: temperature, mu", [f"{temperature[n]:g}, {mu[n]:.2f}" for n in ns]), ""]
    lines.append(f"intervals: {result['interval']}; all_prior's temperature and mu chosen on the "
                 f"{result['prior_chosen_on']}")
    if result["train_list_warning"]:
        lines.append(f"warning: {result['train_list_warning']}")
    return "\n".join(lines)
