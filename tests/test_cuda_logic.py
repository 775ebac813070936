"""The CUDA decisions, checked on the CPU against a faked ``torch.cuda``: the --amp dtype of the chosen
GPU, loss scaling for float16, --device cuda:N, TF32 and determinism flags, DataParallel only when asked."""
from __future__ import annotations

import argparse
import os
import types

import pytest
import torch
from torch import nn

from engine import stage2
from engine.episode import episode_gradients
from models import IDeMeNet
from tests.scripts_helpers import script_env
from utils.errors import OptionError
from utils.forward import AutocastReplica, amp_dtype, grad_scaler, step_optimizers
from utils.options import configure_backend, resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Fake GPUs: ``gpus(capabilities)`` makes ``len(capabilities)`` of them visible, GPU i of compute
    capability ``capabilities[i]``; returns the list of ``set_device`` calls."""
    calls = []

    def install(*capabilities):
        current = [0]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])

        def capability(device=None):
            index = current[0] if device is None or torch.device(device).index is None else torch.device(device).index
            return capabilities[index]

        def set_device(device):
            calls.append(torch.device(device))
            current[0] = torch.device(device).index

        monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        return calls

    return install


@pytest.fixture
def backend_flags():
    """Restore the global backend flags configure_backend sets."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:4]
    torch.use_deterministic_algorithms(saved[4])
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"device": None, "amp": 0, **flags})


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)])
def test_amp_uses_bfloat16_only_where_the_gpu_has_it_natively(gpus, capability, dtype):
    gpus(capability)
    assert amp_dtype(torch.device("cuda", 0)) == dtype


def test_the_amp_dtype_is_that_of_the_chosen_gpu_not_of_gpu_0(gpus):
    gpus((7, 0), (8, 0))  # a V100 beside an A100
    assert amp_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert amp_dtype(torch.device("cuda", 0)) == torch.float16


def test_float16_gets_a_loss_scaler_bfloat16_and_the_cpu_do_not(gpus):
    gpus((7, 5), (9, 0))
    assert grad_scaler(torch.device("cuda", 0), True).is_enabled()
    assert not grad_scaler(torch.device("cuda", 0), False).is_enabled()
    assert not grad_scaler(torch.device("cuda", 1), True).is_enabled()
    assert not grad_scaler(torch.device("cpu"), True).is_enabled()


def test_amp_on_a_gpu_without_native_bfloat16_is_accepted(gpus):
    gpus((7, 0))
    assert resolve_device(_args(device="cuda", amp=1)) == torch.device("cuda", 0)
    with pytest.raises(OptionError, match="--amp 1 needs a CUDA device"):
        resolve_device(_args(device="cpu", amp=1))


def test_device_cuda_n_becomes_the_current_device(gpus):
    calls = gpus((8, 0), (8, 0), (8, 0))
    assert resolve_device(_args(device="cuda:2")) == torch.device("cuda", 2)
    assert calls == [torch.device("cuda", 2)]
    assert resolve_device(_args(device="cuda")) == torch.device("cuda", 2)  # the current one, with its index
    with pytest.raises(OptionError, match="only 3 GPU"):
        resolve_device(_args(device="cuda:3"))


@pytest.mark.parametrize("capability,tf32,deterministic,expected", [
    ((8, 0), True, False, True), ((9, 0), True, False, True), ((7, 0), True, False, False),
    ((8, 0), False, False, False), ((8, 0), True, True, False)])
def test_tf32_convolutions_on_ampere_by_default_matrix_products_never(gpus, backend_flags, monkeypatch, capability,
                                                                     tf32, deterministic, expected):
    gpus(capability)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_backend(torch.device("cuda", 0), deterministic, 0, tf32=tf32)
    assert torch.backends.cudnn.allow_tf32 is expected
    assert torch.backends.cuda.matmul.allow_tf32 is False  # prototype distances in full float32
    assert torch.backends.cudnn.benchmark is not deterministic
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic


def test_stage2_uses_dataparallel_only_when_asked_on_the_chosen_device(gpus, monkeypatch):
    made = []
    monkeypatch.setattr(nn, "DataParallel", lambda module, device_ids, output_device: made.append(
        (module, device_ids, output_device)) or "replicated")
    model = IDeMeNet(5, image_size=32)
    gpus((8, 0), (8, 0), (8, 0))
    cuda1 = torch.device("cuda", 1)
    assert stage2.make_embed(model, cuda1) == model.embed
    assert stage2.make_embed(model, torch.device("cpu"), True) == model.embed
    assert stage2.make_embed(model, cuda1, True) == "replicated"
    module, device_ids, output_device = made[0]
    assert isinstance(module, AutocastReplica) and module.module is model.backbone
    assert device_ids == [1, 0, 2] and output_device == 1  # the replicas gather on --device
    gpus((8, 0))
    assert stage2.make_embed(model, torch.device("cuda", 0), True) == model.embed  # one GPU: nothing to split


def _two_losses(weight_a: torch.Tensor, weight_b: torch.Tensor, scale: float = 1.0):
    """A stand-in for an episode's result: a prototype loss of ``a`` and a classification loss of
    ``a`` and ``b`` (as the embedding feeds both), from one graph."""
    x = torch.tensor([1.0, 2.0])
    shared = (weight_a * x).sum()
    return types.SimpleNamespace(proto_loss=shared ** 2 * scale, cls_loss=(shared + (weight_b * x).sum()) * scale)


def test_float16_steps_each_scaled_loss_and_each_optimiser_then_updates_once():
    """Scaled as on a V100: the steps equal the unscaled ones; an optimiser without gradients
    (frozen) is skipped; an inf gradient skips every step and halves the scale, once."""
    def run(scaler, scale=1.0):
        a, b, frozen = (nn.Parameter(torch.tensor([0.5, -0.25])) for _ in range(3))
        meta, cls, idle = (torch.optim.SGD([p], lr=0.1) for p in (a, b, frozen))
        episode_gradients(_two_losses(a, b, scale), [a], [a, b], scaler)
        step_optimizers([meta, cls, idle], scaler)
        return a.detach(), b.detach(), frozen.detach()

    plain = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # the arithmetic of the CUDA one, on the CPU
    scaled = run(scaler)
    for got, want in zip(scaled, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(plain[2], torch.tensor([0.5, -0.25]))
    assert scaler.get_scale() == 1024.0
    overflow = run(scaler, scale=float("inf"))
    assert torch.equal(overflow[0], torch.tensor([0.5, -0.25])) and torch.equal(overflow[1], torch.tensor([0.5, -0.25]))
    assert scaler.get_scale() == 512.0


def test_scripts_run_by_the_tests_see_no_gpu_unless_asked():
    assert script_env()["CUDA_VISIBLE_DEVICES"] == ""
    assert script_env(cuda=True).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
