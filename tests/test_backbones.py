"""The selectable embedding backbones (resnet10, resnet18, resnet50): shapes, the unchanged ResNet-18
default, checkpoints of each backbone in both stages, ``--backbone`` and ``--filesPerClass 0``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from datasets import SoftRandomDataset
from engine.options import stage1_config, stage1_parser
from engine.run import open_run
from engine.stage1 import RESUME_KEYS
from models import BACKBONES, EmbeddingNet, IDeMeNet, feature_size, infer_backbone, load_embedding, load_idemenet
from models.deformation import TwoBranchDeformNet, resnet_body
from tests.scripts_helpers import make_workdir, run_main
from utils.errors import CheckpointError, OptionError

SIZE = 32
FEATURES = {"resnet10": 512, "resnet18": 512, "resnet50": 2048}
BLOCKS = {"resnet10": (BasicBlock, [1, 1, 1, 1]), "resnet18": (BasicBlock, [2, 2, 2, 2]),
          "resnet50": (Bottleneck, [3, 4, 6, 3])}
STAGE1 = ["--dataroot", "toy", "--imageSize", str(SIZE), "--numEpochs", "1", "--batchSize", "64", "--nthreads", "0",
          "--valEpisodes", "0", "--progress", "0"]


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def stage1_net(backbone: str, seed: int = 0) -> EmbeddingNet:
    """A seeded embedding whose BatchNorm layers hold non-trivial running statistics."""
    torch.manual_seed(seed)
    net = EmbeddingNet(64, backbone).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return net


@pytest.fixture(scope="module")
def stage1_files(tmp_path_factory) -> dict[str, tuple[EmbeddingNet, Path]]:
    """Backbone -> (stage-1 network, its checkpoint file) for resnet10 and resnet50."""
    root = tmp_path_factory.mktemp("backbones")
    files = {}
    for backbone in ("resnet10", "resnet50"):
        net = stage1_net(backbone)
        torch.save(net.state_dict(), root / f"{backbone}.t7")
        files[backbone] = (net, root / f"{backbone}.t7")
    return files


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_each_backbone_has_its_blocks_feature_size_and_shapes(backbone: str) -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(5, backbone).eval()
    block, stages = BLOCKS[backbone]
    assert [len(getattr(net.convnet, f"layer{i}")) for i in range(1, 5)] == stages
    assert all(isinstance(b, block) for i in range(1, 5) for b in getattr(net.convnet, f"layer{i}"))
    assert feature_size(backbone) == net.feature_size == net.convnet.fc.in_features == FEATURES[backbone]
    assert net.backbone_name == backbone
    with torch.no_grad():
        assert net.features(images()).shape == (2, FEATURES[backbone])
        assert net(images()).shape == (2, 5)
        assert resnet_body(backbone).eval()(images()).shape == (2, FEATURES[backbone])
    assert infer_backbone(net.state_dict(), "convnet.") == backbone


@pytest.mark.parametrize("choice", [{}, {"backbone": "resnet50"}], ids=["default_resnet18", "resnet50"])
def test_seeded_backbone_equals_seeded_torchvision_network(choice: dict[str, str]) -> None:
    torch.manual_seed(3)
    ours = EmbeddingNet(7, **choice)
    torch.manual_seed(3)
    build = getattr(torchvision.models, choice.get("backbone", "resnet18"))
    reference = build(weights=None, num_classes=7).state_dict()
    state = ours.state_dict()
    assert list(state) == [f"convnet.{key}" for key in reference]
    assert all(torch.equal(state[f"convnet.{key}"], value) for key, value in reference.items())


def test_default_stage2_backbone_equals_seeded_torchvision_resnet18() -> None:
    torch.manual_seed(4)
    body = IDeMeNet(image_size=SIZE).backbone.state_dict()
    torch.manual_seed(4)
    reference = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
                 if not k.startswith("fc.")}
    assert list(body) == list(reference)
    assert all(torch.equal(body[key], value) for key, value in reference.items())


@pytest.mark.parametrize("backbone", ["resnet10", "resnet50"])
def test_stage1_file_builds_its_backbone_in_stage2(stage1_files, backbone: str) -> None:
    net, path = stage1_files[backbone]
    model = load_idemenet(path, image_size=SIZE).eval()
    assert model.backbone_name == backbone and model.fc.in_features == FEATURES[backbone]
    with torch.no_grad():
        features = model.embed(images(3))
        assert features.shape == (3, FEATURES[backbone])
        assert torch.equal(features, net.features(images(3)))
        assert torch.equal(model.classify(features), net(images(3)))
    assert load_embedding(path).backbone_name == backbone


@pytest.mark.parametrize("backbone", ["resnet10", "resnet50"])
def test_stage2_state_dict_round_trips(tmp_path: Path, backbone: str) -> None:
    torch.manual_seed(5)
    source = IDeMeNet(image_size=SIZE, backbone=backbone).eval()
    with torch.no_grad():
        source.scale.fill_(0.5)
    torch.save(source.state_dict(), tmp_path / "g.t7")
    loaded = load_idemenet(tmp_path / "g.t7", image_size=SIZE)
    assert loaded.backbone_name == backbone
    state = loaded.state_dict()
    assert list(state) == list(source.state_dict())
    assert all(torch.equal(state[key], value) for key, value in source.state_dict().items())
    embedding = load_embedding(tmp_path / "g.t7").eval()
    with torch.no_grad():
        assert torch.equal(embedding.features(images()), source.embed(images()))


def test_twobranch_takes_the_resnet10_embedding(stage1_files) -> None:
    net, path = stage1_files["resnet10"]
    model = load_idemenet(path, image_size=SIZE, deform_net="twobranch").eval()
    assert isinstance(model.deformer, TwoBranchDeformNet)
    assert model.deformer.toWeight[0].in_features == 2 * 512
    with torch.no_grad():
        assert torch.equal(model.deformer.probe_branch(images()), net.features(images()))
        assert torch.equal(model.deformer.gallery_branch(images()), net.features(images()))
        assert model.deform(images(seed=1), images(seed=2))[1].shape == (2, 9)


def test_twobranch_of_resnet50_concatenates_2048_d_features() -> None:
    torch.manual_seed(6)
    deformer = TwoBranchDeformNet(SIZE, 3, "resnet50").eval()
    assert deformer.toWeight[0].in_features == 2 * 2048
    with torch.no_grad():
        assert deformer(images(seed=1), images(seed=2)).shape == (2, 9)


@pytest.mark.parametrize("block,stages", [(BasicBlock, [3, 4, 6, 3]), (Bottleneck, [1, 1, 1, 1])],
                         ids=["resnet34", "bottleneck10"])
def test_unknown_layout_is_refused_naming_the_file(tmp_path: Path, block, stages) -> None:
    torch.manual_seed(7)
    state = {f"convnet.{k}": v for k, v in ResNet(block, stages, num_classes=64).state_dict().items()}
    with pytest.raises(CheckpointError, match="no known backbone"):
        infer_backbone(state, "convnet.")
    torch.save(state, tmp_path / "odd.t7")
    for load in (load_embedding, load_idemenet):
        with pytest.raises(CheckpointError) as error:
            load(tmp_path / "odd.t7")
        assert str(tmp_path / "odd.t7") in str(error.value) and str(tuple(stages)) in str(error.value)


def test_unknown_backbone_name_is_refused() -> None:
    with pytest.raises(ValueError, match="resnet34"):
        IDeMeNet(image_size=SIZE, backbone="resnet34")


def test_files_per_class_zero_covers_every_file(train_split) -> None:
    every = [path for files in train_split.files for path in files]
    dataset = SoftRandomDataset(train_split, SIZE, files_per_class=0, repeats=2)
    assert [path for path, _ in dataset.samples] == every
    assert len(dataset) == 2 * len(every)
    assert [label for _, label in dataset.samples] == [c for c, files in enumerate(train_split.files) for _ in files]
    with pytest.raises(ValueError, match="files_per_class"):
        SoftRandomDataset(train_split, SIZE, files_per_class=-1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stage1_files) -> Path:
    root = make_workdir(tmp_path_factory.mktemp("cli"))
    (root / "models/r10.t7").write_bytes(stage1_files["resnet10"][1].read_bytes())
    return root


def test_backbone_contradicting_the_network_exits_2_with_one_line(workdir: Path) -> None:
    result = run_main(workdir, "classification.py", *STAGE1, "--backbone", "resnet50", "--network", "r10",
                        "--tensorname", "mismatch")
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "--backbone resnet50" in message and "r10" in message and "resnet10" in message, message
    assert not (workdir / "runs/mismatch").exists() and not (workdir / "models/mismatch.t7").exists()


def test_stage1_trains_a_resnet10_on_every_file_and_resume_keeps_the_backbone(workdir: Path) -> None:
    result = run_main(workdir, "classification.py", *STAGE1, "--backbone", "resnet10", "--filesPerClass", "0",
                        "--tensorname", "r10_all")
    assert result.returncode == 0, result.stderr
    assert load_embedding(workdir / "models/r10_all.t7").backbone_name == "resnet10"
    saved = json.loads((workdir / "runs/r10_all/args.json").read_text())
    assert saved["backbone"] == "resnet10" and saved["filesPerClass"] == 0
    resumed = stage1_config(**vars(stage1_parser().parse_args([*STAGE1, "--backbone", "resnet18", "--filesPerClass",
                                                               "0", "--tensorname", "r10_all", "--resume"])))
    with pytest.raises(OptionError, match="--backbone resnet10 \\(saved\\) vs resnet18 \\(now\\)"):
        open_run(resumed, RESUME_KEYS, workdir / "runs")
