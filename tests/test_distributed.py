"""Stage-1 data parallelism on the CPU: gloo processes must compute what one process computes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datasets.toy import generate
from engine.stage1 import distribute, multi_gpu_hint
from models import EmbeddingNet
from models.batchnorm import convert_to_gloo_sync
from tests.scripts_helpers import REPO, free_port, read_metrics, run_script, script_env
from utils.distributed import DistInfo

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo missing")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.randint(10, (8,), generator=generator)


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(convert_to_gloo_sync(EmbeddingNet(10)))
    images, labels = _batch()
    mine = slice(rank * 4, rank * 4 + 4)
    nn.functional.cross_entropy(model(images[mine]), labels[mine]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batchnorm_gradients_match_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = EmbeddingNet(10)
    images, labels = _batch()
    nn.functional.cross_entropy(model(images), labels).backward()
    distributed = torch.load(out)
    for name, param in model.named_parameters():
        # float32 rounding differs with the batch split; per-process BatchNorm would be off by far more.
        tolerance = 5e-5 * param.grad.abs().max().item()
        torch.testing.assert_close(distributed[name], param.grad, rtol=0, atol=tolerance, msg=name)


def _stage1_net() -> nn.Module:
    """Stage 1's network with non-trivial running statistics (the same in every process)."""
    torch.manual_seed(0)
    net = EmbeddingNet(10)
    generator = torch.Generator().manual_seed(2)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.3, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return net


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    net = model.module if hasattr(model, "module") else model
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches" in k}


def _statistics_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = distribute(_stage1_net(), torch.device("cpu"), DistInfo(rank, 2, rank))
    model.train()
    images, _ = _batch()
    model(images[rank * 4:rank * 4 + 4])
    if rank == 0:
        torch.save(_statistics(model), out)
    dist.destroy_process_group()


def test_stage1_batch_statistics_of_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """Stage 1's network as ``distribute`` prepares it: one training step's BatchNorm update over two
    gloo processes of 4 images each equals one process's over the 8 (and one process's own
    statistics of its 4 images differ)."""
    out = str(tmp_path / "stats.pt")
    mp.spawn(_statistics_worker, args=(free_port(), out), nprocs=2, join=True)
    single = distribute(_stage1_net(), torch.device("cpu"), DistInfo())
    assert isinstance(single, EmbeddingNet)  # no DataParallel, no wrapper: the whole batch in one call
    single.train()
    images, _ = _batch()
    single(images)
    want, got = _statistics(single), torch.load(out)
    assert want.keys() == got.keys() and len(want) == 3 * 20
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    half = _stage1_net().train()
    half(images[:4])
    assert not torch.allclose(_statistics(half)["convnet.bn1.running_var"], want["convnet.bn1.running_var"],
                              rtol=1e-3)


def test_stage1_on_several_gpus_without_torchrun_says_how_to_use_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    hint = multi_gpu_hint(torch.device("cuda", 0), DistInfo())
    assert hint is not None and "torchrun --nproc_per_node=4" in hint and "\n" not in hint
    assert multi_gpu_hint(torch.device("cuda", 0), DistInfo(0, 4, 0)) is None  # already under torchrun
    assert multi_gpu_hint(torch.device("cpu"), DistInfo()) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert multi_gpu_hint(torch.device("cuda", 0), DistInfo()) is None


def _losses(path) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(path)]


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_loss(tmp_path):
    generate(tmp_path / "toy", per_class=4, size=36, seed=0)
    flags = ["--dataroot", "toy", "--imageSize", "32", "--numEpochs", "2", "--batchSize", "128", "--nthreads", "0",
             "--filesPerClass", "1", "--valEpisodes", "0", "--progress", "0"]
    single = run_script(tmp_path, "classification.py", *flags, "--tensorname", "single")
    assert single.returncode == 0, single.stderr
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "classification.py"), *flags, "--tensorname", "double"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = _losses(tmp_path / "runs/single/metrics.csv"), _losses(tmp_path / "runs/double/metrics.csv")
    # Epoch 0 is one step on the same 128 images from the same initial weights: the same loss.
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    # Epoch 1 follows one Adam step; Adam's sign-like first step amplifies rounding in tiny gradients.
    assert two[1] == pytest.approx(one[1], rel=2e-3)
    assert os.path.isfile(tmp_path / "models/double.t7")
