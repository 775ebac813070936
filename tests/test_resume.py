"""Interruptions: Ctrl-C (SIGINT) and SIGKILL in the middle of either stage, then --resume,
must end with exactly the weights and metrics of an uninterrupted run with the same seed."""
from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from tests.scripts_helpers import load_script, make_workdir, popen_script, read_metrics, run_main, run_script

STAGE1 = ["--dataroot", "toy", "--imageSize", "32", "--numEpochs", "3", "--batchSize", "16", "--nthreads", "0",
          "--filesPerClass", "4", "--valEpisodes", "0", "--progress", "0"]
STAGE2 = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--numEpochs", "3", "--epoch", "12",
          "--valEpisodes", "2", "--testEpisodes", "2", "--galleryNum", "2", "--chooseNum", "3", "--augnum", "2",
          "--test_num", "3", "--batchSize", "64", "--nthreads", "0", "--fixCls", "0", "--progress", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("resume"))
    return root


def interrupt_after_first_epoch(workdir, script, flags, sig) -> subprocess.Popen:
    """Start a run and send ``sig`` once it has printed its first epoch line."""
    process = popen_script(workdir, script, *flags)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("epoch 0:"):
            process.send_signal(sig)
            break
    output.extend(process.stdout)
    process.wait(timeout=600)
    process.output = "".join(output)
    return process


def assert_same_run(workdir, reference, resumed, weights_file):
    assert read_metrics(workdir / f"runs/{resumed}/metrics.csv", timing=False) == \
        read_metrics(workdir / f"runs/{reference}/metrics.csv", timing=False)
    want = torch.load(workdir / "models" / weights_file.format(reference))
    got = torch.load(workdir / "models" / weights_file.format(resumed))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("script,flags,weights_file", [
    ("classification.py", STAGE1, "{}.t7"),
    ("onlyBasetwoLoss.py", STAGE2, "{}_last.t7"),
], ids=["stage1", "stage2"])
def test_ctrl_c_and_sigkill_then_resume_match_an_uninterrupted_run(workdir, script, flags, weights_file):
    stage = "s1" if script == "classification.py" else "s2"
    done = run_script(workdir, script, *flags, "--tensorname", f"{stage}_full")
    assert done.returncode == 0, done.stderr

    stopped = interrupt_after_first_epoch(workdir, script, [*flags, "--tensorname", f"{stage}_int"], signal.SIGINT)
    assert stopped.returncode == 130, stopped.output
    assert "continue with --resume" in stopped.output
    resumed = run_script(workdir, script, *flags, "--tensorname", f"{stage}_int", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert_same_run(workdir, f"{stage}_full", f"{stage}_int", weights_file)

    killed = interrupt_after_first_epoch(workdir, script, [*flags, "--tensorname", f"{stage}_kill"], signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script(workdir, script, *flags, "--tensorname", f"{stage}_kill", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir, f"{stage}_full", f"{stage}_kill", weights_file)


@pytest.fixture(scope="module")
def finished(workdir):
    """A finished one-epoch stage-1 run (its main in this process) and its flags."""
    flags = [*STAGE1, "--numEpochs", "1", "--filesPerClass", "1", "--tensorname", "guard"]
    first = run_main(workdir, "classification.py", *flags)
    assert first.returncode == 0, first.stderr
    return flags


def test_a_run_folder_is_not_overwritten_without_asking(workdir, finished):
    before = (workdir / "runs/guard/metrics.csv").read_bytes()
    again = run_main(workdir, "classification.py", *finished)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr
    assert (workdir / "runs/guard/metrics.csv").read_bytes() == before


def test_resume_with_changed_arguments_is_refused_naming_them(workdir, finished):
    before = (workdir / "runs/guard/resume.pt").read_bytes()
    again = run_main(workdir, "classification.py", *finished, "--resume", "--LR", "0.01")
    assert again.returncode == 2
    assert "--LR" in again.stderr and "incompatible" in again.stderr
    assert (workdir / "runs/guard/resume.pt").read_bytes() == before


@pytest.mark.parametrize("script,flags", [
    ("classification.py", [*STAGE1, "--filesPerClass", "1"]),
    ("onlyBasetwoLoss.py", [*STAGE2, "--epoch", "2", "--valEpisodes", "1", "--testEpisodes", "1"]),
], ids=["stage1", "stage2"])
def test_a_run_saved_without_loss_scaling_resumes_with_it(workdir, monkeypatch, script, flags):
    """A run saved with a disabled scaler (float32, bfloat16) stores an empty scaler state; resumed where
    the scaler is enabled (--amp 1 on a float16 GPU, simulated by an enabled CPU scaler) it continues,
    the scaler starting fresh, and saves the scaler's state."""
    name = f"scaler_{script[:5]}"
    first = run_main(workdir, script, *flags, "--numEpochs", "1", "--tensorname", name)
    assert first.returncode == 0, first.stderr
    assert torch.load(workdir / f"runs/{name}/resume.pt", weights_only=False)["scaler"] == {}
    monkeypatch.setattr(load_script(script), "grad_scaler", lambda device, enabled: torch.amp.GradScaler("cpu"))
    resumed = run_main(workdir, script, *flags, "--numEpochs", "2", "--tensorname", name, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_metrics(workdir / f"runs/{name}/metrics.csv")) == 2
    assert torch.load(workdir / f"runs/{name}/resume.pt", weights_only=False)["scaler"]["scale"] > 0
