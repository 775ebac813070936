"""scripts/gpu_check.py's CPU dry run, as CI runs it (with its multi-process checks on gloo), read through
its JSON report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.scripts_helpers import REPO, script_env


@pytest.mark.slow
def test_the_cpu_dry_run_measures_both_stages_and_passes_its_checks(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--device", "cpu", "--imageSize", "32",
                           "--quick", "--dataroot", str(tmp_path / "toy"), "--workdir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "gpu_check.json"), "--nthreads", "0", "--distributedChecks", "1"],
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
    assert checks["stage2_host_syncs_1shot_fp32"] == {"ok": None, "detail": "skipped: the device is the CPU"}
    assert checks["torchrun_two_ranks_loss"]["ok"] is None and "amp" not in report["stage1"]
    assert "outcome" not in report  # --quick
    assert "ok     cached_features_1shot_fp32" in done.stdout
    # the multi-process checks, on the CPU with gloo (--distributedChecks 1)
    assert checks["torchrun_uneven_split"] == {
        "ok": True, "detail": "gloo, CPU: 256 items on 3 ranks (padded): exit [0, 0, 0], [86] items and [11] steps per rank"}
    sigterm = checks["torchrun_sigterm_resume"]
    assert sigterm["ok"] is True and sigterm["detail"].startswith("gloo, CPU: SIGTERM: exit [130, 130], stopped in "
                                                                  "training epoch 0, after step "), sigterm
    assert sigterm["detail"].endswith("; --resume: exit [0, 0], 2 of 2 epochs logged"), sigterm
    assert checks["torchrun_nan_on_one_rank"] == {
        "ok": True, "detail": "gloo, CPU: exit [3, 3]: ['non-finite loss on rank 1 at epoch 0, step 1']"}
    work = tmp_path / "work/distributed"
    assert [json.loads((work / f"nan_rank{rank}.json").read_text())["exit"] for rank in range(2)] == [3, 3]
