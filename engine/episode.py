"""One stage-2 episode (docs/original.md §4.5, §4.6): gallery selection, deformed images, both losses."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datasets.gallery import Gallery
from datasets.transforms import prepare_images
from engine.features import FeatureCache
from engine.timing import NO_TIMER, Timer
from models.batchnorm import running_statistics_kept, running_variances
from models.deformation import blend_patches
from models.idemenet import IDeMeNet
from models.protonet import proto_logits, prototypes, squared_distances
from utils.errors import OptionError
from utils.forward import autocast, compute_layout, deform_in_chunks, embed_in_chunks
from utils.interrupt import check_stop

DEFORM_MODES = ("learned", "random", "none")
GALLERY_MODES = ("nearest", "random")
GALLERY_EXCLUDE = ("none", "episode")
GALLERY_BN = ("train", "eval")  # the gallery pass: the original's training-mode pass, or evaluation mode
GALLERY_CALL, GALLERY_SHARES = 128, 4  # the original's gallery pass: 128 images a call, DataParallel over 4 GPUs
# Class relation of a deformed image's gallery image to the episode (training episodes only): how many of
# "one of the episode's classes" and "the probe's own class" hold.
OTHER_CLASS, EPISODE_CLASS, SAME_CLASS = 0, 1, 2


@dataclass(frozen=True)
class EpisodeConfig:
    """How episodes are augmented (the draws, :class:`datasets.AugmentDraws`, read ``augnum`` and
    ``choose_num`` here): ``augnum`` deformed copies per support image; ``choose_num`` nearest gallery images
    kept per class; ``deform`` ``learned``, ``random`` (U(0,1) per cell) or ``none`` (a plain prototypical
    network); ``gallery_select`` ``nearest`` or ``random`` (whole gallery); ``gallery_exclude`` ``episode``
    leaves the episode's classes out of the shortlists (the original: ``none``); ``chunk`` images per forward
    call; ``amp`` bfloat16 autocast on CUDA."""

    ways: int
    augnum: int
    choose_num: int
    deform: str = "learned"
    gallery_select: str = "nearest"
    gallery_exclude: str = "none"
    chunk: int = 128
    amp: bool = False


@dataclass
class EpisodeResult:
    """What one episode produced; losses are float32 scalars (with graphs when training).

    Without deformation None: ``weights`` ``[N*augnum, F*F]``, ``deformed``, ``probes``, ``gallery_images``
    ``[N*augnum, 3, S, S]`` (normalised), ``gallery_index`` and ``deformed_labels`` ``[N*augnum]``, and
    ``own_distance``/``other_distance`` (mean squared distance of the deformed features to their class's plain
    prototype / the nearest other). Accuracies (fractions; ``plain_accuracy`` from the support alone) and
    distances are 0-dim float32 on the device: reading one waits for the GPU, so callers sum them there."""

    proto_loss: torch.Tensor
    cls_loss: torch.Tensor | None
    accuracy: torch.Tensor
    plain_accuracy: torch.Tensor
    weights: torch.Tensor | None
    deformed: torch.Tensor | None
    probes: torch.Tensor | None
    gallery_images: torch.Tensor | None
    gallery_index: torch.Tensor | None = None
    deformed_labels: torch.Tensor | None = None
    own_distance: torch.Tensor | None = None
    other_distance: torch.Tensor | None = None


class GalleryBank:
    """The gallery (:class:`datasets.Gallery`, uint8 ``[G, 3, S, S]``, labels ``[G]``) on the device with its
    float32 ``features`` ``[G, D]``, each image embedded once unflipped, as the original (the flip applies
    where an image is blended). ``batch_norm``: ``train`` (:func:`embed_gallery_train_mode`, which changes
    the BatchNorm running statistics; ``running_var_change`` is then the mean ``|new - old| / old`` of
    ``running_var``), ``eval`` or ``restored`` (``features`` given). Raises Interrupted on ``stop()``."""

    def __init__(self, gallery: Gallery, model: IDeMeNet, device: torch.device, chunk: int, amp: bool = False,
                 features: torch.Tensor | None = None, stop: Callable[[], bool] | None = None,
                 batch_norm: str = "eval") -> None:
        if batch_norm not in GALLERY_BN:
            raise ValueError(f"unknown gallery BatchNorm mode {batch_norm!r} (known: {', '.join(GALLERY_BN)})")
        self.gallery = gallery.to(device)
        self.batch_norm, self.running_var_change = ("restored" if features is not None else batch_norm), None
        if features is None and batch_norm == "train":
            before = running_variances(model.backbone)
            features = embed_gallery_train_mode(model, self.gallery, device, amp, stop)
            self.running_var_change = ((running_variances(model.backbone) - before).abs() / before).mean().item()
        elif features is None:
            with torch.no_grad(), autocast(device, amp):
                features = torch.cat([model.embed(images).float()
                                      for images in gallery_calls(self.gallery, chunk, device, stop)])
        self.features = features.to(device)

    def __len__(self) -> int:
        return len(self.gallery)


def embed_gallery_train_mode(model: IDeMeNet, gallery: Gallery, device: torch.device, amp: bool = False,
                             stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The original's gallery pass (docs/original.md §4.4) on one device: features ``[G, D]`` embedded in
    training mode. The original ran DataParallel over 4 GPUs: ``GALLERY_CALL`` images a call, scattered into
    ``GALLERY_SHARES`` shares (``torch.chunk`` sizes), each normalised with its own statistics, only the first
    share's update reaching the running statistics. So per call: the first share updates them, the others
    keep them. Raises OptionError for a share of one image, Interrupted on ``stop()`` (before each call)."""
    backbone, parts = model.backbone, []
    was_training = backbone.training
    backbone.train()
    try:
        with torch.no_grad(), autocast(device, amp):
            for images in gallery_calls(gallery, GALLERY_CALL, device, stop):
                shares = images.chunk(GALLERY_SHARES)
                parts.append(embed_share(model, shares[0]))
                with running_statistics_kept(backbone):
                    parts.extend(embed_share(model, share) for share in shares[1:])
    finally:
        backbone.train(was_training)
    return torch.cat(parts)


def gallery_calls(gallery: Gallery, size: int, device: torch.device,
                  stop: Callable[[], bool] | None) -> Iterator[torch.Tensor]:
    """The gallery's normalised images in order, ``size`` a call ``[size, 3, S, S]``; stop checked before each."""
    for start in range(0, len(gallery), size):
        check_stop(stop, "while embedding the gallery")
        yield compute_layout(gallery.batch(torch.arange(start, min(start + size, len(gallery)), device=device)))


def embed_share(model: IDeMeNet, share: torch.Tensor) -> torch.Tensor:
    """Float32 features ``[n, D]`` of one share ``[n, 3, S, S]`` of a training-mode gallery pass."""
    try:
        return model.embed(share).float()
    except ValueError as error:  # BatchNorm over a single value per channel
        raise OptionError(f"--galleryBN train: a share of {len(share)} gallery image(s) cannot be batch-normalised "
                          f"({error}); choose another --galleryNum or --galleryBN eval") from None


def select_gallery(protos: torch.Tensor, bank: GalleryBank, scale: torch.Tensor, config: EpisodeConfig,
                   owner: torch.Tensor, episode: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gallery index ``[N*augnum]`` of each deformed image (``owner`` ``[N*augnum]``: its class).
    ``nearest``: the episode's pick among the ``choose_num`` images of smallest ``scale * ||g - c||^2`` (``scale``
    without a graph) to the class's prototype (``protos`` ``[W, D]``; ``gallery_exclude="episode"`` leaves the
    episode's classes out); ``random``: the episode's pick over the whole gallery."""
    device = protos.device
    if config.gallery_select == "random":
        return episode["gallery_pick"].to(device)
    distances = scale * squared_distances(protos, bank.features)
    if config.gallery_exclude == "episode":
        excluded = torch.isin(bank.gallery.labels, episode["classes"].to(device))
        distances = distances.masked_fill(excluded, float("inf"))
    shortlist = torch.topk(distances, config.choose_num, dim=1, largest=False).indices
    return shortlist[owner, episode["shortlist_pick"].to(device)]


# Episode keys kept on the host: images (prepare_images copies them), ids (host-side caches), index (messages).
HOST_KEYS = ("support", "query", "support_ids", "query_ids", "index")


def episode_on_device(episode: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The episode with all but :data:`HOST_KEYS` copied to ``device`` without waiting (pinned on CUDA)."""
    return {key: value if key in HOST_KEYS else value.to(device, non_blocking=True) for key, value in episode.items()}


def run_episode(model: IDeMeNet, episode: dict[str, torch.Tensor], bank: GalleryBank | None, config: EpisodeConfig,
                device: torch.device, train_cls: bool = False, track_grad: bool = False,
                embed: Callable[[torch.Tensor], torch.Tensor] | None = None, timer: Timer = NO_TIMER,
                cache: FeatureCache | None = None) -> EpisodeResult:
    """Forward one episode (an :class:`datasets.EpisodeDataset` item with draws); nothing waits for the GPU.

    ``train_cls``: also the classification loss over the augmented support, with a graph through the
    embedding (``episode["classes"]`` base-class ids); ``track_grad``: graphs for the prototype loss;
    ``embed``: ``model.embed`` by default; ``cache``: features by image (no ``query`` pixels needed, the
    ``support`` ones only to deform them)."""
    embed = embed or model.embed
    with timer.section("prepare"):
        episode = episode_on_device(episode, device)
        support = prepare_images(episode["support"], device) if "support" in episode else None
        query = prepare_images(episode["query"], device) if cache is None else None
        labels, query_labels = episode["support_labels"], episode["query_labels"]
    if train_cls:  # one pass, with a graph for the classification loss; its numbers are the plain pass's
        with timer.section("embed_support_grad"), torch.enable_grad(), autocast(device, config.amp):
            support_grad = embed_in_chunks(embed, support, config.chunk)
    with timer.section("embed_plain"), torch.no_grad(), autocast(device, config.amp):
        if cache is None:
            support_features = support_grad.detach() if train_cls else embed_in_chunks(embed, support, config.chunk)
            query_features = embed_in_chunks(embed, query, config.chunk)
        else:
            support_features = cache.lookup(episode["support_ids"], episode.get("support"))
            query_features = cache.lookup(episode["query_ids"], episode.get("query"))
    with timer.section("losses"):
        plain_protos = prototypes(support_features, labels, config.ways)
        plain_scale = model.scale.detach()
        plain_logits = proto_logits(query_features, plain_protos, plain_scale)
        plain_accuracy = (plain_logits.argmax(1) == query_labels).float().mean()

    weights = deformed = probes = others = gallery_index = owner = own_distance = other_distance = None
    with torch.set_grad_enabled(track_grad or train_cls):
        features, feature_labels = [support_grad if train_cls else support_features], [labels]
        if config.deform != "none":
            owner = labels.repeat_interleave(config.augnum)
            with timer.section("select"):
                gallery_index = select_gallery(plain_protos, bank, plain_scale, config, owner, episode)
            deformed, weights, probes, others, deformed_features = deform_support(
                model, support, gallery_index, episode, bank, config, device, embed, timer,
                embed_whole=track_grad and not train_cls)
            features.append(deformed_features)
            feature_labels.append(owner)
        with timer.section("losses"):
            if owner is not None:
                own_distance, other_distance = prototype_distances(features[-1].detach(), owner, plain_protos)
            features, feature_labels = torch.cat(features), torch.cat(feature_labels)
            logits = proto_logits(query_features, prototypes(features, feature_labels, config.ways), model.scale)
            proto_loss = F.cross_entropy(logits, query_labels)
            cls_loss = None
            if train_cls:
                base_labels = episode["classes"][feature_labels]
                cls_loss = F.cross_entropy(model.classify(features).float(), base_labels)
            accuracy = (logits.argmax(1) == query_labels).float().mean()
    return EpisodeResult(proto_loss, cls_loss, accuracy, plain_accuracy,
                         None if weights is None else weights.detach().float(),
                         None if deformed is None else deformed.detach(), probes, others, gallery_index, owner,
                         own_distance, other_distance)


def deform_support(model: IDeMeNet, support: torch.Tensor, gallery_index: torch.Tensor, draws: dict[str, torch.Tensor],
                   bank: GalleryBank, config: EpisodeConfig, device: torch.device,
                   embed: Callable[[torch.Tensor], torch.Tensor], timer: Timer = NO_TIMER, embed_whole: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``augnum`` deformed copies of each normalised support image ``[n, 3, S, S]`` and their features: row
    ``i * augnum + j`` blends image i (flipped where ``probe_flip``) with gallery image ``gallery_index[row]``
    (flipped where ``gallery_flip``) by the network's weights or ``random_weights``. Returns (deformed,
    weights ``[n*augnum, F*F]``, probes, gallery images, features ``[n*augnum, D]``).

    ``embed_whole``: one embedding call instead of chunks, for the prototype loss alone (each image's gradient
    is its own: the same numbers in fewer operations); the classification loss keeps the chunks, as its weight
    gradient summed per chunk rounds differently."""
    with timer.section("gallery_batch"):
        probes = support.repeat_interleave(config.augnum, dim=0)
        probes = torch.where(draws["probe_flip"].to(device).view(-1, 1, 1, 1), probes.flip(-1), probes)
        others = bank.gallery.batch(gallery_index, draws["gallery_flip"].to(device))
    with autocast(device, config.amp):
        with timer.section("deform"):
            if config.deform == "learned":
                deformed, weights = deform_in_chunks(model.deform, probes, others, config.chunk)
            else:
                weights = draws["random_weights"].to(device)
                deformed = blend_patches(probes, others, weights)
        with timer.section("embed_deformed"):
            features = embed_in_chunks(embed, compute_layout(deformed), len(deformed) if embed_whole else config.chunk)
    return deformed, weights, probes, others, features


def prototype_distances(features: torch.Tensor, labels: torch.Tensor,
                        protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared distance (0-dim) of ``features`` ``[M, D]`` to their class's prototype (``labels`` ``[M]``
    into ``protos`` ``[W, D]``) and to the nearest other one (nan when W = 1)."""
    distances = squared_distances(features, protos)
    own = distances.gather(1, labels.unsqueeze(1)).squeeze(1)
    if protos.shape[0] == 1:
        return own.mean(), torch.full((), float("nan"), dtype=own.dtype, device=own.device)
    return own.mean(), distances.scatter(1, labels.unsqueeze(1), float("inf")).min(1).values.mean()


def gallery_relation(result: EpisodeResult, gallery_labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per deformed image ``[N*augnum]``: ``SAME_CLASS``, ``EPISODE_CLASS`` or ``OTHER_CLASS`` (its gallery image's
    class to the probe's); ``classes`` ``[W]`` and ``gallery_labels`` ``[G]`` number one split (training only)."""
    picked = gallery_labels[result.gallery_index]
    classes = classes.to(picked.device)
    return torch.isin(picked, classes).long() + (picked == classes[result.deformed_labels])


def episode_gradients(result: EpisodeResult, meta_params: list[torch.nn.Parameter],
                      cls_params: list[torch.nn.Parameter], scaler: torch.amp.GradScaler | None = None) -> None:
    """Fill ``.grad``: the prototype loss's for ``meta_params``, the classification loss's for ``cls_params``."""
    scale = (lambda loss: loss) if scaler is None else scaler.scale
    if meta_params:
        scale(result.proto_loss).backward(inputs=meta_params,
                                          retain_graph=bool(cls_params and result.cls_loss is not None))
    if cls_params and result.cls_loss is not None:
        scale(result.cls_loss).backward(inputs=cls_params)
