"""Smoke tests of the benchmarks: each runs end to end on a tiny toy dataset, times the engine's loops
(their section names, one row per timed step) and ends with a JSON line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import Stopwatch
from tests.scripts_helpers import load_script
from utils.options import run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32
# one torch thread and one worker: quick and steady even on a busy two-core machine
COMMON = ["--imageSize", str(IMAGE_SIZE), "--nthreads", "1", "--torchThreads", "1", "--warmup", "1",
          "--device", "cpu"]

EPISODE_KEYS = {"train_ratio", "test_ratio", "train_episode_ms", "train_floor_ms", "test_episode_ms", "test_floor_ms",
                "train_data_wait_ms", "gallery_decode_s", "gallery_features_s", "gallery_ready_s", "peak_rss_mb",
                "train_peak_rss_mb", "train_peak_total_mb", "train_peak_total_pss_mb", "children_maxrss_mb",
                "breakdown_ms"}
STAGE1_KEYS = {"images_per_s_loader", "images_per_s_preloaded", "loading_ratio", "data_wait_ms", "peak_rss_mb",
               "loader_peak_total_mb", "decode_ms_per_image", "breakdown_ms"}
# Sections of engine.stage2.train_one_epoch / evaluate and engine.stage1.train_one_epoch (engine/timing.py).
TRAIN_SECTIONS = {"prepare", "embed_plain", "select", "gallery_batch", "deform", "embed_deformed", "losses", "backward",
                  "optimizer", "bookkeeping"}
TEST_SECTIONS = {"prepare", "embed_plain", "select", "gallery_batch", "deform", "embed_deformed", "losses"}
STAGE1_SECTIONS = {"data_wait", "prepare", "forward", "backward", "optimizer", "bookkeeping"}


@pytest.fixture(scope="module")
def results(toy_root: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Both benchmarks on the session's toy dataset (48 px, read only), run side by side (one core
    each) to keep the test short."""
    root = tmp_path_factory.mktemp("bench_out")
    dataroot = toy_root
    runs = {
        "episode.py": ["--shots", "1", "--augnum", "2", "--chooseNum", "2", "--galleryNum", "2", "--queries", "2",
                       "--episodes", "1", "--passEpisodes", "2"],
        "stage1.py": ["--batchSize", "8", "--steps", "1", "--monitorEpisodes", "2", "--monitorQueries", "2"],
    }
    procs = {}
    for script, extra in runs.items():
        json_path = root / f"{script}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{Path(script).stem}", "--dataroot", str(dataroot), *COMMON, *extra,
               "--json", str(json_path)]
        procs[script] = (subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True), json_path)
    out = {}
    for script, (proc, json_path) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[script] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), json_path)
    return out


def summary_of(results, script: str) -> dict:
    proc, json_path = results[script]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(json_path.read_text()) == summary
    return summary


def timed_sections(column: dict[str, float], names: set[str]) -> None:
    """Every section in ``names`` ran (a positive median)."""
    assert all(column.get(name, 0) > 0 for name in names), (names, column)


@pytest.mark.parametrize("script", ["episode.py", "stage1.py"])
def test_amp_takes_0_or_1_as_in_the_scripts_and_1_needs_cuda(script: str, tmp_path: Path, capsys) -> None:
    module = load_script(f"benchmarks/{script}")
    parser = module.get_args_parser()
    assert (parser.parse_args([]).amp, parser.parse_args(["--amp", "1"]).amp) == (0, 1)
    assert run_cli(module.main, parser, ["--dataroot", str(tmp_path), "--amp", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --amp 1 needs a CUDA device; --device is cpu\n"


@pytest.mark.slow
def test_episode_benchmark(results) -> None:
    summary = summary_of(results, "episode.py")
    assert EPISODE_KEYS <= set(summary)
    assert summary["gallery_images"] == 64 * 2
    for key in ("train_ratio", "test_ratio", "train_episode_ms", "train_floor_ms", "peak_rss_mb"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    breakdown = summary["breakdown_ms"]
    assert set(breakdown) == {"train loop", "train floor", "test loop", "test floor"}
    assert summary["timed_steps"] == dict.fromkeys(breakdown, 1)  # warmup rows dropped
    timed_sections(breakdown["train loop"], TRAIN_SECTIONS | {"data_wait"})
    timed_sections(breakdown["train floor"], TRAIN_SECTIONS)
    timed_sections(breakdown["test loop"], TEST_SECTIONS | {"data_wait", "bookkeeping"})
    timed_sections(breakdown["test floor"], TEST_SECTIONS)
    assert breakdown["train floor"].get("data_wait", 0.0) < 1.0  # episodes already in memory: nothing to wait for
    assert "backward" not in breakdown["test loop"]
    assert 0 <= summary["train_accuracy"] <= 1
    assert summary["eval_pass_episodes"] == 2
    assert summary["eval_pass_ms_per_episode_cached"] > 0 and summary["eval_pass_ms_per_episode_uncached"] > 0
    assert "TOTAL per episode" in results["episode.py"][0].stdout


@pytest.mark.slow
def test_stage1_benchmark(results) -> None:
    summary = summary_of(results, "stage1.py")
    assert STAGE1_KEYS <= set(summary)
    assert summary["images_per_s_loader"] > 0 and summary["images_per_s_preloaded"] > 0
    assert summary["timed_steps"] == {"loader": 1, "preloaded": 1}
    timed_sections(summary["breakdown_ms"]["loader"], STAGE1_SECTIONS)
    timed_sections(summary["breakdown_ms"]["preloaded"], STAGE1_SECTIONS)
    assert "TOTAL per step" in results["stage1.py"][0].stdout
    assert summary["monitor_s_cached"] > 0 and summary["monitor_s_uncached"] > 0
    for shots in (1, 5):  # the timed passes did the same work: the cache changes the time, not the accuracies
        cached, uncached = summary[f"monitor_val_{shots}shot_cached"], summary[f"monitor_val_{shots}shot_uncached"]
        assert 0 <= cached <= 100 and cached == pytest.approx(uncached, abs=1e-9)


def test_the_stopwatch_times_a_block_from_the_end_of_its_skipped_steps() -> None:
    """gpu_check's clock: the first ``skip`` steps (here a 0.3 s one) are left out, the rest of the block is in."""
    with Stopwatch(torch.device("cpu"), skip=1) as watch:
        time.sleep(0.3)
        watch.end_step()
        time.sleep(0.05)
        watch.end_step()
    assert 0.05 <= watch.seconds < 0.3 and watch.peak_mb is None
