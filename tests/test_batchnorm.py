"""LeanBatchNorm2d: the stock layer's numbers, without keeping activations when frozen."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import IDeMeNet
from models.batchnorm import LeanBatchNorm2d

SIZE = 64


def randomise_statistics(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so the gain differs per channel."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) * 0.6 - 0.3)


def with_stock_batchnorm(model: IDeMeNet) -> IDeMeNet:
    """A copy of ``model`` whose embedding uses ``nn.BatchNorm2d`` with the same state."""
    ref = copy.deepcopy(model)
    for module in list(ref.backbone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LeanBatchNorm2d):
                stock = nn.BatchNorm2d(child.num_features)
                stock.load_state_dict(child.state_dict())
                setattr(module, name, stock.train(child.training))
    return ref


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.fixture()
def frozen_pair() -> tuple[IDeMeNet, IDeMeNet]:
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=5, image_size=SIZE).eval()
    randomise_statistics(model, seed=1)
    ref = with_stock_batchnorm(model)
    for net in (model, ref):
        for p in net.backbone.parameters():
            p.requires_grad_(False)
    return model, ref


def test_embedding_uses_lean_batchnorm_with_stock_state_dict_keys() -> None:
    model = IDeMeNet(num_classes=5, image_size=SIZE)
    assert sum(isinstance(m, LeanBatchNorm2d) for m in model.backbone.modules()) == 20
    assert model.state_dict().keys() == with_stock_batchnorm(model).state_dict().keys()


def test_frozen_embedding_gives_the_stock_features_and_deformer_gradients(frozen_pair) -> None:
    torch.manual_seed(2)
    probe, gallery = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)
    results = []
    for net in frozen_pair:
        deformed, _ = net.deform(probe, gallery)
        features = net.embed(deformed)
        net.zero_grad()
        features.square().sum().backward()
        results.append((features.detach(), [p.grad.clone() for p in net.deformer.parameters()]))
    (lean_features, lean_grads), (stock_features, stock_grads) = results
    assert torch.equal(lean_features, stock_features)
    for lean, stock in zip(lean_grads, stock_grads):
        torch.testing.assert_close(lean, stock, rtol=1e-6, atol=1e-6 * float(stock.abs().max()))


def test_frozen_embedding_keeps_no_batchnorm_inputs_for_backward(frozen_pair) -> None:
    model, ref = frozen_pair
    images = torch.randn(4, 3, SIZE, SIZE, requires_grad=True)
    lean = saved_bytes(lambda: model.embed(images))
    bn_inputs = []
    hooks = [m.register_forward_hook(lambda _m, inputs, _out: bn_inputs.append(inputs[0].nbytes))
             for m in ref.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    stock = saved_bytes(lambda: ref.embed(images))
    for hook in hooks:
        hook.remove()
    # Each BatchNorm input is a conv output that nothing else keeps: those bytes are saved, up to
    # the per-channel vectors each variant keeps (under 1 %).
    assert len(bn_inputs) == 20
    assert abs((stock - lean) - sum(bn_inputs)) < 0.01 * sum(bn_inputs)


def test_trainable_or_training_batchnorm_is_the_stock_layer() -> None:
    torch.manual_seed(3)
    layer = LeanBatchNorm2d(8).eval()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    layer.train()
    y = layer(torch.randn(2, 8, 5, 5, requires_grad=True))
    assert "_FrozenBatchNorm" not in type(y.grad_fn).__name__
    assert int(layer.num_batches_tracked) == 1
