"""The study of stage 2's learning over seeds (``benchmarks/study.py``): its summary statistics, and
(slow) one smallest study whose reported numbers are checked against an independent evaluation of
the checkpoints it wrote, then extended by a later invocation."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from engine.experiments import parse_variant
from tests.scripts_helpers import load_script, read_metrics, run_script

study = load_script("benchmarks/study.py")


def fake_run(variant: str, seed: int, gains: list[float], test_gain: float) -> dict:
    curve = [{"epoch": i, "episodes": 10 * (i + 1), "val_gain": g, "val_acc": 50 + g, "val_plain": 50.0,
              "weight_mean": 0.1 * i, "weight_std": 0.2, "scale": 1.0 / (i + 1), "proto_loss": 3.0,
              "gallery_same_class": 0.5, "val_weight_mean": 0.1} for i, g in enumerate(gains)]
    end = {key: curve[-1][key] for key in study.END_METRICS if key in curve[-1]}
    end.update(test_gain=test_gain, test_acc=40.0 + test_gain, test_plain=40.0, test_last_gain=test_gain - 1,
               test_last_acc=39.0 + test_gain, test_last_plain=40.0)
    return {"variant": variant, "seed": seed, "curve": curve, "end": end}


def t_interval(values: list[float]) -> tuple[float, float]:
    n = len(values)
    return statistics.mean(values), stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)


def test_summary_is_the_t_interval_over_seeds_and_the_paired_difference() -> None:
    variants = [parse_variant("a:"), parse_variant("b:--scaleInit auto")]
    results = [fake_run("a", 0, [-2.0, -1.0], -1.5), fake_run("a", 1, [-3.0, -2.0], -2.5),
               fake_run("a", 2, [-1.0, 0.0], -0.5), fake_run("b", 0, [0.5, 1.0], 1.0),
               fake_run("b", 1, [0.0, 2.0], 1.2), fake_run("b", 2, [1.0, 3.0], 1.4)]
    summary = study.summarize(results, variants, [0, 1, 2])
    gain = summary["variants"]["b"]["test_gain"]
    mean, half = t_interval([1.0, 1.2, 1.4])
    assert gain["mean"] == pytest.approx(mean) and gain["half_width_95"] == pytest.approx(half)
    assert gain["exceeds_noise"] is True
    assert summary["variants"]["a"]["val_gain"]["mean"] == pytest.approx(-1.0)
    difference = summary["differences"]["b"]["test_gain"]
    mean, half = t_interval([2.5, 3.7, 1.9])
    assert difference["mean"] == pytest.approx(mean) and difference["half_width_95"] == pytest.approx(half)
    first = summary["curves"]["a"][0]
    assert first["episodes"] == 10 and first["val_gain"]["mean"] == pytest.approx(-2.0)
    assert summary["variants"]["b"]["flags"] == "--scaleInit auto"
    text = study.table(summary, variants, [0, 1, 2])
    assert "| paired test gain, kept weights (best val) | -1.50 +- " in text and "(exceeds noise)" in text
    assert "| paired test gain, last weights | -2.50 +- " in text


SMALL = ["--data", "toy", "--perClass", "20", "--dataSize", "36", "--imageSize", "32", "--seeds", "0", "1",
         "--s1Epochs", "1", "--s1Files", "4", "--s1Batch", "32", "--s2Episodes", "3", "--s2Val", "4",
         "--s2Test", "6", "--galleryNum", "2", "--device", "cpu", "--nthreads", "0",
         "--variant", "faithful:", "--variant", "eval:--galleryBN eval --scaleInit auto"]


@pytest.mark.slow
def test_smallest_study_reports_what_its_checkpoints_give_and_extends(tmp_path: Path) -> None:
    workdir = tmp_path / "study"
    first = run_script(tmp_path, "benchmarks/study.py", *SMALL, "--s2Epochs", "2", "--workdir", str(workdir))
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((workdir / "study.json").read_text())
    root = Path(summary["setup"]["data"])
    for seed_index, seed in enumerate((0, 1)):
        # The kept weights of the evaluation-mode variant, evaluated afresh by the script's --evaluate
        # on the same test episodes (its gallery pass leaves the statistics as training saw them).
        for weights, kind in ((f"s2_eval_seed{seed}", "test"), (f"s2_eval_seed{seed}_last", "test_last")):
            check = run_script(workdir, "onlyBasetwoLoss.py", "--dataroot", str(root), "--imageSize", "32", "--seed",
                               str(seed), "--GNet", weights, "--tensorname", f"check_{weights}", "--evaluate",
                               "--shots", "1", "--galleryNum", "2", "--galleryBN", "eval", "--testEpisodes", "6",
                               "--nthreads", "0", "--progress", "0", "--device", "cpu")
            assert check.returncode == 0, check.stderr
            report = json.loads((workdir / f"runs/check_{weights}/evaluate_1shot_seed{seed}.json").read_text())
            reported = summary["variants"]["eval"]
            assert reported[f"{kind}_acc"]["values"][seed_index] == pytest.approx(report["accuracy"])
            assert reported[f"{kind}_plain"]["values"][seed_index] == pytest.approx(report["plain_accuracy"])
            assert reported[f"{kind}_gain"]["values"][seed_index] == pytest.approx(report["difference"])
        for variant in ("faithful", "eval"):
            rows = read_metrics(workdir / f"runs/s2_{variant}_seed{seed}/metrics.csv")
            assert len(rows) == 2
            last = rows[-1]
            assert summary["variants"][variant]["val_gain"]["values"][seed_index] == pytest.approx(
                float(last["select_acc"]) - float(last["select_plain_acc"]), abs=1e-4)
            assert summary["variants"][variant]["scale"]["values"][seed_index] == pytest.approx(float(last["scale"]))
    for variant in ("faithful", "eval"):
        mean, half = t_interval(summary["variants"][variant]["test_gain"]["values"])
        assert summary["variants"][variant]["test_gain"]["mean"] == pytest.approx(mean)
        assert summary["variants"][variant]["test_gain"]["half_width_95"] == pytest.approx(half)
    assert summary["variants"]["eval"]["scale"]["mean"] < 0.5  # auto starts far below the original's 1
    assert (workdir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = (workdir / "study.csv").read_text().splitlines()
    assert len(curves) == 1 + 2 * 2 * 2  # header, 2 variants x 2 seeds x 2 epochs

    # The same command reuses every run; a longer schedule continues each run from its saved state.
    before = read_metrics(workdir / "runs/s2_faithful_seed0/metrics.csv", timing=False)
    again = run_script(tmp_path, "benchmarks/study.py", *SMALL, "--s2Epochs", "2", "--workdir", str(workdir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": reused ") == 2 + 4 and ": stage 2" not in again.stdout
    assert not (workdir / "runs/s2_eval_seed0/evaluate_1shot_seed0_last.json").stat().st_size == 0
    longer = run_script(tmp_path, "benchmarks/study.py", *SMALL, "--s2Epochs", "3", "--workdir", str(workdir))
    assert longer.returncode == 0, longer.stderr
    assert longer.stdout.count("continued to 3 epochs") == 4
    after = read_metrics(workdir / "runs/s2_faithful_seed0/metrics.csv", timing=False)
    assert after[:2] == before and len(after) == 3
    last = json.loads((workdir / "runs/s2_faithful_seed0/evaluate_1shot_seed0_last.json").read_text())
    assert last["weights"] == "last"
    extended = json.loads((workdir / "study.json").read_text())
    assert [p["episodes"] for p in extended["curves"]["faithful"]] == [3, 6, 9]
