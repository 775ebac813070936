"""Stopping at any moment and continuing exactly: a signal during an evaluation, a second signal,
extending a finished run, and one process per run. The fast tests send the signal to this process
from the phase they name (the script's ``main`` runs here); the slow ones signal a real process."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets import Gallery, read_split
from engine.episode import GalleryBank
from models import IDeMeNet
from tests.scripts_helpers import REPO, load_script, make_workdir, read_metrics, run_main, run_script, script_env
from utils.checkpoint import safe_load
from utils.interrupt import Interrupted

STAGE2 = ["--dataroot", "toy", "--imageSize", "32", "--network", "stage1", "--epoch", "3", "--galleryNum", "2",
          "--chooseNum", "3", "--augnum", "2", "--test_num", "3", "--nthreads", "0", "--fixCls", "0"]
STAGE1 = ["--dataroot", "toy", "--imageSize", "32", "--batchSize", "16", "--nthreads", "0", "--filesPerClass", "2",
          "--valEvery", "1", "--valQueries", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("interrupt"))


class Live:
    """A script running in the background whose merged output (progress bars included) is read as it comes."""

    def __init__(self, cwd, script: str, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-u", str(REPO / script), *args], cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=script_env())
        self.output = ""

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Read until ``text`` has appeared (progress bars redraw with carriage returns, not lines)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"{text!r} did not appear: {self.output[-2000:]}"
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096).decode(errors="replace")
                assert chunk, f"the process ended before {text!r}: {self.output[-2000:]}"
                self.output += chunk

    def finish(self, timeout: float = 300) -> int:
        """The exit status, once the process ended (the rest of its output read)."""
        rest, _ = self.process.communicate(timeout=timeout)
        self.output += rest.decode(errors="replace")
        return self.process.returncode


def same_weights(a, b) -> bool:
    first, second = torch.load(a), torch.load(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def evaluation(workdir, name: str) -> dict:
    return json.loads((workdir / f"runs/{name}/evaluate_1shot_seed0.json").read_text())


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted two-epoch stage-2 run."""
    result = run_script(workdir, "onlyBasetwoLoss.py", *STAGE2, "--numEpochs", "2", "--valEpisodes", "60",
                        "--testEpisodes", "60", "--progress", "0", "--tensorname", "ref")
    assert result.returncode == 0, result.stderr
    return "ref"


def assert_same_run(workdir, reference: str, name: str) -> None:
    assert read_metrics(workdir / f"runs/{name}/metrics.csv", timing=False) == \
        read_metrics(workdir / f"runs/{reference}/metrics.csv", timing=False)
    assert same_weights(workdir / f"models/{name}.t7", workdir / f"models/{reference}.t7")
    assert same_weights(workdir / f"models/{name}_last.t7", workdir / f"models/{reference}_last.t7")
    want, got = evaluation(workdir, reference), evaluation(workdir, name)
    assert {k: v for k, v in got.items() if k != "checkpoint"} == {k: v for k, v in want.items() if k != "checkpoint"}


def last_count(output: str, phase: str) -> tuple[int, int]:
    """The last ``done/total`` the progress bar of ``phase`` showed."""
    counts = re.findall(rf"{re.escape(phase)}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", output)
    assert counts, output[-2000:]
    return int(counts[-1][0]), int(counts[-1][1])


# The embedding frozen (--fixCls 1): each split's images are embedded once per run, the val images in epoch 0.
IN_PROCESS = [*STAGE2, "--fixCls", "1", "--numEpochs", "2", "--valEpisodes", "2", "--testEpisodes", "2",
              "--progress", "0"]


@pytest.fixture(scope="module")
def reference_here(workdir):
    """An uninterrupted two-epoch stage-2 run (the script's main in this process)."""
    result = run_main(workdir, "onlyBasetwoLoss.py", *IN_PROCESS, "--tensorname", "ref_here")
    assert result.returncode == 0, result.stderr
    return "ref_here"


@pytest.mark.parametrize("phase,where", [("val 1", "in the val 1 evaluation"),
                                         ("test", "while embedding the test images")])
def test_a_signal_as_an_evaluation_starts_stops_it_saves_and_resumes_exactly(workdir, reference_here, phase, where,
                                                                             monkeypatch) -> None:
    """SIGTERM reaches this process as the ``phase`` evaluation starts (after its first episode; the
    test evaluation first embeds the test images): the run stops at its first check, with status 130
    and one line naming the phase, and --resume ends as the uninterrupted run."""
    script = load_script("onlyBasetwoLoss.py")
    evaluate, checks = script.stage2.evaluate, []

    def evaluate_after_a_signal(model, dataset, bank, args, device, desc, *rest, **options):
        if desc == phase:
            os.kill(os.getpid(), signal.SIGTERM)
            stop = options["stop"]
            options["stop"] = lambda: checks.append(stop()) or checks[-1]
        return evaluate(model, dataset, bank, args, device, desc, *rest, **options)

    monkeypatch.setattr(script.stage2, "evaluate", evaluate_after_a_signal)
    name = f"here_{phase.replace(' ', '')}"
    result = run_main(workdir, "onlyBasetwoLoss.py", *IN_PROCESS, "--tensorname", name)
    assert result.returncode == 130, result.stdout + result.stderr
    assert checks == [True]  # at once, not at the end of the evaluation
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"stopped {where}; continue with --resume", last
    state = torch.load(workdir / f"runs/{name}/resume.pt", weights_only=False)
    assert (state["epoch"], state["progress"]["step"]) == ((1, 3) if phase == "val 1" else (2, 0))
    monkeypatch.setattr(script.stage2, "evaluate", evaluate)
    resumed = run_main(workdir, "onlyBasetwoLoss.py", *IN_PROCESS, "--tensorname", name, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir, reference_here, name)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["val 1", "test"])
def test_sigterm_during_an_evaluation_stops_saves_and_resumes_exactly(workdir, reference, phase) -> None:
    name = f"eval_{phase.replace(' ', '')}"
    flags = [*STAGE2, "--numEpochs", "2", "--valEpisodes", "60", "--testEpisodes", "60", "--tensorname", name]
    run = Live(workdir, "onlyBasetwoLoss.py", *flags, "--progress", "1")
    run.wait_for(f"{phase}:")
    run.process.send_signal(signal.SIGTERM)
    status = run.finish()
    assert status == 130, run.output
    done, total = last_count(run.output, phase)
    assert done < total  # it stopped after the episode it was on, not at the end of the evaluation
    last = run.output.strip().splitlines()[-1]
    assert last.startswith(f"stopped in the {phase} evaluation") and last.endswith("continue with --resume"), last
    assert "Traceback" not in run.output
    state = torch.load(workdir / f"runs/{name}/resume.pt", weights_only=False)
    if phase == "val 1":  # epoch 1's training is kept: it is not redone
        assert state["epoch"] == 1 and state["progress"]["step"] == 3
        assert len(read_metrics(workdir / f"runs/{name}/metrics.csv")) == 1
    else:
        assert state["epoch"] == 2 and state["progress"]["step"] == 0
        assert not (workdir / f"runs/{name}/evaluate_1shot_seed0.json").exists()
    result = run_script(workdir, "onlyBasetwoLoss.py", *flags, "--progress", "0", "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_run(workdir, reference, name)


@pytest.mark.slow
def test_a_second_signal_stops_at_once_with_one_line(workdir) -> None:
    flags = [*STAGE2, "--numEpochs", "1", "--valEpisodes", "400", "--testEpisodes", "2", "--tensorname", "twice"]
    run = Live(workdir, "onlyBasetwoLoss.py", *flags, "--progress", "1")
    run.wait_for("val 0:")
    run.process.send_signal(signal.SIGINT)
    run.wait_for("SIGINT received")
    run.process.send_signal(signal.SIGINT)
    status = run.finish()
    assert status == 130
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output
    assert run.output.strip().splitlines()[-1].startswith("SIGINT again: stopped at once")


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` still runs a handler of its own for SIGTERM (``SigCgt`` in
    ``/proc/<pid>/status``); false once the interpreter has restored the default action at its exit,
    or set it to ignore, or the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    return bool(int(caught.group(1), 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_a_second_sigterm_while_the_interpreter_exits_still_gives_130(workdir) -> None:
    """The second SIGTERM of a scheduler lands after the stop was saved, while Python exits (its own
    handlers gone): the status is still 130, and the saved state loads."""
    flags = [*STAGE1, "--numEpochs", "3", "--valEpisodes", "0", "--progress", "1", "--tensorname", "exiting"]
    run = Live(workdir, "classification.py", *flags)
    run.wait_for("epoch 0:")
    run.process.send_signal(signal.SIGTERM)
    run.wait_for("continue with --resume")
    while handles_sigterm(run.process.pid):
        time.sleep(0.0005)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 130, run.output
    assert "Traceback" not in run.output
    assert safe_load(workdir / "runs/exiting/resume.pt")["epoch"] == 0
    resumed = run_main(workdir, "classification.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_stage1_val_monitor_is_interruptible_and_resumes_exactly(workdir) -> None:
    flags = [*STAGE1, "--numEpochs", "2", "--valEpisodes", "80"]
    reference = run_script(workdir, "classification.py", *flags, "--progress", "0", "--tensorname", "s1ref")
    assert reference.returncode == 0, reference.stderr
    run = Live(workdir, "classification.py", *flags, "--progress", "1", "--tensorname", "s1stop")
    run.wait_for("val 1-shot:")
    run.process.send_signal(signal.SIGTERM)
    status = run.finish()
    assert status == 130, run.output
    done, total = last_count(run.output, "val 1-shot")
    assert done < total  # it stopped after the episode it was on, not at the end of the evaluation
    assert run.output.strip().splitlines()[-1].startswith("stopped in the val 1-shot evaluation")
    assert torch.load(workdir / "runs/s1stop/resume.pt", weights_only=False)["epoch"] == 0  # training of epoch 0 kept
    resumed = run_script(workdir, "classification.py", *flags, "--progress", "0", "--tensorname", "s1stop", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(workdir / "runs/s1stop/metrics.csv", timing=False) == \
        read_metrics(workdir / "runs/s1ref/metrics.csv", timing=False)
    assert same_weights(workdir / "models/s1stop.t7", workdir / "models/s1ref.t7")
    assert same_weights(workdir / "models/s1stop_best.t7", workdir / "models/s1ref_best.t7")


@pytest.mark.slow
def test_a_finished_run_is_extended_to_more_epochs(workdir, reference) -> None:
    common = [*STAGE2, "--valEpisodes", "60", "--testEpisodes", "60", "--progress", "0", "--tensorname", "grow"]
    assert run_script(workdir, "onlyBasetwoLoss.py", *common, "--numEpochs", "1").returncode == 0
    result = run_script(workdir, "onlyBasetwoLoss.py", *common, "--numEpochs", "2", "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_run(workdir, reference, "grow")
    before = (workdir / "runs/grow/resume.pt").read_bytes()
    fewer = run_script(workdir, "onlyBasetwoLoss.py", *common, "--numEpochs", "1", "--resume")
    assert fewer.returncode == 2
    assert fewer.stderr.count("\n") == 1 and "--numEpochs 1" in fewer.stderr and "2 epochs" in fewer.stderr
    assert (workdir / "runs/grow/resume.pt").read_bytes() == before


@pytest.mark.slow
def test_a_second_process_cannot_train_the_same_run(workdir) -> None:
    flags = [*STAGE2, "--numEpochs", "1", "--valEpisodes", "400", "--testEpisodes", "2", "--tensorname", "busy"]
    first = Live(workdir, "onlyBasetwoLoss.py", *flags, "--progress", "1")
    first.wait_for("val 0:")
    second = run_script(workdir, "onlyBasetwoLoss.py", *flags, "--progress", "0", "--overwrite")
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and "runs/busy is in use by process" in second.stderr
    assert f"process {first.process.pid} on {socket.gethostname()}" in second.stderr
    first.process.send_signal(signal.SIGTERM)
    status = first.finish()
    assert status == 130  # the first run was not disturbed: it stops when asked, and its state is there
    assert (workdir / "runs/busy/resume.pt").is_file()


def test_gallery_build_and_features_stop_on_request(workdir) -> None:
    split = read_split(workdir / "toy", "train")
    with pytest.raises(Interrupted, match="decoding the gallery"):
        Gallery(split, 2, 32, workers=1, progress=False, stop=lambda: True)
    gallery = Gallery(split, 2, 32, workers=1, progress=False)
    calls = iter(range(100))
    with pytest.raises(Interrupted, match="embedding the gallery"):
        GalleryBank(gallery, IDeMeNet(64, 32).eval(), torch.device("cpu"), 16, stop=lambda: next(calls) == 2)


def test_a_lock_left_by_a_dead_process_is_taken_over(workdir) -> None:
    (workdir / "runs/dead").mkdir(parents=True)
    (workdir / "runs/dead/.lock").write_text("999999 gone-host\n")  # no process holds it any more
    result = run_main(workdir, "onlyBasetwoLoss.py", *IN_PROCESS, "--numEpochs", "1", "--tensorname", "dead")
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stdout.splitlines() if "taking over the lock" in line]
    assert notices == ["taking over the lock of runs/dead from process 999999 on gone-host, which is gone"]
    assert (workdir / "runs/dead/.lock").read_text() == ""  # a clean end leaves no holder behind
