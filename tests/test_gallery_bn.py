"""Stage 2's gallery pass (docs/original.md §4.4): the original's pass in training mode by default, the
clean evaluation-mode pass with ``--galleryBN eval``.

The reference below is written with plain tensor operations: a ResNet forward whose BatchNorm
normalises each share with the share's own mean and biased variance, and a running-statistics
update written out by hand (momentum 0.1, unbiased variance), applied for the first share of each
call of 128 images only."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import engine.stage2 as stage2
from conftest import make_gallery, normalise, uint8_images
from datasets import Gallery, read_split
from engine.episode import GalleryBank
from engine.options import stage2_config, stage2_parser
from models import EmbeddingNet, IDeMeNet, load_idemenet
from tests.scripts_helpers import make_workdir, read_metrics, run_script
from utils.checkpoint import safe_load
from utils.errors import OptionError
from utils.forward import compute_layout, layout_model

CPU = torch.device("cpu")
CALL, SHARES, MOMENTUM = 128, 4, 0.1
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def randomise_statistics(net: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm of ``net`` non-trivial running statistics, affine parameters and count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.num_batches_tracked.fill_(7)


def share_sizes(n: int) -> list[int]:
    """Consecutive shares of ``n`` images over 4 devices: ceil(n / 4) each, the last one the rest."""
    size = -(-n // SHARES)
    return [min(size, n - start) for start in range(0, n, size)]


def reference_pass(backbone: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Features ``[G, D]`` of normalised ``images`` and the running statistics of every BatchNorm of
    ``backbone`` (a torchvision ResNet, fc Identity) after the original's pass; ``backbone`` is not changed."""
    names = {module: name for name, module in backbone.named_modules()}
    state = {names[m]: {"running_mean": m.running_mean.clone(), "running_var": m.running_var.clone(),
                        "num_batches_tracked": m.num_batches_tracked.clone()}
             for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    def norm(bn, x, update):
        count = x.numel() // x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        var = (x - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
        if update:
            stats = state[names[bn]]
            stats["running_mean"] = (1 - MOMENTUM) * stats["running_mean"] + MOMENTUM * mean
            stats["running_var"] = (1 - MOMENTUM) * stats["running_var"] + MOMENTUM * var * count / (count - 1)
            stats["num_batches_tracked"] = stats["num_batches_tracked"] + 1
        scale = bn.weight / torch.sqrt(var + bn.eps)
        return x * scale.view(1, -1, 1, 1) + (bn.bias - mean * scale).view(1, -1, 1, 1)

    def conv(layer, x):
        return F.conv2d(x, layer.weight, None, layer.stride, layer.padding)

    def forward(x, update):
        x = F.relu(norm(backbone.bn1, conv(backbone.conv1, x), update))
        x = F.max_pool2d(x, 3, 2, 1)
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            for block in layer:
                out = F.relu(norm(block.bn1, conv(block.conv1, x), update))
                out = norm(block.bn2, conv(block.conv2, out), update)
                if block.downsample is not None:
                    x = norm(block.downsample[1], conv(block.downsample[0], x), update)
                x = F.relu(out + x)
        return x.mean(dim=(2, 3))

    features = []
    with torch.no_grad():
        for start in range(0, len(images), CALL):
            call = images[start:start + CALL]
            offset = 0
            for i, size in enumerate(share_sizes(len(call))):
                features.append(forward(call[offset:offset + size], update=i == 0))
                offset += size
    return torch.cat(features), state


def statistics(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The BatchNorm buffers of a module or state dict, by name without ``prefix``."""
    items = module.items() if isinstance(module, dict) else module.state_dict().items()
    return {k[len(prefix):]: v for k, v in items if k.startswith(prefix) and k.rsplit(".", 1)[-1] in STAT_KEYS}


def assert_statistics(got: dict[str, torch.Tensor], want: dict[str, dict[str, torch.Tensor]]) -> None:
    assert len(got) == 3 * len(want)
    for name, stats in want.items():
        for key, value in stats.items():
            if key == "num_batches_tracked":
                assert int(got[f"{name}.{key}"]) == int(value), name
            else:
                torch.testing.assert_close(got[f"{name}.{key}"], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def small_model(seed: int) -> IDeMeNet:
    torch.manual_seed(seed)
    model = IDeMeNet(num_classes=4, image_size=32, backbone="resnet10")
    randomise_statistics(model.backbone, seed)
    return layout_model(model.eval())


# 1. The pass itself ---------------------------------------------------------------------------------

def test_train_mode_pass_equals_the_four_share_first_share_update_reference() -> None:
    """150 images: a call of 128 (shares 32 x 4) and one of 22 (torch.chunk: 6, 6, 6, 4)."""
    model = small_model(0)
    images = uint8_images(150, seed=4)
    want_features, want_stats = reference_pass(copy.deepcopy(model.backbone), normalise(images))
    bank = GalleryBank(make_gallery(images, torch.arange(150) % 4), model, CPU, chunk=16, batch_norm="train")
    assert bank.batch_norm == "train" and not model.backbone.training
    torch.testing.assert_close(bank.features, want_features, rtol=1e-4, atol=1e-4)
    assert_statistics(statistics(model.backbone), want_stats)
    # the pass is not the evaluation-mode one, and only the first share of a call updates:
    with torch.no_grad():
        clean = small_model(0).embed(compute_layout(normalise(images)))
    assert (bank.features - clean).abs().max() > 0.1
    assert all(int(v) == 7 + 2 for k, v in statistics(model.backbone).items() if k.endswith("num_batches_tracked"))


def test_the_running_var_change_is_the_mean_relative_change() -> None:
    model = small_model(1)
    before = torch.cat([m.running_var.clone() for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    bank = GalleryBank(make_gallery(uint8_images(64, seed=5), torch.arange(64) % 4), model, CPU, 16,
                       batch_norm="train")
    after = torch.cat([m.running_var for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert bank.running_var_change == pytest.approx(((after - before).abs() / before).mean().item(), rel=1e-6)
    assert bank.running_var_change > 0.01


def test_eval_pass_leaves_every_statistic_bit_identical() -> None:
    model = small_model(2)
    before = {k: v.clone() for k, v in statistics(model).items()}
    images = uint8_images(40, seed=6)
    bank = GalleryBank(make_gallery(images, torch.arange(40) % 4), model, CPU, 16, batch_norm="eval")
    assert bank.batch_norm == "eval" and bank.running_var_change is None
    assert all(torch.equal(before[k], v) for k, v in statistics(model).items())
    with torch.no_grad():
        torch.testing.assert_close(bank.features, model.embed(compute_layout(normalise(images))), rtol=1e-5, atol=1e-6)


def test_a_share_of_one_image_that_batchnorm_cannot_normalise_is_refused_in_one_line() -> None:
    """129 images at 32 px: the second call is one image, a 1 x 1 map in the last stage."""
    model = small_model(3)
    with pytest.raises(OptionError, match="--galleryBN"):
        GalleryBank(make_gallery(uint8_images(129, seed=7), torch.arange(129) % 4), model, CPU, 16,
                    batch_norm="train")
    assert not model.backbone.training


# 2. The scripts (end to end, marked slow) and their steps in-process ----------------------------------

TINY = ["--dataroot", "toy", "--imageSize", "32", "--galleryNum", "2", "--chooseNum", "3", "--augnum", "2",
        "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu", "--epoch", "2",
        "--valEpisodes", "2", "--testEpisodes", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The toy data and a stage-1 checkpoint ``stage1bn`` with non-trivial BatchNorm statistics."""
    root = make_workdir(tmp_path_factory.mktemp("gallerybn"))
    torch.manual_seed(1)
    net = EmbeddingNet(64)
    randomise_statistics(net, 11)
    torch.save(net.state_dict(), root / "models/stage1bn.t7")
    return root


def stage2_run(workdir, *flags: str) -> str:
    """Run onlyBasetwoLoss.py in ``workdir``; its standard output."""
    result = run_script(workdir, "onlyBasetwoLoss.py", *TINY, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


def expected_pass(workdir, monkeypatch, checkpoint: str) -> tuple[torch.Tensor, dict]:
    """The reference pass over the toy gallery on the network a checkpoint holds."""
    monkeypatch.chdir(workdir)
    model = load_idemenet(workdir / "models" / f"{checkpoint}.t7", image_size=32).eval()
    gallery = Gallery(read_split("toy", "train"), 2, 32, 0, progress=False)
    return reference_pass(model.backbone, normalise(gallery.images))


def prepared(workdir, monkeypatch, *flags: str):
    """What onlyBasetwoLoss does before its gallery pass: the flags resolved, the splits, the model and
    the decoded gallery (``engine.stage2.prepare``)."""
    monkeypatch.chdir(workdir)
    args = stage2_config(CPU, **vars(stage2_parser().parse_args([*TINY, "--tensorname", "inprocess", *flags])))
    return (args, *stage2.prepare(args, CPU, need_train=True))


def test_the_default_pass_of_round2_runs_on_the_loaded_network(workdir, monkeypatch) -> None:
    """A stage-2 checkpoint whose statistics a first pass changed: --GNet loads them, and the default
    pass starts from them (the reference on that network), not from the stage-1 file's."""
    model = load_idemenet(workdir / "models/stage1bn.t7", image_size=32).eval()
    monkeypatch.chdir(workdir)
    GalleryBank(Gallery(read_split("toy", "train"), 2, 32, 0, progress=False), model, CPU, 16, batch_norm="train")
    torch.save(model.state_dict(), workdir / "models/gnet_round1.t7")
    args, _, loaded, gallery = prepared(workdir, monkeypatch, "--GNet", "gnet_round1", "--fixCls", "0")
    assert args.galleryBN == "train"
    want_features, want_stats = reference_pass(copy.deepcopy(loaded.backbone), normalise(gallery.images))
    bank = GalleryBank(gallery, loaded, CPU, args.batchSize, features=None, batch_norm=args.galleryBN)
    torch.testing.assert_close(bank.features, want_features, rtol=1e-4, atol=1e-4)
    assert_statistics(statistics(loaded.backbone), want_stats)
    assert int(statistics(loaded.backbone)["bn1.num_batches_tracked"]) == \
        int(model.state_dict()["backbone.bn1.num_batches_tracked"]) + 1


def test_restored_features_leave_the_restored_statistics_alone(workdir, monkeypatch) -> None:
    """Resume: the model holds the saved statistics and the bank the saved features; no pass runs."""
    args, _, model, gallery = prepared(workdir, monkeypatch, "--network", "stage1bn")
    before = {k: v.clone() for k, v in statistics(model).items()}
    saved = torch.randn(len(gallery), 512)
    bank = GalleryBank(gallery, model, CPU, args.batchSize, features=saved, batch_norm=args.galleryBN)
    assert bank.batch_norm == "restored" and torch.equal(bank.features, saved)
    assert all(torch.equal(before[k], v) for k, v in statistics(model).items())
    assert "restored" in stage2.gallery_pass_line(bank)


def test_without_deformation_the_gallery_is_still_embedded_for_the_pass(workdir, monkeypatch) -> None:
    """--deform none: the default pass still sets the embedding's statistics (the gallery is decoded);
    with --galleryBN eval nothing is decoded."""
    assert prepared(workdir, monkeypatch, "--network", "stage1bn", "--deform", "none")[3] is not None
    assert prepared(workdir, monkeypatch, "--network", "stage1bn", "--deform", "none", "--galleryBN", "eval")[3] is None


@pytest.mark.slow
def test_the_default_run_uses_the_train_mode_pass_and_says_so(workdir, monkeypatch) -> None:
    out = stage2_run(workdir, "--network", "stage1bn", "--fixCls", "1", "--numEpochs", "1",
                 "--tensorname", "bntrain")
    want_features, want_stats = expected_pass(workdir, monkeypatch, "stage1bn")
    state = safe_load(workdir / "runs/bntrain/resume.pt")
    torch.testing.assert_close(state["gallery_features"], want_features, rtol=1e-4, atol=1e-4)
    assert_statistics(statistics(state["model"], "backbone."), want_stats)
    assert_statistics(statistics(safe_load(workdir / "models/bntrain_last.t7"), "backbone."), want_stats)
    line = next(line for line in out.splitlines() if line.startswith("gallery pass"))
    assert "training mode" in line and "running_var" in line
    change = float(line.split("running_var by ")[1].split(" %")[0])
    assert change > 1.0  # one call replaces 10 % of statistics that differ from the batch's
    assert json.loads((workdir / "runs/bntrain/args.json").read_text())["galleryBN"] == "train"
    assert {row["gallery_bn"] for row in read_metrics(workdir / "runs/bntrain/metrics.csv")} == {"train"}
    assert json.loads((workdir / "runs/bntrain/evaluate_1shot_seed0.json").read_text())["galleryBN"] == "train"


@pytest.mark.slow
def test_gallery_bn_eval_leaves_the_stage1_statistics_bit_identical(workdir, monkeypatch) -> None:
    out = stage2_run(workdir, "--network", "stage1bn", "--fixCls", "1", "--numEpochs", "1",
                 "--galleryBN", "eval", "--tensorname", "bneval")
    stage1 = statistics(load_idemenet(workdir / "models/stage1bn.t7", image_size=32), "backbone.")
    for path in ("runs/bneval/resume.pt", "models/bneval_last.t7", "models/bneval.t7"):
        state = safe_load(workdir / path)
        saved = statistics(state.get("model", state), "backbone.")
        assert saved.keys() == stage1.keys() and all(torch.equal(saved[k], stage1[k]) for k in stage1), path
    assert "evaluation mode" in out
    assert {row["gallery_bn"] for row in read_metrics(workdir / "runs/bneval/metrics.csv")} == {"eval"}


@pytest.mark.slow
def test_a_resumed_run_restores_the_pass_and_equals_an_uninterrupted_one(workdir, monkeypatch) -> None:
    """Two epochs in one go against one epoch then --resume for the second: the same weights and
    statistics bit for bit, and the resumed process does not embed the gallery again."""
    common = ["--network", "stage1bn", "--fixCls", "0", "--fixAttention", "0"]
    stage2_run(workdir, *common, "--numEpochs", "2", "--tensorname", "straight")
    stage2_run(workdir, *common, "--numEpochs", "1", "--tensorname", "pieces")
    first = safe_load(workdir / "runs/pieces/resume.pt")
    out = stage2_run(workdir, *common, "--numEpochs", "2", "--tensorname", "pieces", "--resume")
    assert "restored" in out and "training mode" not in out
    want, got = safe_load(workdir / "models/straight_last.t7"), safe_load(workdir / "models/pieces_last.t7")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    resumed = safe_load(workdir / "runs/pieces/resume.pt")
    assert torch.equal(resumed["gallery_features"], first["gallery_features"])
    assert torch.equal(resumed["gallery_features"], safe_load(workdir / "runs/straight/resume.pt")["gallery_features"])
    # the statistics of the one pass: epoch 0's and the end's are the same buffers
    before, after = statistics(first["model"], "backbone."), statistics(resumed["model"], "backbone.")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_round2_repeats_the_pass_on_the_loaded_network(workdir, monkeypatch) -> None:
    stage2_run(workdir, "--network", "stage1bn", "--fixCls", "1", "--numEpochs", "1",
           "--tensorname", "round1")
    out = stage2_run(workdir, "--GNet", "round1_last", "--fixCls", "0", "--fixAttention", "1",
                 "--numEpochs", "1", "--tensorname", "round2")
    assert "training mode" in out
    want_features, want_stats = expected_pass(workdir, monkeypatch, "round1_last")
    state = safe_load(workdir / "runs/round2/resume.pt")
    torch.testing.assert_close(state["gallery_features"], want_features, rtol=1e-4, atol=1e-4)
    assert_statistics(statistics(state["model"], "backbone."), want_stats)
    round1 = statistics(safe_load(workdir / "models/round1_last.t7"), "backbone.")
    moved = statistics(state["model"], "backbone.")
    assert not torch.equal(round1["bn1.running_var"], moved["bn1.running_var"])
    assert int(moved["bn1.num_batches_tracked"]) == int(round1["bn1.num_batches_tracked"]) + math.ceil(128 / CALL)


@pytest.mark.slow
def test_evaluate_runs_the_pass_and_names_it(workdir, monkeypatch) -> None:
    stage2_run(workdir, "--network", "stage1bn", "--fixCls", "1", "--numEpochs", "1",
           "--tensorname", "toeval")
    out = stage2_run(workdir, "--GNet", "toeval_last", "--evaluate", "--tensorname", "toeval")
    assert "gallery pass in training mode" in out
    assert json.loads((workdir / "runs/toeval/evaluate_1shot_seed0.json").read_text())["galleryBN"] == "train"


# 3. The gallery's files -----------------------------------------------------------------------------

def test_the_gallery_files_are_the_original_draw(toy_root) -> None:
    """The original: the train CSV's files grouped by class in CSV order, classes sorted,
    ``np.random.seed(2019)``, then ``np.random.choice(files, galleryNum, False)`` per class."""
    import csv

    import numpy as np

    from datasets.gallery import gallery_files

    by_class: dict[str, list[str]] = {}
    with open(toy_root / "train.csv", newline="") as handle:
        for name, label in list(csv.reader(handle))[1:]:
            by_class.setdefault(label, []).append(name)
    saved = np.random.get_state()
    np.random.seed(2019)
    want = [(label, str(name)) for label, wnid in enumerate(sorted(by_class))
            for name in np.random.choice(by_class[wnid], 5, False)]
    np.random.set_state(saved)
    got = [(label, path.name) for label, path in gallery_files(read_split(toy_root, "train"), 5)]
    assert got == want
