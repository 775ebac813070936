"""Several processes (gloo on the CPU) stay in step: the same number of steps per rank, a failure or a
stop on one rank reaching all of them, the val monitor sharded over them with one process's numbers,
the low-shot feature extraction split over them and stopped together."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datasets import read_split
from datasets.toy import generate
from engine.fewshot import evaluate_embedding
from engine.lowshot import FeatureStore
from engine.options import stage1_config
from engine.run import lock_run, release_run, run_lock
from engine.stage1 import new_progress, train_one_epoch
from models import EmbeddingNet
from tests.scripts_helpers import REPO, free_port, read_metrics, script_env
from utils.distributed import DistInfo, gather_round_robin, step_verdict
from utils.errors import OptionError, TrainingDiverged
from utils.interrupt import Interrupted

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo missing")

WORLD = 3
CPU = torch.device("cpu")
EPISODES = 10  # not a multiple of WORLD: the shards differ in size


def _monitor(split, stop=None, info: DistInfo = DistInfo()) -> list[float]:
    torch.manual_seed(0)
    net = EmbeddingNet(5).eval()
    return evaluate_embedding(net.features, split, 32, 5, 1, 2, EPISODES, 0, CPU, chunk=16, progress=False,
                              stop=stop, info=info)


def _train(model: nn.Module, batches: list, info: DistInfo, stop=lambda: False) -> dict:
    config = stage1_config(tensorname="multiprocess", progress=0)
    progress = new_progress()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, batches, CPU, 0, config, info, progress, stop=stop)
    return progress


def _outcome(call) -> str:
    """What ``call()`` did: ``ok``, or the exception's class and message."""
    try:
        call()
    except (Interrupted, TrainingDiverged) as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def _stores(out: str, rank: int) -> dict[str, FeatureStore]:
    """The feature stores of the extraction checks: blocks of 2 of 20 toy images."""
    files = sorted((Path(out) / "toy/images").glob("*.jpg"))[:20]
    return {name: FeatureStore(Path(out) / name, files, 32, block=2, create=rank == 0)
            for name in ("single", "whole", "stopped")}


def _extractions(rank: int, out: str) -> dict:
    """Feature extraction over the ranks: shares of 4, 3 and 3 blocks (3, 2 and 2 batches of 3)."""
    info = DistInfo(rank, WORLD, rank)
    torch.manual_seed(0)
    net = EmbeddingNet(3).eval().features
    embedded = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        embedded.append(len(images))
        return net(images)

    stores = _stores(out, rank)
    result = {}
    if rank == 0:  # one process's features, to compare with
        stores["single"].extract(net, CPU, 3, 0, False, DistInfo(), None, False, "single")
    missing = stores["whole"].missing()
    dist.barrier()  # every rank has read the same missing blocks before any is written
    stores["whole"].extract(net, CPU, 3, 0, False, info, None, False, "whole", missing)
    missing = stores["stopped"].missing()
    dist.barrier()
    # rank 1 is stopped after its first batch, the others are not
    result["stopped"] = _outcome(lambda: stores["stopped"].extract(net, CPU, 3, 0, False, info, lambda: rank == 1,
                                                                    False, "base_train", missing))
    dist.barrier()
    result["missing_after_stop"] = stores["stopped"].missing()
    result["kept"] = {b: stores["stopped"].block_path(b).stat().st_mtime_ns for b in range(10)
                      if b not in result["missing_after_stop"]}
    dist.barrier()
    result["resumed"] = _outcome(lambda: stores["stopped"].extract(counting, CPU, 2, 0, False, info, None, False,
                                                                    "base_train", result["missing_after_stop"]))
    result["resumed_images"] = sum(embedded)
    return result


def _lock_outcome(run_dir: Path, info: DistInfo) -> str:
    try:
        with run_lock(run_dir, info):
            return "taken"
    except OptionError as error:
        return f"OptionError: {error}"


def _worker(rank: int, port: int, root: str, out: str) -> None:
    # a short timeout: a rank left waiting fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    info = DistInfo(rank, WORLD, rank)
    torch.set_num_threads(1)
    result = {}
    result["verdict"] = step_verdict(torch.tensor(rank != 1), rank == 2, info, torch.tensor([float(rank), 0.5]))
    values, stopped = gather_round_robin([10.0 * p for p in range(rank, 7, WORLD)], 7, False, CPU, info)
    result["gathered"] = (values, stopped)
    split = read_split(root, "val")
    result["monitor"] = _monitor(split, info=info)
    result["monitor_stop_on_rank_1"] = _outcome(lambda: _monitor(split, stop=lambda: rank == 1, info=info))

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(27, 3)))
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(rank)
    # soft-random batches of two 3 x 3 px images: uint8 pairs, labels, cell weights, blended flags
    batches = [(torch.randint(0, 256, (2, 2, 3, 3, 3), dtype=torch.uint8, generator=generator), torch.tensor([0, 1]),
                torch.rand(2, 9, generator=generator), torch.tensor([True, False])) for _ in range(3)]
    # Rank 2 alone sees a non-finite loss at its second step (a NaN blending weight); the others must not wait
    # for it in the backward pass's all-reduce.
    pairs, labels, weights, blended = batches[1]
    poisoned = [batches[0], (pairs, labels, weights * (float("nan") if rank == 2 else 1.0), blended), batches[2]]
    result["nan_on_rank_2"] = _outcome(lambda: _train(model, poisoned, info))
    result["stepped"] = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    result["finite"] = all(torch.isfinite(p).all().item() for p in model.parameters())
    calls = iter(range(100))
    result["stop_on_rank_0"] = _outcome(lambda: _train(model, batches, info, stop=lambda: rank == 0
                                                       and next(calls) == 1))
    result["extraction"] = _extractions(rank, out)
    result["lock_busy"] = _lock_outcome(Path(out) / "runs/busy", info)  # held by the test's process
    result["lock_free"] = _lock_outcome(Path(out) / "runs/free", info)
    torch.save(result, f"{out}/rank{rank}.pt")
    # every rank done with the last collective before any closes its connections (a rank whose peer is gone
    # mid-transfer can abort in gloo's transport: seen once in CI as SIGABRT at the end of the fixture)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of three gloo processes saw (one spawn for every check, to keep it fast)."""
    root = tmp_path_factory.mktemp("multiprocess")
    generate(root / "toy", per_class=4, size=36, seed=0)
    held = lock_run(root / "runs/busy")
    try:
        mp.spawn(_worker, args=(free_port(), str(root / "toy"), str(root)), nprocs=WORLD, join=True)
    finally:
        release_run(held)
    return root, [torch.load(root / f"rank{rank}.pt") for rank in range(WORLD)]


def test_every_rank_gets_the_same_verdict_naming_the_rank_that_diverged(ranks):
    _, results = ranks
    # the local statistics come back unreduced
    assert [r["verdict"] for r in results] == [([1], True, [float(rank), 0.5]) for rank in range(WORLD)]


def test_round_robin_values_are_gathered_in_item_order(ranks):
    _, results = ranks
    for result in results:
        assert result["gathered"] == ([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0], False)


def test_the_sharded_val_monitor_gives_one_process_numbers_on_every_rank(ranks):
    root, results = ranks
    single = _monitor(read_split(root / "toy", "val"))
    assert len(single) == EPISODES and len(set(single)) > 1
    for result in results:
        assert result["monitor"] == single


def test_a_stop_on_one_rank_during_the_monitor_stops_every_rank(ranks):
    _, results = ranks
    assert results[1]["monitor_stop_on_rank_1"] == "Interrupted: while embedding the eval images"
    for result in (results[0], results[2]):
        assert result["monitor_stop_on_rank_1"] == "Interrupted: in the eval evaluation (another process was stopped)"


def test_a_non_finite_loss_on_one_rank_stops_every_rank_naming_it(ranks):
    _, results = ranks
    for result in results:
        assert result["nan_on_rank_2"] == "TrainingDiverged: non-finite loss on rank 2 at epoch 0, step 1"
        # the first step was taken (together), the poisoned one on no rank: its gradients, averaged
        # over the ranks, would have made every rank's weights NaN
        assert all(result["stepped"]) and result["finite"]


def test_a_stop_on_one_rank_during_training_stops_every_rank_after_the_same_step(ranks):
    _, results = ranks
    assert [r["stop_on_rank_0"] for r in results] == ["Interrupted: in training epoch 0, after step 2"] * WORLD


def test_feature_extraction_over_uneven_shares_gives_one_process_features(ranks):
    root, _ = ranks
    stores = _stores(str(root), 0)
    assert stores["whole"].missing() == []
    assert torch.equal(stores["whole"].load(), stores["single"].load())


def test_a_stop_on_one_rank_during_feature_extraction_stops_every_rank_then_resumes(ranks):
    root, results = ranks
    extraction = [result["extraction"] for result in results]
    assert extraction[1]["stopped"] == \
        "Interrupted: while extracting the base_train features (finished blocks are kept)"
    for rank in (0, 2):
        assert extraction[rank]["stopped"] == ("Interrupted: while extracting the base_train features (another "
                                               "process was stopped; finished blocks are kept)")
    # each rank stopped after its first batch of 3, which finished its first block (rank r takes r, r + 3, ...)
    assert all(e["missing_after_stop"] == [3, 4, 5, 6, 7, 8, 9] for e in extraction)
    # the resumed extraction splits the 7 blocks left evenly (3, 2, 2) and recomputes none of the kept ones
    assert [e["resumed"] for e in extraction] == ["ok"] * WORLD
    assert [e["resumed_images"] for e in extraction] == [6, 4, 4]
    stores = _stores(str(root), 0)
    assert {b: stores["stopped"].block_path(b).stat().st_mtime_ns for b in range(3)} == extraction[0]["kept"]
    assert torch.equal(stores["stopped"].load(), stores["single"].load())


def test_a_run_lock_the_main_process_cannot_take_is_refused_by_every_rank(ranks):
    root, results = ranks
    busy = (f"OptionError: {root / 'runs/busy'} is in use by process {os.getpid()} on {socket.gethostname()}; "
            "wait for it to end or choose another --tensorname")
    assert [r["lock_busy"] for r in results] == [busy] * WORLD
    assert [r["lock_free"] for r in results] == ["taken"] * WORLD


SECOND_SIGNAL = textwrap.dedent("""
    import os, signal, sys, time
    from utils.interrupt import GracefulInterrupt
    with GracefulInterrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    print("stopped; saving", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # while the first stop is still writing
    time.sleep(5)
    print("not reached", flush=True)
""")


def test_a_second_signal_after_the_stop_began_exits_130_with_one_line():
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done
    assert "not reached" not in done.stdout
    assert done.stderr.strip().splitlines() == ["SIGTERM again: stopped at once; what was saved before is intact"]


# ---------------------------------------------------------------- the scripts, as processes (slow)

STAGE1 = ["--dataroot", "toy", "--imageSize", "32", "--filesPerClass", "1", "--batchSize", "6", "--numEpochs", "2",
          "--valEvery", "1", "--valEpisodes", "30", "--valQueries", "1", "--preciseBN", "8"]


def _torchrun(processes: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(REPO / "classification.py"), *flags]


def _rows(path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in read_metrics(path)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """64 training items (one file of each of the 64 base classes) over 3 processes: 22, 21 and 21
    before padding. An uninterrupted run, with the sharded monitor and --preciseBN."""
    root = tmp_path_factory.mktemp("uneven")
    generate(root / "toy", per_class=6, size=36, seed=0)
    done = subprocess.run(_torchrun(3, *STAGE1, "--nthreads", "0", "--progress", "0", "--tensorname", "whole"),
                          cwd=root, capture_output=True, text=True, timeout=900, env=script_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_torchrun_three_processes_over_data_that_does_not_split_evenly(uneven):
    rows = _rows(uneven / "runs/whole/metrics.csv")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert all(row["val_1shot"] and row["val_1shot_precise"] for row in rows)
    assert (uneven / "models/whole_best.t7").is_file()


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_the_sharded_monitor_then_resume(uneven):
    """As torchrun forwards a signal (and scancel sends one): to every process of the group, loader
    workers included; every rank stops in the monitor, the state is saved, --resume finishes the run
    with the numbers of the uninterrupted one."""
    flags = [*STAGE1, "--nthreads", "2", "--tensorname", "stopped"]
    run = subprocess.Popen(_torchrun(3, *flags, "--progress", "1"), cwd=uneven, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=script_env(), start_new_session=True)
    output = ""
    deadline = time.monotonic() + 600
    while "val 1-shot" not in output:
        assert time.monotonic() < deadline and run.poll() is None, output[-3000:]
        ready, _, _ = select.select([run.stdout], [], [], 1.0)
        if ready:
            output += os.read(run.stdout.fileno(), 4096).decode(errors="replace")
    os.killpg(run.pid, signal.SIGTERM)
    rest, _ = run.communicate(timeout=300)
    output += rest.decode(errors="replace")
    # every process stopped by itself (torchrun SIGKILLs those that have not within 30 s), and no
    # loader worker died under a process; the one traceback allowed is torchrun's own SignalException
    assert "Unable to shutdown process" not in output and "DataLoader worker" not in output, output[-3000:]
    assert output.count("Traceback") == output.count("SignalException: Process"), output[-3000:]
    assert "stopped in the val 1-shot evaluation" in output or "stopped while embedding the val 1-shot images" \
        in output, output[-3000:]
    assert torch.load(uneven / "runs/stopped/resume.pt", weights_only=False)["epoch"] == 0
    resumed = subprocess.run(_torchrun(3, *flags, "--progress", "0", "--resume"), cwd=uneven, capture_output=True,
                             text=True, timeout=900, env=script_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows(uneven / "runs/stopped/metrics.csv") == _rows(uneven / "runs/whole/metrics.csv")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_gracefully(tmp_path):
    generate(tmp_path / "toy", per_class=4, size=36, seed=0)
    flags = ["--dataroot", "toy", "--imageSize", "32", "--batchSize", "4", "--numEpochs", "3", "--nthreads", "2",
             "--valEpisodes", "0", "--progress", "1", "--tensorname", "workers"]
    run = subprocess.Popen([sys.executable, "-u", str(REPO / "classification.py"), *flags], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=script_env(), start_new_session=True)
    output = ""
    while "epoch 0:" not in output:
        assert run.poll() is None, output[-3000:]
        ready, _, _ = select.select([run.stdout], [], [], 1.0)
        if ready:
            output += os.read(run.stdout.fileno(), 4096).decode(errors="replace")
    os.killpg(run.pid, signal.SIGTERM)  # the main process and its two loader workers
    rest, _ = run.communicate(timeout=300)
    output += rest.decode(errors="replace")
    assert run.returncode == 130, output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("stopped in training epoch 0"), output[-3000:]


def test_loader_workers_ignore_stop_signals_and_are_ended_at_exit():
    from datasets.loaders import end_lingering_workers, image_loader

    loader = image_loader(list(range(64)), 1, 1, CPU)
    iterator = iter(loader)
    next(iterator)  # the worker is up, its init done
    (worker,) = iterator._workers
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # as a signal to the whole process group delivers them
        os.kill(worker.pid, stop_signal)
    time.sleep(1.0)
    assert worker.is_alive() and next(iterator).item() == 1
    end_lingering_workers()  # what runs at exit while an iterator is still referenced
    assert not worker.is_alive()


def _slow_init(worker_id: int) -> None:
    """The loaders' worker init, a second late: the window in which a worker has started but does
    not ignore stop signals yet."""
    from datasets.loaders import init_worker

    time.sleep(1.0)
    init_worker(worker_id, niced=False)


def test_a_sigterm_as_loader_workers_start_kills_none_of_them():
    """SIGTERM to the process group as an epoch or evaluation starts reaches workers that have not run
    their init yet, where PyTorch's own SIGTERM handler would end them: the loader holds it back until
    they ignore it. The main process gets it once the workers are started."""
    from datasets.loaders import StopSafeLoader

    stop_signal, received = signal.SIGTERM, []
    previous = signal.signal(stop_signal, lambda signum, frame: received.append(signum))
    try:
        loader = StopSafeLoader(list(range(8)), batch_size=1, num_workers=2, worker_init_fn=_slow_init)
        iterator = iter(loader)
        workers = list(iterator._workers)
        for worker in workers:
            os.kill(worker.pid, stop_signal)
        os.kill(os.getpid(), stop_signal)  # the main process, while no worker has run its init
        assert [batch.item() for batch in iterator] == list(range(8))
        assert all(worker.exitcode in (None, 0) for worker in workers)
    finally:
        signal.signal(stop_signal, previous)
    assert received == [stop_signal]
