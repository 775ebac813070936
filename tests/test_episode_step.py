"""Tests for one stage-2 episode (docs/original.md §4.5 to §4.7): gallery selection, the prototype and
classification losses against a hand computation, and which parameters one training step
changes for each combination of flags."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import engine.stage2 as stage2
from conftest import EPISODE_SIZE, make_episode, make_gallery, normalise, uint8_images
from engine.episode import EpisodeConfig, GalleryBank, run_episode
from engine.options import CPU_CHUNK, CUDA_CHUNK, stage2_config, stage2_parser
from models import EmbeddingNet, IDeMeNet

CPU = torch.device("cpu")
SIZE = EPISODE_SIZE


def hand_blend(probe: torch.Tensor, gallery: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W painted on the F x F cells (boundaries i * (S // F), last cell to S), then W*A + (1-W)*B."""
    n, _, size, _ = probe.shape
    fang = int(round(weights.shape[1] ** 0.5))
    edges = [i * (size // fang) for i in range(fang)] + [size]
    rows = []
    for i in range(fang):
        cols = []
        for j in range(fang):
            h, w = edges[i + 1] - edges[i], edges[j + 1] - edges[j]
            cols.append(weights[:, i * fang + j].view(n, 1, 1, 1).expand(n, 1, h, w))
        rows.append(torch.cat(cols, dim=3))
    mask = torch.cat(rows, dim=2)
    return mask * probe + (1 - mask) * gallery


def hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-softmax of the true class, written out."""
    log_softmax = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_softmax[torch.arange(len(labels)), labels].mean()


class LinearEmbed(nn.Module):
    """A deterministic stand-in for the ResNet: flatten, then a fixed matrix -> 512-d features."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(3 * size * size, 512, generator=generator) * (0.3 / (3 * size * size) ** 0.5)
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix


class BiasDeformer(nn.Module):
    """A controllable deformation network: weights = bias + 0.5 * (mean(probe) - mean(gallery))."""

    def __init__(self, cells: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-0.4, 1.3, cells))

    def forward(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        delta = probe.mean(dim=(1, 2, 3)) - gallery.mean(dim=(1, 2, 3))
        return self.bias.unsqueeze(0) + 0.5 * delta.unsqueeze(1)


def identify(images: torch.Tensor, gallery_images: torch.Tensor) -> list[tuple[int, bool]]:
    """For each normalised image, the (gallery index, flipped) it equals."""
    plain = normalise(gallery_images)
    found = []
    for image in images:
        hits = [(g, flip) for g in range(len(plain)) for flip in (False, True)
                if torch.equal(image, plain[g].flip(-1) if flip else plain[g])]
        assert len(hits) == 1, "each deformed copy's gallery image is one gallery image, possibly mirrored"
        found.append(hits[0])
    return found


# --------------------------------------------------------------------------------------------
# The prototype loss and the gallery selection, by hand
# --------------------------------------------------------------------------------------------

WAYS, SHOTS, QUERIES, AUGNUM, CHOOSE, GALLERY = 3, 2, 3, 2, 4, 24
FANG = 3


@pytest.fixture(scope="module")
def controlled():
    """An IDeMeNet whose embedding is a fixed linear map and whose deformer is a biased mean difference,
    a hand-built gallery and an episode."""
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=10, image_size=SIZE, fang=FANG).eval()
    model.backbone = LinearEmbed(SIZE, seed=5)
    model.deformer = BiasDeformer(FANG * FANG)
    with torch.no_grad():
        model.scale.fill_(0.7)
    gallery_images = uint8_images(GALLERY, seed=50)
    gallery_features = normalise(gallery_images).flatten(1) @ model.backbone.matrix
    bank = GalleryBank(make_gallery(gallery_images, torch.arange(GALLERY) // 3), model, CPU, chunk=5,
                       features=gallery_features)
    episode = make_episode(WAYS, SHOTS, QUERIES, AUGNUM, CHOOSE, GALLERY, FANG * FANG, classes=[2, 5, 9], seed=11)
    return model, bank, gallery_images, gallery_features, episode


def nearest_sets(support_features: torch.Tensor, gallery_features: torch.Tensor, scale: float) -> list[set[int]]:
    """Per class, the CHOOSE gallery indices with the smallest scale * ||g - c||^2 (direct loops)."""
    sets = []
    for k in range(WAYS):
        centre = support_features[k * SHOTS:(k + 1) * SHOTS].mean(0)
        distances = [(scale * ((gallery_features[g] - centre) ** 2).sum().item(), g) for g in range(GALLERY)]
        ranked = sorted(distances)
        assert ranked[CHOOSE - 1][0] < ranked[CHOOSE][0], "the fixture needs a clear cut-off"
        sets.append({g for _, g in ranked[:CHOOSE]})
    return sets


@pytest.mark.parametrize("deform", ["learned", "random"])
def test_prototype_loss_matches_hand_computation(controlled, deform: str) -> None:
    model, bank, gallery_images, gallery_features, episode = controlled
    config = EpisodeConfig(WAYS, AUGNUM, CHOOSE, deform=deform, chunk=4)
    result = run_episode(model, episode, bank, config, CPU, track_grad=True)

    embed = model.backbone
    scale = 0.7
    support = normalise(episode["support"])
    support_features = support.flatten(1) @ embed.matrix
    query_features = normalise(episode["query"]).flatten(1) @ embed.matrix

    # Gallery selection: every copy's gallery image is among its class's CHOOSE nearest, and the picks
    # (which cover 0..CHOOSE-1 per class) reach every one of them.
    chosen = identify(result.gallery_images, gallery_images)
    near = nearest_sets(support_features, gallery_features, scale)
    for k in range(WAYS):
        copies = range(k * SHOTS * AUGNUM, (k + 1) * SHOTS * AUGNUM)
        assert {chosen[m][0] for m in copies} == near[k]
    assert [flip for _, flip in chosen] == episode["gallery_flip"].tolist()
    # same shortlist position in the same class -> same gallery image
    for m in range(len(chosen)):
        for n in range(len(chosen)):
            same_pick = episode["shortlist_pick"][m] == episode["shortlist_pick"][n]
            if m // (SHOTS * AUGNUM) == n // (SHOTS * AUGNUM) and same_pick:
                assert chosen[m][0] == chosen[n][0]

    # Copy m belongs to support image m // AUGNUM; A is that image, mirrored where probe_flip says.
    probes = torch.stack([support[m // AUGNUM].flip(-1) if episode["probe_flip"][m] else support[m // AUGNUM]
                          for m in range(WAYS * SHOTS * AUGNUM)])
    torch.testing.assert_close(result.probes, probes, rtol=0, atol=0)
    others = torch.stack([normalise(gallery_images[g:g + 1])[0].flip(-1) if flip
                          else normalise(gallery_images[g:g + 1])[0] for g, flip in chosen])
    if deform == "learned":
        bias = model.deformer.bias
        weights = bias.unsqueeze(0) + 0.5 * (probes.mean(dim=(1, 2, 3)) - others.mean(dim=(1, 2, 3))).unsqueeze(1)
    else:
        weights = episode["random_weights"]
    deformed_features = hand_blend(probes, others, weights).flatten(1) @ embed.matrix
    torch.testing.assert_close(result.weights, weights.detach(), rtol=1e-6, atol=1e-6)

    # Prototypes: mean of the K * (1 + augnum) = 6 features of each class.
    protos = []
    for k in range(WAYS):
        own = [support_features[s] for s in range(k * SHOTS, (k + 1) * SHOTS)]
        own += [deformed_features[m] for m in range(k * SHOTS * AUGNUM, (k + 1) * SHOTS * AUGNUM)]
        assert len(own) == SHOTS * (1 + AUGNUM)
        protos.append(torch.stack(own).sum(0) / len(own))
    protos = torch.stack(protos)
    scale_param = model.scale
    logits = -scale_param * ((query_features.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
    expected = hand_nll(logits, episode["query_labels"])
    torch.testing.assert_close(result.proto_loss, expected, rtol=1e-5, atol=1e-6)
    assert result.cls_loss is None

    expected_acc = (logits.argmax(1) == episode["query_labels"]).float().mean().item()
    plain_protos = torch.stack([support_features[k * SHOTS:(k + 1) * SHOTS].mean(0) for k in range(WAYS)])
    plain_logits = -((query_features.unsqueeze(1) - plain_protos.unsqueeze(0)) ** 2).sum(-1)
    expected_plain = (plain_logits.argmax(1) == episode["query_labels"]).float().mean().item()
    assert result.accuracy == pytest.approx(expected_acc)
    assert result.plain_accuracy == pytest.approx(expected_plain)

    # Gradients of the prototype loss reach the scale and (learned) the deformation network.
    params = [model.scale] + ([model.deformer.bias] if deform == "learned" else [])
    got = torch.autograd.grad(result.proto_loss, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_classification_loss_matches_hand_computation(controlled) -> None:
    model, bank, gallery_images, _, episode = controlled
    config = EpisodeConfig(WAYS, AUGNUM, CHOOSE, chunk=7)
    result = run_episode(model, episode, bank, config, CPU, train_cls=True, track_grad=True)
    support = normalise(episode["support"])
    probes, others = result.probes, result.gallery_images
    images = torch.cat([support.flatten(1), hand_blend(probes, others, result.weights).flatten(1)])
    features = images @ model.backbone.matrix
    owners = torch.cat([torch.arange(WAYS).repeat_interleave(SHOTS),
                        torch.arange(WAYS).repeat_interleave(SHOTS * AUGNUM)])
    base = torch.tensor([2, 5, 9])[owners]  # the episode's split-level (base) class ids
    logits = features @ model.fc.weight.t() + model.fc.bias
    torch.testing.assert_close(result.cls_loss, hand_nll(logits, base), rtol=1e-5, atol=1e-6)


def test_no_deformation_is_a_plain_prototypical_network(controlled) -> None:
    model, _, _, _, episode = controlled
    result = run_episode(model, episode, None, EpisodeConfig(WAYS, AUGNUM, CHOOSE, deform="none"), CPU)
    support_features = normalise(episode["support"]).flatten(1) @ model.backbone.matrix
    query_features = normalise(episode["query"]).flatten(1) @ model.backbone.matrix
    protos = torch.stack([support_features[k * SHOTS:(k + 1) * SHOTS].mean(0) for k in range(WAYS)])
    logits = -0.7 * ((query_features.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
    torch.testing.assert_close(result.proto_loss, hand_nll(logits, episode["query_labels"]), rtol=1e-5, atol=1e-6)
    assert result.weights is None and result.deformed is None


def test_random_gallery_selection_uses_the_episode_pick(controlled) -> None:
    model, bank, gallery_images, _, episode = controlled
    config = EpisodeConfig(WAYS, AUGNUM, CHOOSE, gallery_select="random")
    result = run_episode(model, episode, bank, config, CPU)
    chosen = identify(result.gallery_images, gallery_images)
    assert [g for g, _ in chosen] == episode["gallery_pick"].tolist()


# --------------------------------------------------------------------------------------------
# One training step, as run_training takes it
# --------------------------------------------------------------------------------------------

STEP_CLASSES = 8
LR, CLS_LR = 1e-3, 1e-2


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "stage1.t7"
    torch.save(EmbeddingNet(STEP_CLASSES).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def step_gallery():
    return uint8_images(12, seed=70), torch.arange(12) % STEP_CLASSES


def make_args(stage1_file, *flags: str):
    """The stage-2 configuration the script builds from these flags and ``flags``."""
    return stage2_config(CPU, **vars(stage2_parser().parse_args([
        "--tensorname", "steptest", "--network", str(stage1_file), "--imageSize", str(SIZE), "--Fang", "3",
        "--shots", "1", "--trainways", "3", "--ways", "3", "--test_num", "2", "--augnum", "2", "--chooseNum", "3",
        "--galleryNum", "2", "--batchSize", "16", "--LR", str(LR), "--clsLR", str(CLS_LR), "--device", "cpu",
        "--nthreads", "0", *flags])))


def groups(model: IDeMeNet) -> dict[str, list[nn.Parameter]]:
    return {"deformer": list(model.deformer.parameters()), "scale": [model.scale],
            "backbone": list(model.backbone.parameters()), "fc": list(model.fc.parameters())}


def take_step(stage1_file, step_gallery, flags: tuple[str, ...], epoch: int):
    """Build the model as the script does and take one training step with the engine's train_one_epoch."""
    args = make_args(stage1_file, *flags)
    torch.manual_seed(4)
    model = stage2.build_model(args, CPU)
    meta_params, cls_params = stage2.param_groups(model, args)
    optimizers, _ = stage2.make_optimizers(model, args)
    bank = GalleryBank(make_gallery(*step_gallery), model, CPU, args.batchSize)
    episode = make_episode(3, 1, 2, args.augnum, args.chooseNum, len(bank), 9, classes=[1, 4, 6], seed=21)
    before = {k: [p.detach().clone() for p in ps] for k, ps in groups(model).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    result, _ = stage2.train_one_epoch(model, [episode], bank, stage2.episode_config(args, args.trainways, train=True),
                                       CPU, epoch, (meta_params, cls_params), optimizers, None, stage2.new_progress(),
                                       show=False)
    assert result is not None
    changed = {k: [not torch.equal(b, p.detach()) for b, p in zip(before[k], groups(model)[k])] for k in before}
    return model, changed, before, buffers, (meta_params, cls_params)


CASES = [
    # flags, epoch, groups that must change (the others must not)
    (("--fixCls", "1"), 0, {"deformer", "scale"}),
    (("--fixCls", "1"), 3, {"deformer", "scale"}),
    (("--fixCls", "0"), 1, {"deformer", "scale", "backbone", "fc"}),
    (("--fixCls", "0"), 0, {"deformer", "scale"}),
    (("--fixCls", "1", "--fixAttention", "1"), 1, {"scale"}),
    (("--fixCls", "1", "--fixScale", "1"), 1, {"deformer"}),
    (("--fixCls", "1", "--deform", "random"), 1, {"scale"}),
    (("--fixCls", "0", "--fixAttention", "1"), 1, {"scale", "backbone", "fc"}),
    (("--fixCls", "0", "--fixScale", "1", "--deform", "random"), 2, {"backbone", "fc"}),
]


def trainable_groups(flags: tuple[str, ...]) -> set[str]:
    """The groups a flag combination trains in some epoch: only these keep requires_grad."""
    given = dict(zip(flags[::2], flags[1::2]))
    out = set()
    if given.get("--fixAttention", "0") == "0" and given.get("--deform", "learned") == "learned":
        out.add("deformer")
    if given.get("--fixScale", "0") == "0":
        out.add("scale")
    if given.get("--fixCls", "0") == "0":
        out |= {"backbone", "fc"}
    return out


CASE_IDS = [f"{' '.join(flags)} epoch {epoch}" for flags, epoch, _ in CASES]


@pytest.mark.parametrize("flags,epoch,expected", CASES, ids=CASE_IDS)
def test_training_step_changes_exactly_the_flagged_groups(stage1_file, step_gallery, flags, epoch, expected) -> None:
    model, changed, _, buffers, _ = take_step(stage1_file, step_gallery, flags, epoch)
    for group, flags_changed in changed.items():
        if group in expected:
            assert all(flags_changed), f"{group}: some tensors did not change ({flags_changed})"
        else:
            assert not any(flags_changed), f"{group} changed although frozen"
    trainable = trainable_groups(flags)
    for group, params in groups(model).items():
        assert all(p.requires_grad == (group in trainable) for p in params), group
    # BatchNorm stays in evaluation mode (docs/original.md §4.7): no running statistic moved, anywhere.
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    for bn in (m for m in model.deformer.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_fixcls_freezes_embedding_and_fc_requires_grad(stage1_file) -> None:
    args = make_args(stage1_file, "--fixCls", "1")
    model = stage2.build_model(args, CPU)
    meta, cls = stage2.param_groups(model, args)
    assert cls == []
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in model.fc.parameters())
    assert all(p.requires_grad for p in model.deformer.parameters()) and model.scale.requires_grad
    assert {id(p) for p in meta} == {id(p) for p in model.deformer.parameters()} | {id(model.scale)}


def test_frozen_flags_clear_requires_grad(stage1_file) -> None:
    args = make_args(stage1_file, "--fixCls", "0", "--fixAttention", "1", "--fixScale", "1")
    model = stage2.build_model(args, CPU)
    meta, cls = stage2.param_groups(model, args)
    assert meta == []
    assert all(not p.requires_grad for p in model.deformer.parameters()) and not model.scale.requires_grad
    assert {id(p) for p in cls} == {id(p) for p in model.backbone.parameters()} | {id(p) for p in model.fc.parameters()}


def test_each_loss_trains_only_its_own_groups_at_the_right_rate(stage1_file, step_gallery) -> None:
    """fixCls 0, epoch 1: the deformation network and scale get the prototype loss's gradient, the
    embedding and fc the classification loss's; Adam's first step moves each element by
    lr * g / (|g| + eps) with lr = LR (deformer, scale), clsLR * 0.1 (embedding), clsLR (fc)."""
    flags = ("--fixCls", "0")
    model, _, before, _, (meta, cls) = take_step(stage1_file, step_gallery, flags, epoch=1)

    # Reference gradients from a fresh model in the same starting state, each loss separately.
    args = make_args(stage1_file, *flags)
    torch.manual_seed(4)
    fresh = stage2.build_model(args, CPU)
    stage2.param_groups(fresh, args)
    bank = GalleryBank(make_gallery(*step_gallery), fresh, CPU, args.batchSize)
    episode = make_episode(3, 1, 2, args.augnum, args.chooseNum, len(bank), 9, classes=[1, 4, 6], seed=21)
    result = run_episode(fresh, episode, bank, stage2.episode_config(args, args.trainways), CPU,
                         train_cls=True, track_grad=True)
    fg = groups(fresh)
    proto_meta = torch.autograd.grad(result.proto_loss, fg["deformer"] + fg["scale"], retain_graph=True)
    proto_backbone = torch.autograd.grad(result.proto_loss, fg["backbone"], retain_graph=True, allow_unused=True)
    cls_grads = torch.autograd.grad(result.cls_loss, fg["backbone"] + fg["fc"])

    trained = groups(model)
    for p, want in zip(trained["deformer"] + trained["scale"], proto_meta):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-8)
    for p, want in zip(trained["backbone"] + trained["fc"], cls_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-8)
    # the prototype loss does have a gradient for the embedding: the test would see it leak in
    assert any(g is not None and g.abs().sum() > 0 for g in proto_backbone)

    rates = {"deformer": LR, "scale": LR, "backbone": CLS_LR * 0.1, "fc": CLS_LR}
    for group, lr in rates.items():
        for old, p in zip(before[group], trained[group]):
            step = old - p.detach()
            expected = lr * p.grad / (p.grad.abs() + 1e-8)
            torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("device, given, expected", [
    ("cpu", None, CPU_CHUNK), ("cuda", None, CUDA_CHUNK), ("cpu", 48, 48), ("cuda", 8, 8)])
def test_forward_chunk_defaults_to_the_device_and_keeps_a_given_value(device, given, expected) -> None:
    config = stage2_config(torch.device(device), tensorname="chunk", network="x", batchSize=given)
    assert config.batchSize == expected
