"""The demo's steps, at its quick setting, as a new user runs them: it prints its estimate first and
the time of each stage last, and the embedding it trains clearly learns. (How long it takes is a
benchmark's business, not a test's: the README gives the measured time.)"""
from __future__ import annotations

import json
import re
import subprocess

from tests.scripts_helpers import REPO, script_env

ESTIMATE = re.compile(r"^estimated time: \d+\.\d min on this machine \(.+, \d+ cores\): stage 1 ~\d+\.\d min, "
                      r"stage 2 ~\d+\.\d min, evaluation ~\d+\.\d min$", re.M)
ELAPSED = re.compile(r"^elapsed: data and estimate \d+ s, stage 1 \d+ s, stage 2 \d+ s, evaluation \d+ s, "
                     r"total \d+ s$", re.M)
UNTRAINED_1SHOT = 23.0  # % of a random ResNet-18 on the toy test episodes (README)


def test_quick_demo_runs_end_to_end_with_estimate_and_stage_times(tmp_path) -> None:
    env = {**script_env(), "QUICK": "1", "WORKDIR": str(tmp_path)}
    env.pop("OMP_NUM_THREADS")  # the demo runs as a user runs it
    result = subprocess.run(["bash", str(REPO / "scripts/demo.sh")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    estimate, elapsed = ESTIMATE.search(result.stdout), ELAPSED.search(result.stdout)
    assert estimate and elapsed, result.stdout[-3000:]
    assert estimate.start() < result.stdout.index("== stage 1") < elapsed.start()
    summary = json.loads((tmp_path / "runs/demo_1shot/evaluate_1shot_seed0.json").read_text())
    assert summary["episodes"] == 150
    assert summary["plain_accuracy"] > UNTRAINED_1SHOT + 10  # the embedding learned
    assert (tmp_path / "picture/demo_1shot_deformed.png").is_file()  # under WORKDIR, not the repository
