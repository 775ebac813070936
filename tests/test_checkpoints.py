"""Tests for checkpoints (docs/original.md §5): the authors' stage-2 layout, stage-1 files, mismatches, damaged and
unsafe files, and atomic saving."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from models import EmbeddingNet, IDeMeNet, load_embedding, load_idemenet
from utils.checkpoint import atomic_save, load_state_dict, safe_load
from utils.errors import CheckpointError

SIZE = 32
RESNET_PARTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def randomise_buffers(module: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics, so a buffer left behind shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.num_batches_tracked.fill_(7)


def source_model(fang: int = 3, image_size: int = SIZE, seed: int = 0) -> IDeMeNet:
    torch.manual_seed(seed)
    model = IDeMeNet(num_classes=64, image_size=image_size, fang=fang).eval()
    with torch.no_grad():
        randomise_buffers(model, seed + 100)
        model.scale.fill_(0.37)
    return model


def original_layout(model: IDeMeNet, *, top_level_toweight: bool, nested: bool = True, duplicates: bool = True,
                    counts: bool = True) -> OrderedDict:
    """The authors' GNet state dict, written out from docs/original.md §5.2 (not from models.loading)."""
    own = model.state_dict()
    out = OrderedDict()
    conv_keys = ("weight", "bias")
    bn_keys = ("weight", "bias", "running_mean", "running_var") + (("num_batches_tracked",) if counts else ())
    for block in range(5):
        for key in conv_keys:
            out[f"attentionNet.encoder.{block}.0.{key}"] = own[f"deformer.encoder.{block}.0.{key}"]
        for key in bn_keys:
            out[f"attentionNet.encoder.{block}.1.{key}"] = own[f"deformer.encoder.{block}.1.{key}"]
    prefix = "toWeight.0." if top_level_toweight else "attentionNet.toWeight.0."
    out[prefix + "weight"] = own["deformer.toWeight.0.weight"]
    out[prefix + "bias"] = own["deformer.toWeight.0.bias"]
    resnet = {k[len("backbone."):]: v for k, v in own.items() if k.startswith("backbone.")}
    if not counts:
        resnet = {k: v for k, v in resnet.items() if not k.endswith("num_batches_tracked")}
    assert {k.split(".")[0] for k in resnet} == set(RESNET_PARTS)
    if nested:
        for key, value in resnet.items():
            out["CNet.resnet.convnet." + key] = value
        # the stage-1 fc inside the nested network: not the trained fc, so it must be ignored
        generator = torch.Generator().manual_seed(9)
        out["CNet.resnet.convnet.fc.weight"] = torch.randn(64, 512, generator=generator)
        out["CNet.resnet.convnet.fc.bias"] = torch.randn(64, generator=generator)
    if duplicates:
        for key, value in resnet.items():
            out["CNet." + key] = value
    out["fc.weight"] = own["fc.weight"]
    out["fc.bias"] = own["fc.bias"]
    out["scale"] = own["scale"].reshape(1)
    return out


def add_prefix(state: dict, prefix: str = "module.") -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def inputs(seed: int = 1, n: int = 2, size: int = SIZE):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 3, size, size, generator=generator) for _ in range(2))


def assert_same_outputs(a: IDeMeNet, b: IDeMeNet, size: int = SIZE) -> None:
    a.eval()
    b.eval()
    probe, gallery = inputs(size=size)
    with torch.no_grad():
        features = a.embed(probe)
        assert torch.equal(features, b.embed(probe))
        assert torch.equal(a.classify(features), b.classify(features))
        (da, wa), (db, wb) = a.deform(probe, gallery), b.deform(probe, gallery)
        assert torch.equal(wa, wb) and torch.equal(da, db)
    assert torch.equal(a.scale, b.scale)


# --------------------------------------------------------------------------------------------
# The authors' stage-2 files
# --------------------------------------------------------------------------------------------

ORIGINAL_CASES = {
    "nested toWeight": dict(top_level_toweight=False),
    "top-level toWeight, module. prefix": dict(top_level_toweight=True, prefix=True),
    "only CNet.resnet.convnet": dict(top_level_toweight=True, duplicates=False),
    "only CNet.{conv1,...}": dict(top_level_toweight=False, nested=False, prefix=True),
    "pytorch 0.4.0: no num_batches_tracked, legacy format": dict(top_level_toweight=True, counts=False, legacy=True,
                                                                 prefix=True),
}


@pytest.mark.parametrize("case", list(ORIGINAL_CASES))
def test_original_stage2_file_loads_with_identical_outputs(tmp_path: Path, case: str) -> None:
    options = dict(ORIGINAL_CASES[case])
    prefix, legacy = options.pop("prefix", False), options.pop("legacy", False)
    source = source_model()
    state = original_layout(source, **options)
    if prefix:
        state = add_prefix(state)
    path = tmp_path / "metaNet_1shot.t7"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_idemenet(path, image_size=SIZE, fang=3)
    assert loaded.fc.out_features == 64
    assert_same_outputs(source, loaded)
    written = dict(source.named_buffers())  # what original_layout wrote into the file, under our names
    statistics = [(name, buffer) for name, buffer in loaded.named_buffers()
                  if name.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * (5 + 20)  # the encoder's and the ResNet-18's BatchNorm layers
    for name, buffer in statistics:  # running statistics came from the file
        assert torch.equal(buffer, written[name]), name


def test_original_scale_of_shape_one_loads_as_scalar_parameter(tmp_path: Path) -> None:
    source = source_model()
    state = original_layout(source, top_level_toweight=True)
    assert state["scale"].shape == (1,)
    torch.save(state, tmp_path / "g.t7")
    loaded = load_idemenet(tmp_path / "g.t7", image_size=SIZE)
    assert loaded.scale.shape == (1,) and loaded.scale.item() == pytest.approx(0.37)


def test_our_stage2_file_round_trips(tmp_path: Path) -> None:
    source = source_model(seed=3)
    torch.save(add_prefix(source.state_dict()), tmp_path / "ours.t7")
    assert_same_outputs(source, load_idemenet(tmp_path / "ours.t7", image_size=SIZE))


def test_embedding_loads_from_original_stage2_file(tmp_path: Path) -> None:
    source = source_model(seed=4)
    torch.save(original_layout(source, top_level_toweight=False), tmp_path / "g.t7")
    net = load_embedding(tmp_path / "g.t7").eval()
    probe, _ = inputs()
    with torch.no_grad():
        features = source.embed(probe)
        assert torch.equal(net.features(probe), features)
        assert torch.equal(net(probe), source.classify(features))  # the trained fc, not the nested stage-1 fc


# --------------------------------------------------------------------------------------------
# Stage-1 files
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_net() -> EmbeddingNet:
    torch.manual_seed(5)
    net = EmbeddingNet(64).eval()
    with torch.no_grad():
        randomise_buffers(net, 6)
    return net


def stage1_state(net: EmbeddingNet, counts: bool = True) -> OrderedDict:
    state = OrderedDict((k, v) for k, v in net.state_dict().items() if counts or not k.endswith("num_batches_tracked"))
    assert all(k.startswith("convnet.") for k in state)
    return state


@pytest.mark.parametrize("prefix", [False, True])
def test_stage1_file_gives_embedding_fresh_deformer_and_unit_scale(tmp_path: Path, stage1_net, prefix: bool) -> None:
    state = stage1_state(stage1_net)
    torch.save(add_prefix(state) if prefix else state, tmp_path / "softRandom.t7")
    model = load_idemenet(tmp_path / "softRandom.t7", image_size=SIZE, fang=3).eval()
    probe, gallery = inputs()
    with torch.no_grad():
        features = stage1_net.features(probe)
        assert torch.equal(model.embed(probe), features)
        assert torch.equal(model.classify(features), stage1_net.convnet.fc(features))
        assert model.deform(probe, gallery)[1].shape == (2, 9)
    assert model.scale.item() == 1.0
    for bn in (m for m in model.deformer.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        # PyTorch 0.4.0's initialisation (docs/original.md §4.2): weight U(0, 1), bias 0
        assert 0 <= bn.weight.min() and bn.weight.max() < 1 and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_stage1_file_initialises_both_twobranch_branches(tmp_path: Path, stage1_net) -> None:
    torch.save(stage1_state(stage1_net), tmp_path / "s1.t7")
    model = load_idemenet(tmp_path / "s1.t7", image_size=SIZE, deform_net="twobranch").eval()
    probe, _ = inputs()
    with torch.no_grad():
        features = stage1_net.features(probe)
        assert torch.equal(model.deformer.probe_branch(probe), features)
        assert torch.equal(model.deformer.gallery_branch(probe), features)


@pytest.mark.parametrize("counts", [True, False])
def test_load_embedding_strips_module_prefix(tmp_path: Path, stage1_net, counts: bool) -> None:
    # counts False: a PyTorch 0.4.0 file (the authors' softRandom.t7) has no num_batches_tracked
    torch.save(add_prefix(stage1_state(stage1_net, counts)), tmp_path / "softRandom.t7",
               _use_new_zipfile_serialization=counts)
    net = load_embedding(tmp_path / "softRandom.t7").eval()
    probe, _ = inputs()
    with torch.no_grad():
        assert torch.equal(net.features(probe), stage1_net.features(probe))
        assert torch.equal(net(probe), stage1_net(probe))


def test_load_embedding_refuses_unknown_keys(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "x.t7")
    with pytest.raises(CheckpointError, match="convnet"):
        load_embedding(tmp_path / "x.t7")


# --------------------------------------------------------------------------------------------
# Files of another architecture
# --------------------------------------------------------------------------------------------

def test_other_grid_size_names_the_differing_key(tmp_path: Path) -> None:
    torch.save(source_model(fang=5).state_dict(), tmp_path / "f5.t7")
    with pytest.raises(CheckpointError) as error:
        load_idemenet(tmp_path / "f5.t7", image_size=SIZE, fang=3)
    message = str(error.value)
    assert "deformer.toWeight.0.weight" in message and "(25, 16)" in message and "(9, 16)" in message
    assert "deformer.toWeight.0.bias" in message


def test_original_file_of_other_grid_size_names_the_differing_key(tmp_path: Path) -> None:
    torch.save(add_prefix(original_layout(source_model(fang=5), top_level_toweight=True)), tmp_path / "f5.t7")
    with pytest.raises(CheckpointError, match=r"deformer\.toWeight\.0\.weight \(25, 16\) vs \(9, 16\)"):
        load_idemenet(tmp_path / "f5.t7", image_size=SIZE, fang=3)


def test_other_image_size_names_the_differing_key(tmp_path: Path) -> None:
    # 64 px: 16 * 2 * 2 = 64 inputs to toWeight; 96 px: 16 * 3 * 3 = 144
    torch.save(source_model(image_size=64).state_dict(), tmp_path / "s64.t7")
    with pytest.raises(CheckpointError, match=r"deformer\.toWeight\.0\.weight \(9, 64\) vs \(9, 144\)"):
        load_idemenet(tmp_path / "s64.t7", image_size=96)


def test_non_checkpoint_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "x.t7")
    with pytest.raises(CheckpointError):
        load_idemenet(tmp_path / "x.t7", image_size=SIZE)


# --------------------------------------------------------------------------------------------
# Damaged and unsafe files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.05, 0.0])
def test_truncated_file_is_a_checkpoint_error(tmp_path: Path, legacy: bool, keep: float) -> None:
    path = tmp_path / "cut.t7"
    torch.save(source_model().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError):
        load_idemenet(path, image_size=SIZE)
    with pytest.raises(CheckpointError):
        safe_load(path)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_idemenet(tmp_path / "absent.t7", image_size=SIZE)


class OpenPayload:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemPayload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Plain:
    """An ordinary class instance: not a state dict, must not be reconstructed either."""

    def __init__(self) -> None:
        self.weights = torch.ones(2)


@pytest.mark.parametrize("payload", [OpenPayload, SystemPayload])
def test_code_in_a_pickle_is_refused_and_not_executed(tmp_path: Path, payload) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.t7"
    torch.save({"fc.weight": torch.zeros(2), "trap": payload(marker)}, path)
    for load in (safe_load, load_state_dict, lambda p: load_idemenet(p, image_size=SIZE), load_embedding):
        with pytest.raises(CheckpointError, match="refused"):
            load(path)
    assert not marker.exists()
    # control: an unrestricted load of the same file does run the payload
    result = torch.load(path, weights_only=False)
    if hasattr(result["trap"], "close"):
        result["trap"].close()
    assert marker.exists()


def test_class_instance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.t7"
    torch.save(Plain(), path)
    with pytest.raises(CheckpointError, match="refused"):
        safe_load(path)
    torch.save({"model": Plain()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_idemenet(path, image_size=SIZE)


# --------------------------------------------------------------------------------------------
# Atomic saving
# --------------------------------------------------------------------------------------------

class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "models" / "run.t7"
    atomic_save({"a": torch.ones(3)}, path)
    atomic_save({"a": torch.full((3,), 2.0)}, path)
    assert torch.equal(safe_load(path)["a"], torch.full((3,), 2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.t7"]


def test_failed_pickling_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "run.t7"
    atomic_save({"a": torch.arange(5.0)}, path)
    old = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"big": torch.randn(100_000), "bad": Unpicklable()}, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.t7"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_failure_after_writing_keeps_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch, step: str) -> None:
    # the whole new file has been written to the temporary file when fsync or the rename fails
    path = tmp_path / "run.t7"
    atomic_save({"a": torch.arange(5.0)}, path)
    old = path.read_bytes()
    written = []

    def fail(*args, **kwargs):
        written.extend(p.stat().st_size for p in tmp_path.iterdir() if p.name != "run.t7")
        raise OSError(f"simulated {step} failure")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(OSError, match="simulated"):
        atomic_save({"big": torch.randn(100_000)}, path)
    monkeypatch.undo()
    assert written and max(written) > 400_000  # the new data had reached the temporary file
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.t7"]
