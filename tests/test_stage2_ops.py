"""Stage 2's per-episode operation savings (issue 32, ``benchmarks/ops.py``) give the numbers of the
computation they replace, bit for bit on the CPU: the frozen BatchNorm's cached factors, foreach Adam,
the support embedded once in round 2, the deformed images embedded in one call under the prototype
loss alone, one call without slice and cat for images that fit a chunk, one stack in DeviceSums.
Each test also checks that the saving happens (the operations or calls it removes are gone)."""
from __future__ import annotations

import copy
import io
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import engine.stage2 as stage2
from conftest import make_episode, make_gallery, uint8_images
from engine.diagnostics import DIAGNOSTICS, DeviceSums
from engine.episode import (
    EPISODE_CLASS,
    SAME_CLASS,
    EpisodeConfig,
    EpisodeResult,
    GalleryBank,
    embed_gallery_train_mode,
    episode_gradients,
    run_episode,
)
from engine.options import stage2_config
from models import IDeMeNet
from models.batchnorm import LeanBatchNorm2d, batch_norms
from tests.scripts_helpers import load_script
from utils.forward import embed_in_chunks

CPU = torch.device("cpu")
SIZE = 32


OpCounter = load_script("benchmarks/ops.py").OpCounter  # ATen operations dispatched while active, by name


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise(layer: LeanBatchNorm2d, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
        layer.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.05)
        layer.weight.copy_(torch.rand(c, generator=generator) + 0.5)
        layer.bias.copy_(torch.rand(c, generator=generator) * 0.6 - 0.3)


def frozen_layer(seed: int = 0) -> LeanBatchNorm2d:
    layer = LeanBatchNorm2d(8).eval()
    randomise(layer, seed)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


def unoptimised_input_gradient(layer: LeanBatchNorm2d, grad: torch.Tensor) -> torch.Tensor:
    """The frozen backward as it was computed before the cache: invstd afresh from the running
    variance (in double), then ``grad * invstd * weight``."""
    invstd = (1 / torch.sqrt(layer.running_var.double() + layer.eps)).to(layer.running_var.dtype)
    return grad * invstd.view(1, -1, 1, 1) * layer.weight.view(1, -1, 1, 1)


def frozen_pass(layer: LeanBatchNorm2d, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, input gradient, the unoptimised input gradient) of one frozen forward and backward."""
    x = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    grad = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(seed + 1))
    y = layer(x)
    assert "_FrozenBatchNorm" in type(y.grad_fn).__name__
    y.backward(grad)
    return y.detach(), x.grad, unoptimised_input_gradient(layer, grad)


# --------------------------------------------------------------------------------------------
# The frozen BatchNorm: factors once per change of the running statistics
# --------------------------------------------------------------------------------------------

def test_frozen_batchnorm_computes_its_factors_once_and_gives_the_recomputed_gradient() -> None:
    layer = frozen_layer()
    _, grad, expected = frozen_pass(layer, seed=1)
    assert torch.equal(grad, expected)
    invstd, weight = layer.frozen_factors()
    assert torch.equal(invstd, (1 / torch.sqrt(layer.running_var.double() + layer.eps)).float().view(1, -1, 1, 1))
    assert torch.equal(weight, layer.weight.view(1, -1, 1, 1))
    # A second pass recomputes nothing: no conversion to double, no square root, no reciprocal, no view.
    x = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_out = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(2))
    with OpCounter() as counter:
        layer(x).backward(grad_out)
    assert torch.equal(x.grad, unoptimised_input_gradient(layer, grad_out))
    counts = counter.counts
    recomputed = {"aten.sqrt.default", "aten.reciprocal.default", "aten._to_copy.default", "aten.view.default"}
    assert not recomputed & set(counts)
    assert counts["aten.native_batch_norm.default"] == 1 and counts["aten.mul.Tensor"] == 2


def test_frozen_batchnorm_output_is_the_stock_eval_output() -> None:
    layer = frozen_layer(seed=3)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    for _ in range(2):  # computing the factors, then from the cache
        y = layer(x)
        assert torch.equal(y.detach(), F.batch_norm(x.detach(), layer.running_mean, layer.running_var, layer.weight,
                                                    layer.bias, False, 0.0, layer.eps))


def _train_forward(layer):
    layer.train()
    layer(torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(5)) * 3 + 1)
    layer.eval()


def _copy_into(layer):
    with torch.no_grad():
        layer.running_var.copy_(layer.running_var * 2.5)


def _load_state(layer):
    other = frozen_layer(seed=11)
    layer.load_state_dict(other.state_dict())


def _replace_buffer(layer):
    layer.running_var = layer.running_var * 0.25  # a new tensor, same version counter value possible


def _replace_weight_storage(layer):
    layer.weight.data = layer.weight.data * 1.75


def _change_eps(layer):
    layer.eps = 0.3


def _reset(layer):
    layer.reset_running_stats()


def _precise_bn(layer):
    from models.batchnorm import reestimate_bn_statistics
    net = torch.nn.Sequential(layer)
    reestimate_bn_statistics(net, [torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(7)) * 2])


UPDATES = {"training-mode forward": _train_forward, "copy_": _copy_into, "load_state_dict": _load_state,
           "buffer replaced": _replace_buffer, "weight storage replaced": _replace_weight_storage, "eps": _change_eps,
           "reset_running_stats": _reset, "reestimate_bn_statistics": _precise_bn}


@pytest.mark.parametrize("update", UPDATES.values(), ids=UPDATES.keys())
def test_a_change_of_the_statistics_invalidates_the_cached_factors(update) -> None:
    """Each way the running variance (or weight, or eps) changes is seen: the next frozen backward
    is the one computed afresh from the new values, and differs from the one before."""
    layer = frozen_layer()
    _, before, expected_before = frozen_pass(layer, seed=2)
    assert torch.equal(before, expected_before)
    frozen_pass(layer, seed=2)  # from the cache
    update(layer)
    _, after, expected_after = frozen_pass(layer, seed=2)
    assert torch.equal(after, expected_after)
    assert not torch.equal(after, before)


def test_a_training_mode_forward_does_not_advance_the_running_variances_version_counter() -> None:
    """Why the running variance's version counter alone would not do: PyTorch updates the running
    statistics in a training-mode forward without advancing their version counters. The same
    forward adds 1 to ``num_batches_tracked`` in place, which advances its counter, also part of the
    key: the stock forward, called past LeanBatchNorm2d's (which drops the cache), is seen too."""
    layer = frozen_layer()
    frozen_pass(layer, seed=2)
    version, var = layer.running_var._version, layer.running_var.clone()
    torch.nn.BatchNorm2d.forward(layer.train(), torch.randn(6, 8, 4, 4) * 3)
    layer.eval()
    assert layer.running_var._version == version and not torch.equal(layer.running_var, var)
    assert layer._frozen_cache is not None
    _, after, expected = frozen_pass(layer, seed=2)
    assert torch.equal(after, expected)


def test_the_gallery_pass_in_training_mode_invalidates_the_embeddings_factors() -> None:
    """The one place stage 2 changes the statistics of a model whose frozen factors may be cached
    (the gallery pass with --galleryBN train): afterwards the gradients are those of a model built
    afresh with the new statistics."""
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=5, image_size=SIZE).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)

    def deformer_grads(net):
        net.zero_grad()
        deformed, _ = net.deform(images(4, 1), images(4, 2))
        net.embed(deformed).square().sum().backward()
        return [p.grad.clone() for p in net.deformer.parameters()]

    deformer_grads(model)  # fills the cache
    assert all(layer._frozen_cache is not None for layer in batch_norms(model.backbone))
    gallery = make_gallery(uint8_images(8, seed=3), torch.arange(8) % 4)
    embed_gallery_train_mode(model, gallery, CPU)
    fresh = IDeMeNet(num_classes=5, image_size=SIZE).eval()
    fresh.load_state_dict(model.state_dict())
    for p in fresh.backbone.parameters():
        p.requires_grad_(False)
    for ours, theirs in zip(deformer_grads(model), deformer_grads(fresh)):
        assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------------------------
# Adam: multi-tensor steps, the per-parameter numbers, one read of the step counts per group
# --------------------------------------------------------------------------------------------

def random_grads(pairs, generator: torch.Generator, scale: float, skip: bool) -> None:
    """The same random gradient on both parameters of each pair; none on every fifth when ``skip``."""
    for i, (p, q) in enumerate(pairs):
        if skip and i % 5 == 0:
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=generator) * scale
        p.grad, q.grad = grad.clone(), grad.clone()


def torch_adams(model: IDeMeNet, config) -> dict:
    """PyTorch's per-parameter Adams in make_optimizers' groups and rates."""
    return {"meta_opt": torch.optim.Adam(list(model.deformer.parameters()), lr=config.LR, foreach=False),
            "scale_opt": torch.optim.Adam([model.scale], lr=config.LR, foreach=False),
            "cls_opt": torch.optim.Adam([{"params": list(model.backbone.parameters()), "lr": config.clsLR * 0.1},
                                         {"params": list(model.fc.parameters()), "lr": config.clsLR}], foreach=False)}


def saved_and_loaded(optimizers: dict) -> dict:
    """The optimisers' states through a file's bytes, as a resume reads them (utils.checkpoint)."""
    buffer = io.BytesIO()
    torch.save({key: optimizer.state_dict() for key, optimizer in optimizers.items()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def test_episode_adam_steps_torch_adams_numbers_reads_no_step_per_parameter_and_resumes_either_way() -> None:
    torch.manual_seed(0)
    model = IDeMeNet(num_classes=5, image_size=SIZE)
    config = stage2_config(CPU, tensorname="adam", network="x", LR=0.001, clsLR=0.01)
    reference = copy.deepcopy(model)
    ours, theirs = stage2.make_optimizers(model, config)[0], torch_adams(reference, config)
    generator = torch.Generator().manual_seed(1)
    pairs = list(zip(model.parameters(), reference.parameters()))

    def step_both(step: int) -> Counter:
        random_grads(pairs, generator, 10.0 ** (step % 4 - 2), skip=step == 2)  # step 2: some not stepped
        with OpCounter() as counter:
            for optimizer in ours.values():
                optimizer.step()
        for optimizer in theirs.values():
            optimizer.step()
        return counter.counts

    for step in range(6):
        counts = step_both(step)
        assert counts["aten.lerp_.Scalar"] == 0  # per parameter: none; per group with gradients: one
        assert counts["aten._foreach_lerp_.Scalar"] == (4 if step != 2 else 3)  # step 2: the scale has none
        assert counts["aten._local_scalar_dense.default"] == 0  # torch's reads each step count twice
    assert_same_parameters_and_states(pairs, ours, theirs)
    # Fresh optimisers resume from the other kind's saved state (ours from an earlier run's torch Adam) and
    # step on alike.
    our_state, their_state = saved_and_loaded(ours), saved_and_loaded(theirs)
    ours, theirs = stage2.make_optimizers(model, config)[0], torch_adams(reference, config)
    for key in ours:
        ours[key].load_state_dict(their_state[key])
        theirs[key].load_state_dict(our_state[key])
    for step in range(6, 9):
        step_both(step)
    assert_same_parameters_and_states(pairs, ours, theirs)


def test_episode_adam_refuses_a_state_with_settings_it_does_not_implement() -> None:
    model = IDeMeNet(num_classes=5, image_size=SIZE)
    optimizer = stage2.EpisodeAdam(list(model.fc.parameters()))
    state = torch.optim.Adam(list(model.fc.parameters()), weight_decay=1e-4).state_dict()
    with pytest.raises(ValueError, match="does not implement: {'weight_decay': 0.0001}"):
        optimizer.load_state_dict(state)


def assert_same_parameters_and_states(pairs, optimizers: dict, reference_optimizers: dict) -> None:
    for p, q in pairs:
        assert torch.equal(p, q)
    for key, optimizer in optimizers.items():
        for p, q in zip((p for g in optimizer.param_groups for p in g["params"]),
                        (q for g in reference_optimizers[key].param_groups for q in g["params"])):
            for name in ("step", "exp_avg", "exp_avg_sq"):
                ours, theirs = optimizer.state[p][name], reference_optimizers[key].state[q][name]
                assert torch.equal(ours, theirs) and (ours.dtype, ours.device) == (theirs.dtype, theirs.device)


# --------------------------------------------------------------------------------------------
# The embedding calls of an episode
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet() -> IDeMeNet:
    torch.manual_seed(0)
    return IDeMeNet(num_classes=8, image_size=SIZE).eval()


def test_one_call_for_images_that_fit_a_chunk_gives_the_slice_and_cat_numbers(resnet) -> None:
    x = images(5, seed=3).requires_grad_(True)
    ours = embed_in_chunks(resnet.embed, x, 16)
    (ours_grad,) = torch.autograd.grad(ours.square().sum(), x)
    theirs = torch.cat([resnet.embed(x[0:16]).float()])  # the loop's one chunk, as before
    (theirs_grad,) = torch.autograd.grad(theirs.square().sum(), x)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)
    with torch.no_grad(), OpCounter() as counter:
        embed_in_chunks(resnet.embed, x, 16)
    assert counter.counts["aten.cat.default"] == 0


def test_the_support_embedded_with_a_graph_gives_the_plain_features(resnet) -> None:
    """Round 2 embeds the support once, with the graph the classification loss needs, and takes the
    plain (no-graph) features from it: the same numbers as a pass without autograd."""
    model = copy.deepcopy(resnet)
    for p in model.parameters():
        p.requires_grad_(True)  # a trained embedding: the stock BatchNorm
    x = images(5, seed=4)
    with torch.no_grad():
        plain = embed_in_chunks(model.embed, x, 16)
    with torch.enable_grad():
        graph = embed_in_chunks(model.embed, x, 16)
    assert graph.requires_grad and torch.equal(graph.detach(), plain)


def test_the_deformed_images_in_one_call_give_the_chunks_numbers_and_gradients(resnet) -> None:
    """Under the prototype loss alone (a frozen embedding) the deformed images are embedded in one
    call: the features and the deformation network's gradients are those of the chunks."""
    model = copy.deepcopy(resnet)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    probe, gallery = images(10, seed=5), images(10, seed=6)
    results = []
    for chunk in (4, 10):
        model.zero_grad()
        deformed, _ = model.deform(probe, gallery)
        features = embed_in_chunks(model.embed, deformed, chunk)
        (features * torch.linspace(-1, 1, features.shape[1])).square().sum().backward()
        results.append((features.detach(), [p.grad.clone() for p in model.deformer.parameters()]))
    (chunked, chunked_grads), (whole, whole_grads) = results
    assert torch.equal(chunked, whole)
    for a, b in zip(chunked_grads, whole_grads):
        assert torch.equal(a, b)


def episode_images_embedded(model: IDeMeNet, train_cls: bool, track_grad: bool, chunk: int) -> list[int]:
    """The batch sizes of each embedding call of one 3-way 1-shot episode (2 queries a class, augnum
    2: 6 deformed images), the gallery already embedded."""
    gallery = make_gallery(uint8_images(6, seed=8), torch.arange(6) % 3)
    bank = GalleryBank(gallery, model, CPU, chunk)
    episode = make_episode(3, 1, 2, 2, 2, len(bank), 9, classes=[0, 1, 2], seed=12)
    calls = []

    def embed(x):
        calls.append(len(x))
        return model.embed(x)

    config = EpisodeConfig(3, 2, 2, chunk=chunk)
    result = run_episode(model, episode, bank, config, CPU, train_cls=train_cls, track_grad=track_grad, embed=embed)
    assert result.proto_loss.requires_grad == (track_grad or train_cls)
    return calls


def test_round_two_embeds_the_support_once(resnet) -> None:
    model = copy.deepcopy(resnet)
    # support 3 (one call, with a graph), query 6, deformed 6 in chunks of 4 (the classification loss
    # sums the embedding's weight gradient per chunk: the chunks stay)
    assert episode_images_embedded(model, train_cls=True, track_grad=True, chunk=4) == [3, 4, 2, 4, 2]


def test_round_one_embeds_the_deformed_images_in_one_call(resnet) -> None:
    model = copy.deepcopy(resnet)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    # support 3, query 4 + 2, deformed 6 in one call (graph for the prototype loss alone)
    assert episode_images_embedded(model, train_cls=False, track_grad=True, chunk=4) == [3, 4, 2, 6]
    # without a graph (evaluation) the chunks bound the memory: they stay
    with torch.no_grad():
        assert episode_images_embedded(model, train_cls=False, track_grad=False, chunk=4) == [3, 4, 2, 4, 2]


def test_a_parameter_both_losses_reach_gets_the_sum_of_their_gradients() -> None:
    a, b = torch.nn.Parameter(torch.tensor([0.5, -0.25])), torch.nn.Parameter(torch.tensor([2.0]))
    shared = (a * torch.tensor([1.0, 2.0])).sum()
    result = EpisodeResult(shared ** 2, shared + 3 * b.sum(), *[None] * 10)
    episode_gradients(result, [a], [a, b])
    assert torch.equal(a.grad, 2 * shared.detach() * torch.tensor([1.0, 2.0]) + torch.tensor([1.0, 2.0]))
    assert torch.equal(b.grad, torch.tensor([3.0]))


def test_parameters_given_one_gradient_tensor_get_memory_of_their_own() -> None:
    """Autograd hands ``a + b``'s one gradient tensor to both, and ``c + cat([d, e])``'s to ``c`` and, as slices
    of it, to ``d`` and ``e``; a GradScaler unscales each ``.grad`` in place, so shared memory would be unscaled
    twice. Slices of one buffer that do not overlap (DataParallel's gradients) stay as they are."""
    a, b, c = (torch.nn.Parameter(torch.zeros(4)) for _ in range(3))
    d, e = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    result = EpisodeResult(((a + b) * weights).sum() + ((c + torch.cat([d, e])) * weights).sum(), None, *[None] * 10)
    episode_gradients(result, [a, b, c, d, e], [])
    for param in (a, c):
        param.grad.mul_(0.5)
    assert torch.equal(b.grad, weights) and torch.equal(d.grad, weights[:2]) and torch.equal(e.grad, weights[2:])
    f, g = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    episode_gradients(EpisodeResult((torch.cat([f, g]) * weights).sum(), None, *[None] * 10), [f, g], [])
    assert f.grad.untyped_storage().data_ptr() == g.grad.untyped_storage().data_ptr()  # not copied


# --------------------------------------------------------------------------------------------
# DeviceSums: one stack, one conversion
# --------------------------------------------------------------------------------------------

def test_device_sums_add_the_per_value_float64_numbers_with_one_conversion() -> None:
    generator = torch.Generator().manual_seed(3)
    progress = stage2.new_progress()
    sums = DeviceSums(progress, CPU)
    expected = {d.name: 0.0 for d in DIAGNOSTICS}
    for episode in range(5):
        weights = torch.randn(6, 9, generator=generator)
        relation = torch.randint(0, 3, (6,), generator=generator)
        result = EpisodeResult(torch.rand((), generator=generator) * 3, torch.rand((), generator=generator) * 7
                               if episode % 2 else None, torch.rand((), generator=generator),
                               torch.rand((), generator=generator), weights, None, None, None,
                               own_distance=torch.rand((), generator=generator) * 100,
                               other_distance=torch.rand((), generator=generator) * 100)
        values = {"proto_loss": result.proto_loss, "acc": result.accuracy, "plain_acc": result.plain_accuracy,
                  "weight_sum": weights.sum(), "weight_sq": weights.pow(2).sum(), "own_distance": result.own_distance,
                  "other_distance": result.other_distance, "same_class": (relation == SAME_CLASS).sum(),
                  "episode_class": (relation == EPISODE_CLASS).sum()}
        if result.cls_loss is not None:
            values["cls_loss"] = result.cls_loss
        for key, value in values.items():  # the former per-value conversion
            expected[key] = (torch.tensor(expected[key], dtype=torch.float64) + value.double()).item()
        with OpCounter() as counter:
            sums.add(result, relation)
        assert counter.counts["aten._to_copy.default"] == 1 and counter.counts["aten.stack.default"] == 1
    assert sums.read() is None
    assert {key: progress[key] for key in expected} == expected
    assert progress["same_class"] > 0 and progress["cls_loss"] > 0
    assert (progress["step"], progress["cls_steps"], progress["weight_n"], progress["relation_n"]) == (5, 2, 270, 30)
