"""The demo's steps, at its quick setting, as a new user runs them: it prints its estimate first and
the time of each stage last, both test accuracies (with and without deformation) and their paired
difference with its interval, and the embedding it trains is clearly better than an untrained one
(measured here on the same test split). (How long it takes is a benchmark's business, not a
test's: the README gives the measured time.)"""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from datasets import read_split
from engine.fewshot import evaluate_embedding
from models import EmbeddingNet
from tests.scripts_helpers import REPO, script_env
from utils.metrics import mean_ci95

ESTIMATE = re.compile(r"^estimated time: \d+\.\d min on this machine \(.+, \d+ cores\): stage 1 ~\d+\.\d min, "
                      r"stage 2 ~\d+\.\d min, evaluation ~\d+\.\d min$", re.M)
ELAPSED = re.compile(r"^elapsed: data and estimate \d+ s, stage 1 \d+ s, stage 2 \d+ s, evaluation \d+ s, "
                     r"total \d+ s$", re.M)
WITH = re.compile(r"^5-way 1-shot test accuracy: (\d+\.\d\d) \+- (\d+\.\d\d) % \(150 episodes, seed 0\)$", re.M)
WITHOUT = re.compile(r"^5-way 1-shot test accuracy without deformation: (\d+\.\d\d) \+- (\d+\.\d\d) % "
                     r"\(150 episodes, seed 0\)$", re.M)
DIFFERENCE = re.compile(r"^difference \(with - without deformation\): ([+-]\d+\.\d\d) \+- (\d+\.\d\d) % "
                        r"\(paired, same episodes\)$", re.M)
SIZE = 32  # the demo's default image size


def untrained_test_accuracy(data) -> tuple[float, float]:
    """Mean and 95 % half-interval (%) of a seeded, untrained ResNet-18 embedding on 150 test episodes."""
    torch.manual_seed(0)
    net = EmbeddingNet(64).eval()
    accuracies = evaluate_embedding(net.features, read_split(data, "test"), SIZE, 5, 1, 15, 150, 0,
                                    torch.device("cpu"), stream=2, progress=False)
    return mean_ci95([100 * a for a in accuracies])


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_with_estimate_stage_times_and_both_accuracies(tmp_path) -> None:
    env = {**script_env(), "QUICK": "1", "WORKDIR": str(tmp_path)}
    env.pop("OMP_NUM_THREADS")  # the demo runs as a user runs it
    result = subprocess.run(["bash", str(REPO / "scripts/demo.sh")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    estimate, elapsed = ESTIMATE.search(out), ELAPSED.search(out)
    assert estimate and elapsed, out[-3000:]
    assert estimate.start() < out.index("== stage 1") < elapsed.start()

    with_deformation, without = WITH.search(out), WITHOUT.search(out)
    assert with_deformation and without, out[-3000:]
    difference = DIFFERENCE.search(out, without.end())  # the evaluation's (stage 2 printed its own before)
    assert difference, out[-3000:]
    summary = json.loads((tmp_path / "runs/demo_1shot/evaluate_1shot_seed0.json").read_text())
    assert summary["episodes"] == 150
    printed = [float(match.group(k)) for match in (with_deformation, without, difference) for k in (1, 2)]
    assert printed == [pytest.approx(summary[key], abs=0.006) for key in
                       ("accuracy", "ci95", "plain_accuracy", "plain_ci95", "difference", "difference_ci95")]
    # paired on the same episodes: the mean difference is the difference of the means
    assert summary["difference"] == pytest.approx(summary["accuracy"] - summary["plain_accuracy"], abs=1e-6)
    assert summary["difference_ci95"] > 0

    untrained, untrained_ci = untrained_test_accuracy(tmp_path / "data/toy")
    # the stage-1 embedding learned: its interval lies wholly above the untrained network's
    assert summary["plain_accuracy"] - summary["plain_ci95"] > untrained + untrained_ci, (summary, untrained)
    assert (tmp_path / "picture/demo_1shot_deformed.png").is_file()  # under WORKDIR, not the repository
