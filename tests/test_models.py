"""Tests for ``models.IDeMeNet`` and its deformation sub-networks (docs/original.md §4.1)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import IDeMeNet, SmallDeformNet, TwoBranchDeformNet, blend_patches
from utils.forward import deform_in_chunks, embed_in_chunks


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> IDeMeNet:
    torch.manual_seed(0)
    return IDeMeNet(num_classes=64, image_size=64, fang=3).eval()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_embed_is_torchvisions_resnet18_up_to_the_average_pool(training: bool) -> None:
    """The embedding (docs/original.md §4.1) is torchvision's ResNet-18 without its fc: the 512-d global
    average of layer4, its BatchNorm layers normalising with their running statistics in evaluation mode
    and with the batch's in training mode (the gallery pass, §4.4), updating them as torchvision's do."""
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=64, image_size=64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics and affine parameters away from their initial values, so that they matter
        for norm in (m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)):
            c = norm.num_features
            norm.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            norm.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            norm.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            norm.bias.copy_(torch.rand(c, generator=generator) - 0.5)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(model.backbone.state_dict())
    model.train(training)
    reference.train(training)
    x = images(4, 64, 2)
    with torch.no_grad():
        features = model.embed(x)
        assert torch.equal(features, reference(x))
    assert features.shape == (4, 512)
    ours, theirs = model.backbone.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)  # the same running statistics after the pass


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_embedding_equals_one_pass(model: IDeMeNet, chunk: int) -> None:
    x = images(7, 64, seed=5)
    with torch.no_grad():
        whole, chunked = model.embed(x), embed_in_chunks(model.embed, x, chunk)
    assert chunked.shape == whole.shape == (7, 512)
    torch.testing.assert_close(chunked, whole)


def test_an_image_gets_the_same_features_alone_or_in_a_batch(model: IDeMeNet) -> None:
    """What a feature cache relies on: embedding an image alone (chunks of one) gives the numbers a
    batch gives, bit for bit, on the CPU."""
    x = images(5, 64, seed=8)
    with torch.no_grad():
        together, alone = embed_in_chunks(model.embed, x, 16), embed_in_chunks(model.embed, x, 1)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_deformation_equals_one_pass(model: IDeMeNet, chunk: int) -> None:
    probe, gallery = images(7, 64, seed=6), images(7, 64, seed=7)
    with torch.no_grad():
        whole, chunked = model.deform(probe, gallery), deform_in_chunks(model.deform, probe, gallery, chunk)
    assert chunked[0].shape == whole[0].shape and chunked[1].shape == whole[1].shape == (7, 9)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_deform_gives_images_and_cell_weights(model: IDeMeNet) -> None:
    probe, gallery = images(3, 64, 2), images(3, 64, 3)
    with torch.no_grad():
        deformed, weights = model.deform(probe, gallery)
        assert deformed.shape == (3, 3, 64, 64)
        assert weights.shape == (3, 9)
        # the image is the blend of the two inputs with exactly these weights
        torch.testing.assert_close(deformed, blend_patches(probe, gallery, weights))
        # top-left pixel lies in cell 0, bottom-right in cell 8
        w0, w8 = weights[:, 0].view(3, 1), weights[:, 8].view(3, 1)
        torch.testing.assert_close(deformed[:, :, 0, 0], w0 * probe[:, :, 0, 0] + (1 - w0) * gallery[:, :, 0, 0])
        torch.testing.assert_close(deformed[:, :, -1, -1], w8 * probe[:, :, -1, -1] + (1 - w8) * gallery[:, :, -1, -1])


def test_weights_are_unconstrained() -> None:
    # No sigmoid or clamp after the Linear: a bias of 3 (or -2) with zero weights comes out as is.
    net = IDeMeNet(image_size=32, fang=2).eval()
    layer = net.deformer.toWeight[0]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([3.0, -2.0, 0.5, 1.5]))
        _, weights = net.deform(images(2, 32, 4), images(2, 32, 5))
    assert torch.equal(weights, torch.tensor([[3.0, -2.0, 0.5, 1.5]] * 2))


@pytest.mark.parametrize("size,flat", [(224, 784), (84, 64), (64, 64), (96, 144), (33, 16), (32, 16)])
def test_small_encoder_flatten_size(size: int, flat: int) -> None:
    # 16 channels times (S // 32)^2 after five 2x2 max-pools; 16 * 7 * 7 = 784 at 224 (docs/original.md §4.1).
    net = SmallDeformNet(size, fang=3)
    assert net.toWeight[0].in_features == flat
    assert net.toWeight[0].out_features == 9


def test_small_encoder_layers_follow_the_release() -> None:
    net = SmallDeformNet(64, fang=5)
    channels = [(6, 32), (32, 64), (64, 64), (64, 32), (32, 16)]
    assert len(net.encoder) == 5
    for block, (cin, cout) in zip(net.encoder, channels):
        conv, bn, relu, pool = block
        assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (cin, cout)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == cout
        assert isinstance(relu, nn.ReLU)
        assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2
    assert net.toWeight[0].out_features == 25


def test_small_encoder_forward_at_odd_size() -> None:
    net = SmallDeformNet(37, fang=3).eval()
    with torch.no_grad():
        assert net(images(2, 37, 6), images(2, 37, 7)).shape == (2, 9)


def test_encoder_refuses_images_below_32_px() -> None:
    with pytest.raises(ValueError, match="32"):
        SmallDeformNet(31, fang=3)


def test_unknown_deform_net_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        IDeMeNet(image_size=32, deform_net="bogus")


def test_twobranch_gives_cell_weights() -> None:
    torch.manual_seed(1)
    net = IDeMeNet(image_size=32, fang=3, deform_net="twobranch").eval()
    assert isinstance(net.deformer, TwoBranchDeformNet)
    assert net.deformer.toWeight[0].in_features == 1024
    with torch.no_grad():
        deformed, weights = net.deform(images(2, 32, 8), images(2, 32, 9))
    assert weights.shape == (2, 9)
    assert deformed.shape == (2, 3, 32, 32)


def test_encoder_batchnorm_statistics_stay_at_init_in_eval_mode() -> None:
    # docs/original.md §4.7: the whole stage runs in eval mode, so the deformation encoder's BatchNorm
    # layers keep running mean 0 and variance 1 while their affine parameters train.
    torch.manual_seed(2)
    net = IDeMeNet(image_size=32, fang=3).eval()
    before = {k: v.clone() for k, v in net.deformer.state_dict().items()}
    optimizer = torch.optim.Adam(list(net.deformer.parameters()), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        deformed, weights = net.deform(images(4, 32, 10 + step), images(4, 32, 20 + step))
        (net.embed(deformed).pow(2).mean() + weights.pow(2).mean()).backward()
        optimizer.step()
    bns = [m for m in net.deformer.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5
    for bn in bns:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert bn.num_batches_tracked.item() == 0
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))  # the affine part did train
    after = net.deformer.state_dict()
    assert not torch.equal(after["toWeight.0.weight"], before["toWeight.0.weight"])
