"""Re-estimated BatchNorm statistics (``--preciseBN``): the plain averages against a hand computation,
what the re-estimation leaves alone, the image draw, stage 1's saved files and the checkpoint tool."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import eval_crops
from datasets.splits import read_split
from engine.precise_bn import clean_files, reestimate
from models import EmbeddingNet, load_embedding
from models.batchnorm import reestimate_bn_statistics
from models.loading import with_embedding_statistics
from tests.scripts_helpers import load_script, read_metrics
from utils.checkpoint import safe_load
from utils.errors import CheckpointError, OptionError
from utils.forward import layout_model

precise_bn_script = load_script("scripts/precise_bn.py")
classification = load_script("classification.py")

EPS = 1e-5


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=EPS), nn.ReLU(), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2, eps=EPS))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(7.0)
            bn.num_batches_tracked.fill_(11)
    return net.eval()


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel of ``[B, C, H, W]``: mean, biased and unbiased variance, written out."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1).double()
    n = flat.shape[1]
    mean = flat.sum(1) / n
    square = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, square / n, square / (n - 1)


def test_reestimate_is_the_weighted_plain_average_of_batch_statistics() -> None:
    net = tiny_net()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 3, 6, 6, generator=generator) * 2 + 1 for b in (4, 4, 6, 2)]
    sums = {1: [0, 0], 4: [0, 0]}
    with torch.no_grad():
        for x in batches:
            h = net[0](x)
            mean, biased, unbiased = moments(h)
            sums[1][0] += mean * len(x)
            sums[1][1] += unbiased * len(x)
            normalised = (h - mean.float().view(1, -1, 1, 1)) / torch.sqrt(biased.float().view(1, -1, 1, 1) + EPS)
            h = net[3](torch.relu(normalised * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1)))
            mean, _, unbiased = moments(h)
            sums[4][0] += mean * len(x)
            sums[4][1] += unbiased * len(x)
    seen = reestimate_bn_statistics(net, iter(batches))
    assert seen == 16
    for index, (mean_sum, var_sum) in sums.items():
        torch.testing.assert_close(net[index].running_mean, (mean_sum / 16).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[index].running_var, (var_sum / 16).float(), rtol=1e-5, atol=1e-6)


def test_reestimate_keeps_weights_mode_momentum_and_counter() -> None:
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net[4].train()  # a mixed mode must come back as it was
    reestimate_bn_statistics(net, iter([torch.randn(3, 3, 6, 6)]))
    after = net.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert [m.training for m in net] == [False, False, False, False, True]
    assert net[1].momentum == net[4].momentum == 0.1
    with pytest.raises(ValueError, match="two images"):
        reestimate_bn_statistics(net, iter([torch.randn(1, 3, 6, 6)]))


def test_clean_files_are_a_seeded_draw_from_the_first_files_of_each_class(train_split) -> None:
    drawn = clean_files(train_split, 40, seed=3, files_per_class=2)
    assert len(drawn) == len(set(drawn)) == 40
    allowed = {f for files in train_split.files for f in files[:2]}
    assert set(drawn) <= allowed
    assert drawn == clean_files(train_split, 40, seed=3, files_per_class=2)
    assert drawn != clean_files(train_split, 40, seed=4, files_per_class=2)
    assert len(clean_files(train_split, 10_000, seed=3, files_per_class=2)) == len(allowed)


def stage1_args(root: Path, **overrides) -> argparse.Namespace:
    flags = ["--dataroot", str(root), "--imageSize", "32", "--tensorname", "pbn", "--numEpochs", "1",
             "--batchSize", "32", "--filesPerClass", "2", "--valEpisodes", "4", "--valQueries", "5",
             "--device", "cpu", "--nthreads", "0", "--progress", "0", "--preciseBN", "24"]
    args = classification.get_args_parser().parse_args(flags)
    vars(args).update(overrides)
    return args


def test_stage1_writes_reestimated_statistics_and_reports_both(toy_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The 24 clean images fit one batch of 32, so each BatchNorm's re-estimated statistics are that batch's
    mean and unbiased variance of the layer's input, every layer normalising with the batch's statistics:
    what PyTorch's own BatchNorm stores with momentum 1 after one training-mode pass."""
    monkeypatch.chdir(tmp_path)
    assert classification.main(stage1_args(toy_root)) == 0
    trained = safe_load("runs/pbn/resume.pt")["model"]  # the statistics training left (exponential average)
    saved, best = safe_load("models/pbn.t7"), safe_load("models/pbn_best.t7")
    reference = EmbeddingNet(64)
    reference.load_state_dict(trained)
    for norm in reference.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = 1.0
    batch = eval_crops(clean_files(read_split(toy_root, "train"), 24, 0, 2), 32)
    with torch.no_grad():
        reference.train()(batch)
    expected = reference.state_dict()
    for key, value in trained.items():
        for state in (saved, best):
            if key.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(state[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
                assert not torch.equal(state[key], value), key
            else:
                assert torch.equal(state[key], value), key
    row = read_metrics(Path("runs/pbn/metrics.csv"))[0]
    for column in ("val_1shot", "val_5shot", "val_1shot_precise", "val_5shot_precise"):
        assert 0 <= float(row[column]) <= 100, column


def test_stage1_refuses_a_single_image(toy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match=r"--preciseBN must be 0 \(off\) or at least 2 images, got 1"):
        classification.main(stage1_args(toy_root, preciseBN=1))
    assert not Path("runs").exists() and not Path("models").exists()


@pytest.mark.parametrize("layout", ["stage1", "original"])
def test_tool_replaces_only_the_embedding_statistics_under_every_name(layout: str, toy_root: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    net = EmbeddingNet(64)
    own = net.state_dict()
    if layout == "stage1":
        state = own
    else:  # the authors' GNet names the ResNet twice (docs/original.md §5.2)
        body = {k[len("convnet."):]: v for k, v in own.items() if not k.startswith("convnet.fc.")}
        state = {**{"CNet.resnet." + k: v for k, v in own.items()},
                 **{"CNet." + k: v.clone() for k, v in body.items()},
                 "fc.weight": own["convnet.fc.weight"], "fc.bias": own["convnet.fc.bias"],
                 "scale": torch.ones(1)}
    Path("models").mkdir()
    torch.save(state, "models/net.t7")
    args = precise_bn_script.get_args_parser().parse_args(
        ["--checkpoint", "net", "--dataroot", str(toy_root), "--imageSize", "32", "--images", "20", "--batchSize", "8",
         "--filesPerClass", "3", "--seed", "2", "--device", "cpu", "--nthreads", "0", "--progress", "0"])
    assert precise_bn_script.main(args) == 0
    written = safe_load("models/net_preciseBN.t7")
    reference = layout_model(load_embedding("models/net.t7"))
    reestimate(reference, clean_files(read_split(toy_root, "train"), 20, 2, 3), 32, 8, 0, torch.device("cpu"))
    expected = reference.state_dict()
    assert set(written) == set(state)
    replaced = 0
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            name = "convnet." + key.split("convnet.")[-1] if "convnet." in key else "convnet." + key[len("CNet."):]
            assert torch.equal(written[key], expected[name]), key
            replaced += 1
        else:
            assert torch.equal(written[key], value), key
    assert replaced == (40 if layout == "stage1" else 80)  # 20 BatchNorm layers, once or twice each
    with pytest.raises(OptionError, match="--out models/net.t7: would overwrite the checkpoint it reads"):
        precise_bn_script.main(argparse.Namespace(**{**vars(args), "out": "models/net.t7"}))


def test_with_embedding_statistics_refuses_a_file_without_the_embedding() -> None:
    state = {"convnet.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="no bn1.running_mean in the file's embedding"):
        with_embedding_statistics(state, {"convnet.bn1.running_mean": torch.zeros(1)})
