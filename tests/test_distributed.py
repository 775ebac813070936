"""Stage-1 data parallelism on the CPU: gloo processes must compute what one process computes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datasets.toy import generate
from models import EmbeddingNet
from tests.scripts_helpers import REPO, read_metrics, run_script, script_env
from utils.syncbn import convert_to_gloo_sync

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = EmbeddingNet(10)
    images, labels = _batch()
    nn.functional.cross_entropy(model(images), labels).backward()
    distributed = torch.load(out)
    for name, param in model.named_parameters():
        # float32 rounding differs with the batch split; per-process BatchNorm would be off by far more.
        tolerance = 5e-5 * param.grad.abs().max().item()
        torch.testing.assert_close(distributed[name], param.grad, rtol=0, atol=tolerance, msg=name)


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
