"""scripts/gpu_check.py's CPU dry run, as CI runs it (with its multi-process checks on gloo), read through
its JSON report."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

import engine.stage2 as stage2
from datasets import EpisodeDataset, toy
from engine import experiments
from models import EmbeddingNet
from tests.scripts_helpers import load_script, script_env
from utils import forward


@pytest.mark.slow
def test_the_cpu_dry_run_measures_both_stages_and_passes_its_checks(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--device", "cpu", "--imageSize", "32",
                           "--quick", "--dataroot", str(tmp_path / "toy"), "--workdir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "gpu_check.json"), "--nthreads", "0", "--distributedChecks", "1",
                           "--loaderSizes", "32", "36"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=script_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["quick"] is True
    assert report["stage1"]["images_per_s"] > 0 and report["stage1"]["loss"] > 0
    for key in ("1shot_fp32", "5shot_fp32"):
        assert report["stage2"][key]["train_episode_s"] > 0 and report["stage2"][key]["test_episode_s"] > 0
    assert report["stage2"]["train_episode_s"] == report["stage2"]["1shot_fp32"]["train_episode_s"]
    checks = report["checks"]
    assert checks["stage1_fp32_finite_loss"]["ok"] is True
    assert checks["cached_features_1shot_fp32"]["ok"] is True and checks["cached_features_5shot_fp32"]["ok"] is True
    # what needs a GPU, or two, says so instead of passing
    assert checks["cpu_gpu_features_fp32"] == {"ok": None, "detail": "skipped: the device is the CPU"}
    assert checks["phase_stage2_1shot_fp16"] == {"ok": None,
                                                 "detail": "skipped: float16 autocast with its GradScaler: CUDA only"}
    assert "1shot_fp16" not in report["stage2"]
    assert checks["stage2_host_syncs_1shot_fp32"]["ok"] is True  # on the CPU: reads of a value, counted
    assert report["stage1"]["loader_images_per_s"] > 0 and report["total_s"] > 0
    by_size = report["stage1"]["by_size"]  # --loaderSizes: 32 px is the fp32 phase's, 36 px its own, on 42 px files
    assert by_size["32"]["loader_images_per_s"] == report["stage1"]["loader_images_per_s"]
    assert by_size["36"]["loader_images_per_s"] > 0 and "stage1_loader_36px" in report["phases_s"]
    assert (tmp_path / "work/toy_36px/train.csv").is_file() and "stage1 36 px" in done.stdout
    assert report["stage2"]["round1_episodes_per_s"] > 0 and report["stage2"]["round2_episodes_per_s"] > 0
    assert report["total_s"] <= 180 and set(report["phases_s"]) >= {"stage1_fp32", "stage2_round1_fp32", "distributed"}
    assert checks["torchrun_two_ranks_loss"]["ok"] is None and "amp" not in report["stage1"]
    assert "outcome" not in report  # --quick
    assert "ok     cached_features_1shot_fp32" in done.stdout
    # the multi-process checks, on the CPU with gloo (--distributedChecks 1)
    assert checks["torchrun_uneven_split"] == {
        "ok": True,
        "detail": "gloo, CPU: 256 items on 3 ranks (padded): exit [0, 0, 0], [86] items and [11] steps per rank"}
    sigterm = checks["torchrun_sigterm_resume"]
    assert sigterm["ok"] is True and sigterm["detail"].startswith("gloo, CPU: SIGTERM: exit [130, 130], stopped in "
                                                                  "training epoch 0, after step "), sigterm
    assert sigterm["detail"].endswith("; --resume: exit [0, 0], 2 of 2 epochs logged"), sigterm
    assert checks["torchrun_nan_on_one_rank"] == {
        "ok": True, "detail": "gloo, CPU: exit [3, 3]: ['non-finite loss on rank 1 at epoch 0, step 1']"}
    work = tmp_path / "work/distributed"
    assert [json.loads((work / f"nan_rank{rank}.json").read_text())["exit"] for rank in range(2)] == [3, 3]


# ------------------------------------------------------------ the checks' verdicts, in this process on the CPU

@pytest.fixture(scope="module")
def check_dir(tmp_path_factory):
    """A working folder as gpu_check.py's ``main`` leaves it: toy data with 16 images per class (1-shot
    episodes of 15 queries) and a random stage-1 file in ``models/``."""
    root = tmp_path_factory.mktemp("gpu_check")
    toy.generate(root / "toy", per_class=16, size=37, seed=0)
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(EmbeddingNet(64).state_dict(), root / "models/gpu_check_stage1.t7")
    return root


@pytest.fixture
def gpu_check(check_dir, monkeypatch):
    monkeypatch.chdir(check_dir)
    return load_script("scripts/gpu_check.py")


def one_shot_round2(gpu_check, check_dir):
    """stage2_speed: 1-shot, 2 training episodes of epoch 1 (both losses, three optimisers), 32 px, CPU."""
    a = argparse.Namespace(imageSize=32, nthreads=0)
    return gpu_check.stage2_speed(check_dir / "toy", a, torch.device("cpu"), False, 1, 2)


def round2_syncs(gpu_check, check_dir, **flags):
    """stage2_speed's host-wait check alone: 2 episodes of epoch 1 after a first (the optimisers' lazy start)."""
    run = gpu_check.stage2_setup(check_dir / "toy", argparse.Namespace(imageSize=32, nthreads=0),
                                 torch.device("cpu"), False, 1, **flags)
    items = gpu_check.training_items(run, 2)
    run.train(items[:1], 1)
    return gpu_check.training_syncs(run, items[1:])


def test_three_optimisers_through_a_scaler_are_allowed_their_reads(gpu_check, check_dir, monkeypatch):
    """A float16 GradScaler (here an enabled CPU one) reads its inf check at each of the three optimisers'
    steps of a round-2 episode: 6 reads in 2 episodes, within the allowance."""
    monkeypatch.setattr("benchmarks.episode.grad_scaler", lambda device, enabled: torch.amp.GradScaler("cpu"))
    syncs = round2_syncs(gpu_check, check_dir)
    assert syncs["ok"] is True and syncs["detail"].startswith("6 host wait(s) in 2 training episodes"), syncs


def test_the_recipes_round_two_is_allowed_the_reads_of_its_two_trained_optimisers(gpu_check, check_dir,
                                                                                   monkeypatch):
    """Under --fixAttention 1 the deformation network's optimiser holds no trained parameter and is never
    stepped: 4 scaler reads in 2 episodes, allowed 2 per episode and the sums' read."""
    monkeypatch.setattr("benchmarks.episode.grad_scaler", lambda device, enabled: torch.amp.GradScaler("cpu"))
    syncs = round2_syncs(gpu_check, check_dir, fixAttention=1)
    assert syncs["ok"] is True and syncs["detail"].startswith("4 host wait(s) in 2 training episodes (at most 5:")


def test_an_extra_host_read_per_episode_fails_the_check(gpu_check, check_dir, monkeypatch):
    monkeypatch.setattr("benchmarks.episode.grad_scaler", lambda device, enabled: torch.amp.GradScaler("cpu"))
    run_episode = stage2.run_episode

    def reading(*args, **kwargs):
        result = run_episode(*args, **kwargs)
        result.proto_loss.item()  # a regression: the host waits within each episode
        return result

    monkeypatch.setattr(stage2, "run_episode", reading)
    syncs = round2_syncs(gpu_check, check_dir)
    assert syncs["ok"] is False and syncs["detail"].startswith("8 host wait(s)"), syncs


def test_round_one_is_timed_decoding_only_the_support_once_the_cache_is_warm(gpu_check, check_dir, monkeypatch):
    """As onlyBasetwoLoss.py with --fixCls 1: the timed pass (the second) decodes each episode's 5 support
    images and no query; the first pass, with the cache cold, decodes queries too."""
    decoded = []
    decode = EpisodeDataset._decode

    def counting(dataset, classes, picks):
        decoded.append(sum(map(len, picks)))
        return decode(dataset, classes, picks)

    monkeypatch.setattr(EpisodeDataset, "_decode", counting)
    a = argparse.Namespace(imageSize=32, nthreads=0)
    assert gpu_check.stage2_round(check_dir / "toy", a, torch.device("cpu"), False, 1, 3) > 0
    assert len(decoded) > 6 and decoded[-3:] == [5, 5, 5]
    assert sum(decoded[:-3]) > 3 * 5  # the cold pass decoded queries


def test_a_bfloat16_gpu_also_times_stage_one_in_float16_and_without_tf32_and_at_the_loader_sizes(
        gpu_check, monkeypatch, tmp_path):
    """The phases after the outcome benchmark on an H100-like GPU (the timing itself stubbed: no GPU here):
    float16 with its GradScaler (``amp_dtype`` patched where ``autocast`` and ``grad_scaler`` read it), TF32
    off, and 84 px on its own toy data; 224 px (``--imageSize``) reuses the ``fp32`` phase's figures."""
    original, calls = forward.amp_dtype, []

    def speed(root, a, device, amp, steps, image_size=None, tf32=True):
        patched = forward.amp_dtype(device) if forward.amp_dtype is not original else None
        calls.append((amp, tf32, image_size, patched, root.name))
        return {"images_per_s": 2.0, "peak_memory_mb": 3, "loss": float(len(calls)), "loader_images_per_s": 1.0}

    monkeypatch.setattr(gpu_check, "stage1_speed", speed)
    monkeypatch.setattr(gpu_check, "amp_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(gpu_check, "toy_data", lambda root, size, workers: root)
    fp32 = {"images_per_s": 5.0, "peak_memory_mb": 6, "loss": 1.0, "loader_images_per_s": 4.0}
    report = {"stage1": {"fp32": fp32}, "checks": {}}
    a = argparse.Namespace(imageSize=224, loaderSizes=None, nthreads=0)
    gpu_check.more_stage1_figures(report, gpu_check.Budget(60), tmp_path, a, torch.device("cuda"), tmp_path, 2)
    assert calls == [(True, True, None, torch.float16, tmp_path.name), (False, False, None, None, tmp_path.name),
                     (False, True, 84, None, "toy_84px")]
    assert report["stage1"]["fp16"]["loss"] == 1.0 and report["stage1"]["fp32_tf32_off"]["loss"] == 2.0
    figures = ("loader_images_per_s", "images_per_s", "peak_memory_mb")
    by_size = {"84": dict(zip(figures, (1.0, 2.0, 3))), "224": dict(zip(figures, (4.0, 5.0, 6)))}
    assert report["stage1"]["by_size"] == by_size
    assert {"stage1_fp16_finite_loss", "stage1_fp32_tf32_off_finite_loss"} <= set(report["checks"])


def test_a_loader_size_below_32_is_refused_before_anything_runs(gpu_check, tmp_path, capsys):
    status = gpu_check.run_cli(gpu_check.main, gpu_check.get_args_parser(),
                               ["--device", "cpu", "--loaderSizes", "84", "20", "--workdir", str(tmp_path / "w")])
    assert status == 2 and "--loaderSizes must be at least 32, got 20" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def tf32_noisy_pass(losses: list[float], noise: float):
    """An evaluation pass whose losses carry ``noise`` (relative) while TF32 convolutions are on, as a GPU's
    would, and none without."""
    return lambda: {"acc": [0.5] * len(losses),
                    "loss": [x * (1 + noise * torch.backends.cudnn.allow_tf32) for x in losses]}


def test_tf32_sized_noise_does_not_fail_the_cached_features_check(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # as configure_backend leaves it on Ampere+
    losses = [1.2, 0.8, 2.5]
    check = gpu_check.cached_features_check(tf32_noisy_pass(losses, 0.0), tf32_noisy_pass(losses, 1e-3), False,
                                            "1-shot", 75)
    assert check["ok"] is True, check
    assert torch.backends.cudnn.allow_tf32 is True  # restored after the comparison


def test_a_wrong_cached_feature_fails_the_cached_features_check(gpu_check):
    losses = [1.2, 0.8, 2.5]
    wrong = lambda: {"acc": [0.5, 0.5, 0.48], "loss": [1.2, 0.8, 2.52]}  # noqa: E731
    for amp in (False, True):
        check = gpu_check.cached_features_check(tf32_noisy_pass(losses, 0.0), wrong, amp, "1-shot", 75)
        assert check["ok"] is False, check
    one_query = lambda: {"acc": [0.5, 0.5, 0.5 - 1 / 75], "loss": losses}  # noqa: E731
    assert gpu_check.cached_features_check(tf32_noisy_pass(losses, 0.0), one_query, True, "1-shot", 75)["ok"]
    assert not gpu_check.cached_features_check(tf32_noisy_pass(losses, 0.0), one_query, False, "1-shot", 75)["ok"]


def test_a_nan_loss_fails_the_check_and_its_exit_status(gpu_check, check_dir):
    healthy = (check_dir / "models/gpu_check_stage1.t7").read_bytes()
    state = torch.load(check_dir / "models/gpu_check_stage1.t7")
    torch.save({k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               check_dir / "models/gpu_check_stage1.t7")
    try:
        report = {"checks": {}}
        budget = gpu_check.Budget(60)
        assert budget.run(report, "stage2", lambda: one_shot_round2(gpu_check, check_dir)) is None
    finally:
        (check_dir / "models/gpu_check_stage1.t7").write_bytes(healthy)
    assert report["checks"]["phase_stage2"]["ok"] is False
    assert report["checks"]["phase_stage2"]["detail"].startswith("TrainingDiverged: non-finite loss"), report
    assert "stage2" in budget.phases and gpu_check.exit_status(report) == 1


def test_a_spent_budget_skips_a_phase_and_says_so(gpu_check):
    report, budget = {"checks": {}}, gpu_check.Budget(0)
    assert budget.run(report, "outcome", lambda: 1 / 0) is None
    assert report["checks"]["phase_outcome"]["ok"] is None and "--budget" in report["checks"]["phase_outcome"]["detail"]


@pytest.mark.slow
def test_ranks_killed_before_they_saved_fail_the_sigterm_check(gpu_check, tmp_path, monkeypatch):
    """torchrun SIGKILLs the ranks still running after its shutdown grace (here 0 s: what ranks slower than the
    grace meet on a loaded machine): the check fails and says why."""
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0")
    toy.generate(tmp_path / "toy", per_class=2, size=37, seed=0)
    flags = ["--dataroot", str(tmp_path / "toy"), "--imageSize", "32", "--batchSize", "16", "--filesPerClass", "0",
             "--valEpisodes", "0", "--nthreads", "0", "--device", "cpu"]
    check = gpu_check.sigterm_check(flags, tmp_path)
    assert check["ok"] is False, check
    assert check["detail"].startswith("after SIGTERM: exit [None, None], killed by torchrun after its shutdown "
                                      "grace, resume.pt missing"), check


def test_a_process_is_signalled_once_its_output_matches_and_gets_a_long_shutdown_grace(gpu_check, tmp_path,
                                                                                     monkeypatch):
    """The runner sends SIGTERM to the process group once the output shows the first step done (the progress
    bar's first line does not), and the check's environment gives torchrun's agent SHUTDOWN_GRACE_S seconds to
    let the ranks save."""
    child = ("import os, signal, sys, time\n"
             "def stop(*_):\n    print('stopping', flush=True)\n    sys.exit(130)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print(os.environ['TORCH_ELASTIC_SHUTDOWN_TIMEOUT'], flush=True)\n"
             "print('epoch 0:  50%|#####     | 1/2 [00:01<00:01]', end='\\r', flush=True)\n"
             "time.sleep(60)\n")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    status, _, output = experiments.run([sys.executable, "-c", child], tmp_path / "stop.log", tmp_path,
                                        gpu_check.check_env(), 30, stop_at=gpu_check.STEP_DONE)
    assert status == 130 and output.split("\n")[0] == str(gpu_check.SHUTDOWN_GRACE_S), output
    assert output.rstrip().endswith("stopping"), output
    status, _, output = experiments.run([sys.executable, "-c", "print('epoch 0:   0%|          | 0/2')"],
                                        tmp_path / "bar.log", tmp_path, gpu_check.check_env(), 30,
                                        stop_at=gpu_check.STEP_DONE)
    assert status == 0, output  # the bar before its first step does not match


def test_the_outcome_benchmark_streams_its_output_and_its_failure_fails_the_check(gpu_check, tmp_path, capsys):
    json_path = tmp_path / "outcome.json"
    ok = [sys.executable, "-c",
          f"import json; print('seed 0 done'); json.dump({{'x': 1}}, open({str(json_path)!r}, 'w'))"]
    report, check = gpu_check.outcome_run(ok, json_path, 60)
    assert report == {"x": 1} and check["ok"] is True
    assert "outcome| seed 0 done" in capsys.readouterr().out
    json_path.unlink()
    failing = [sys.executable, "-c", "print('variant a'); raise SystemExit(1)"]
    report, check = gpu_check.outcome_run(failing, json_path, 60)
    assert report is None and check["ok"] is False
    assert check["detail"].startswith("exit 1") and "variant a" in check["detail"]
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    report, check = gpu_check.outcome_run(slow, json_path, 2)
    assert report is None and check["ok"] is False and check["detail"].startswith("timed out after 2 s"), check
    assert gpu_check.exit_status({"checks": {"outcome_benchmark": check}}) == 1
