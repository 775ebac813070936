"""scripts/sweep.py: grids of runs (real stage-2 runs on toy data, and a stand-in script where
only the sweep's own behaviour is under test), resumption, failures, SLURM, the pick on val."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import experiments
from tests.scripts_helpers import (
    REPO,
    load_script,
    make_workdir,
    read_metrics,
    script_env,
)

SWEEP = ["-m", "scripts.sweep"]  # as users run it (script_env puts the repository on PYTHONPATH)
STAGE2 = str(REPO / "onlyBasetwoLoss.py")
TINY = ["--dataroot", "toy", "--network", "stage1", "--imageSize", "32", "--epoch", "2", "--numEpochs", "2",
        "--valEpisodes", "4", "--testEpisodes", "4", "--galleryNum", "2", "--chooseNum", "2", "--augnum", "1",
        "--test_num", "3", "--nthreads", "0", "--progress", "0", "--device", "cpu"]

sweep = load_script("scripts/sweep.py")

# A stand-in for a training script: records how it was called, sleeps --sleep seconds (unless
# resumed), on SIGTERM writes resume.pt and exits 130, else writes the files stage 2 writes.
FAKE = '''
import json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
def value(flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default
run = Path("runs") / value("--tensorname")
run.mkdir(parents=True, exist_ok=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
start = time.time()
print("started", flush=True)
end = start + (0 if "--resume" in args else float(value("--sleep", "0")))
while time.time() < end and not stop:
    time.sleep(0.02)
seen = {}
if "--waitFor" in args:  # announce itself in alive/, wait until --waitFor runs are alive or all --runs started
    alive, started = Path("alive"), Path("started")
    alive.mkdir(exist_ok=True)
    started.mkdir(exist_ok=True)
    (started / run.name).touch()
    (alive / (run.name + ".tmp")).write_text(os.environ.get("CUDA_VISIBLE_DEVICES") or "")
    (alive / (run.name + ".tmp")).rename(alive / run.name)
    deadline = time.time() + 60
    while time.time() < deadline:
        now = {}
        for path in alive.glob("*[!p]"):
            try:
                now[path.name] = path.read_text()
            except FileNotFoundError:  # that run just ended
                pass
        if len(now) > len(seen):
            seen = now
        if len(now) >= int(value("--waitFor")) or len(list(started.iterdir())) == int(value("--runs")):
            break
        time.sleep(0.02)
    (alive / run.name).unlink()
with open(run / "calls.jsonl", "a") as handle:
    handle.write(json.dumps({"args": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "omp": os.environ.get("OMP_NUM_THREADS"), "alive": seen}) + "\\n")
if stop:
    (run / "resume.pt").write_text("state")
    sys.exit(130)
(run / "metrics.csv").write_text("epoch,select_split,select_acc\\n0,val,50\\n")
(run / "evaluate_1shot_seed{}.json".format(value("--seed", "0"))).write_text(json.dumps({"accuracy": 40.0}))
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("sweep"))


@pytest.fixture
def fake(tmp_path) -> Path:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE)
    return path


def sweep_here(monkeypatch, capsys, cwd: Path, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """``scripts/sweep.py args...`` run through its ``main`` in this process (the runs it starts are
    processes), in ``cwd`` and, when given, with exactly the environment ``env``."""
    monkeypatch.chdir(cwd)
    if env is not None:
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    status = sweep.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def run_sweep(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *SWEEP, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env or script_env())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def calls(cwd: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (cwd / "runs" / name / "calls.jsonl").read_text().splitlines()]


def best_val_from_files(run_dir: Path) -> tuple[float, int]:
    rows = [row for row in read_metrics(run_dir / "metrics.csv") if row["select_split"] == "val"]
    best = max(rows, key=lambda row: float(row["select_acc"]))  # first of equal maxima, like the sweep
    return float(best["select_acc"]), int(best["epoch"])


# --- pure functions -----------------------------------------------------------------------------

def test_grid_names_runs_and_replaces_flags_in_product_order():
    command = ["train.py", "--seed", "0", "--LR=0.1", "--tensorname=base", "--shots", "5"]
    runs = sweep.expand(command, sweep.parse_grid(["seed=1,2", "--LR=0.001,5e-4"]))
    assert [run.name for run in runs] == ["base_seed1_LR0.001", "base_seed1_LR5e-4", "base_seed2_LR0.001",
                                          "base_seed2_LR5e-4"]
    args = runs[3].args
    assert [sweep.flag_value(args, flag) for flag in ("--seed", "--LR", "--tensorname", "--shots")] == \
        ["2", "5e-4", "base_seed2_LR5e-4", "5"]
    assert args.count("--seed") == 1 and "--LR=0.1" not in args and "--tensorname=base" not in args
    assert runs[3].evaluate_file() == Path("runs/base_seed2_LR5e-4/evaluate_5shot_seed2.json")


def test_gpu_detection_and_child_environment():
    assert experiments.parse_gpus("3,5", "GPU 0: x\nGPU 1: y\nGPU 2: z") == ["3", "5"]
    assert experiments.parse_gpus("", "GPU 0: x") == []
    assert experiments.parse_gpus("0,-1,1", None) == ["0"]
    assert experiments.parse_gpus(None, "GPU 0: A (UUID: GPU-1)\nGPU 1: B (UUID: GPU-2)\n") == ["0", "1"]
    assert experiments.parse_gpus(None, None) == []
    env = experiments.child_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}, "1", 4, 16)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "4" and env["PATH"] == "/bin"
    assert experiments.child_env({"OMP_NUM_THREADS": "2"}, None, 8, 2) == {"OMP_NUM_THREADS": "2",
                                                                           "PYTHONUNBUFFERED": "1"}


def test_the_cores_shared_among_runs_are_this_process_s_allocation(monkeypatch):
    """A SLURM task or a taskset sees fewer cores than the machine has: those are the ones to share."""
    monkeypatch.setattr(experiments.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(experiments.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert experiments.usable_cpus() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert experiments.usable_cpus() == 6


def test_best_val_reads_columns_by_name_for_both_stages():
    stage1 = [{"epoch": "0", "val_1shot": "", "loss": "3"}, {"epoch": "1", "val_1shot": "41.5", "loss": "2"},
              {"epoch": "2", "val_1shot": "40", "loss": "1"}]
    assert sweep.best_val(stage1) == ("val_1shot", 41.5, 1)
    precise = [{**row, "val_1shot_precise": value} for row, value in zip(stage1, ["", "39", "42.5"])]
    assert sweep.best_val(precise) == ("val_1shot_precise", 42.5, 2)
    assert sweep.best_val([{**row, "val_1shot_precise": ""} for row in stage1]) == ("val_1shot", 41.5, 1)
    stage2 = [{"select_acc": "60", "epoch": "0", "select_split": "val", "extra": "9"},
              {"select_acc": "61", "epoch": "1", "select_split": "val", "extra": "1"}]
    assert sweep.best_val(stage2) == ("select_acc", 61.0, 1)
    on_test = [{**row, "select_split": "test"} for row in stage2]
    assert sweep.best_val(on_test) == ("none (--selectOn test)", None, None)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [
    ([], "SCRIPT"),
    (["--grid", "seed", "--", "FAKE", "--tensorname", "t"], "--grid"),
    (["--grid", "seed=1,,2", "--", "FAKE", "--tensorname", "t"], "--grid"),
    (["--grid", "tensorname=a,b", "--", "FAKE", "--tensorname", "t"], "--grid"),
    (["--", "FAKE", "--seed", "1"], "--tensorname"),
    (["--", "missing.py", "--tensorname", "t"], "SCRIPT"),
    (["--jobs", "0", "--", "FAKE", "--tensorname", "t"], "--jobs"),
    (["--jobs", "2", "--perGPU", "1", "--", "FAKE", "--tensorname", "t"], "--perGPU"),
    (["--perGPU", "1", "--", "FAKE", "--tensorname", "t"], "--perGPU"),
    (["--slurm", "--", "FAKE", "--tensorname", "t"], "--slurm"),
    (["--dryRun", "--", "FAKE", "--tensorname", "t"], "--dryRun"),
    (["--runIndex", "2", "--grid", "seed=1,2", "--", "FAKE", "--tensorname", "t"], "--runIndex"),
    (["--", "FAKE", "--tensorname", "t", "--resume"], "--resume"),
    (["--perGPU", "1", "--", "FAKE", "--tensorname", "t", "--device", "cuda:1"], "--device cuda:1"),
    (["--perGPU", "1", "--grid", "device=cuda:0,cuda:1", "--", "FAKE", "--tensorname", "t"], "--device cuda:0"),
    (["--slurm", "--dryRun", "--", "FAKE", "--tensorname", "t", "--device=cuda:2"], "--device cuda:2"),
], ids=["no-command", "grid-syntax", "grid-empty-value", "grid-reserved", "no-tensorname", "no-script", "jobs",
       "jobs-and-perGPU", "no-gpu", "no-sbatch", "dryRun-alone", "runIndex", "resume", "device-pinned",
       "device-pinned-grid", "device-pinned-slurm"])
def test_bad_input_is_one_line_status_2_and_writes_nothing(tmp_path, fake, args, flag, monkeypatch, capsys):
    env = {**script_env(), "PATH": str(tmp_path / "empty"), "CUDA_VISIBLE_DEVICES": ""}  # no sbatch, no GPU
    result = sweep_here(monkeypatch, capsys, tmp_path, *[str(fake) if arg == "FAKE" else arg for arg in args],
                        env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and flag in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fake_train.py"]


# --- the summary ---------------------------------------------------------------------------------

def write_run(root: Path, name: str, val: list[float], test: float | None, split: str = "val") -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,proto_loss,select_split,select_acc,select_loss\n" + "".join(
        f"{epoch},1.0,{split},{acc},0.5\n" for epoch, acc in enumerate(val)))
    (run / "resume.pt").write_text("state")
    if test is not None:
        time.sleep(0.01)  # the evaluate JSON is written after the last resume.pt
        seed = name.split("_seed")[1].split("_")[0]
        (run / f"evaluate_1shot_seed{seed}.json").write_text(json.dumps({"accuracy": test, "episodes": 600}))


def test_summary_picks_on_val_where_test_disagrees_and_averages_over_seeds(tmp_path, fake, monkeypatch, capsys):
    write_run(tmp_path, "u_seed1_LR0.1", [50, 70, 60], 40.0)  # best val, worst test
    write_run(tmp_path, "u_seed1_LR0.2", [65], 80.0)  # best test
    write_run(tmp_path, "u_seed2_LR0.1", [68], 42.0)
    write_run(tmp_path, "u_seed2_LR0.2", [99], 78.0, split="test")  # --selectOn test: must never be picked
    write_run(tmp_path, "u_seed3_LR0.1", [95], None)  # failed, resumable: excluded although its val is highest
    status = tmp_path / "runs/u_sweep/status"
    status.mkdir(parents=True)
    (status / "u_seed3_LR0.1.json").write_text(json.dumps({"exit_status": 1, "wall_s": 3.0}))
    monkeypatch.chdir(tmp_path)
    code = sweep.main(["--grid", "seed=1,2,3", "--grid", "LR=0.1,0.2", "--summarize", "--", str(fake),
                       "--tensorname", "u"])
    out = capsys.readouterr().out
    assert code == 1  # two runs are not finished

    rows = {row["tensorname"]: row for row in read_csv(tmp_path / "runs/u_sweep/summary.csv")}
    assert list(rows) == ["u_seed1_LR0.1", "u_seed1_LR0.2", "u_seed2_LR0.1", "u_seed2_LR0.2", "u_seed3_LR0.1",
                          "u_seed3_LR0.2"]
    first = rows["u_seed1_LR0.1"]
    assert (first["seed"], first["LR"], first["status"], first["val_metric"]) == ("1", "0.1", "ok", "select_acc")
    assert (float(first["val_acc"]), int(first["val_epoch"]), float(first["test_acc"])) == (70.0, 1, 40.0)
    assert rows["u_seed2_LR0.2"]["val_acc"] == "" and rows["u_seed2_LR0.2"]["val_metric"].startswith("none")
    assert rows["u_seed3_LR0.1"]["status"] == "failed (exit 1, resumable)"
    assert rows["u_seed3_LR0.1"]["exit_status"] == "1" and rows["u_seed3_LR0.1"]["test_acc"] == ""
    assert rows["u_seed3_LR0.2"]["status"] == "not run"
    assert "picked on val (select_acc): u_seed1_LR0.1, val 70.00 % at epoch 1; its test accuracy 40.00 %" in out
    assert "selected on test (--selectOn test), so no val accuracy and never picked: u_seed2_LR0.2" in out

    settings = {row["LR"]: row for row in read_csv(tmp_path / "runs/u_sweep/settings.csv")}
    assert float(settings["0.1"]["test_mean"]) == pytest.approx(41.0)
    assert float(settings["0.1"]["test_std"]) == pytest.approx(statistics.stdev([40.0, 42.0]), rel=1e-5)  # ddof=1
    assert (settings["0.1"]["runs"], settings["0.1"]["ok"], settings["0.1"]["test_n"]) == ("3", "2", "2")
    assert float(settings["0.1"]["val_mean"]) == pytest.approx(69.0)
    assert float(settings["0.2"]["test_mean"]) == pytest.approx(79.0)
    assert float(settings["0.2"]["val_mean"]) == pytest.approx(65.0)
    assert "LR=0.1: test 41.00 +- 1.41 % (n=2)" in out
    assert "setting picked on mean val: LR=0.1: test 41.00 +- 1.41 %" in out
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "runs/u_sweep/summary.png").is_file() == has_matplotlib


# --- local pool, with the stand-in script ---------------------------------------------------------

def test_per_gpu_pool_pins_each_run_and_shares_gpus(tmp_path, fake, monkeypatch, capsys):
    """Two GPUs, two runs per GPU: four runs at once, never more, and never more than two on one GPU,
    counted from the runs' own records of which runs were alive with them (each waits until four are,
    or until all six have started)."""
    env = {k: v for k, v in script_env().items() if k != "OMP_NUM_THREADS"}
    env["CUDA_VISIBLE_DEVICES"] = "3,5"
    result = sweep_here(monkeypatch, capsys, tmp_path, "--grid", "x=1,2,3,4,5,6", "--perGPU", "2", "--", str(fake),
                        "--waitFor", "4", "--runs", "6", "--tensorname", "g", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    records = {x: calls(tmp_path, f"g_x{x}")[0] for x in "123456"}
    assert {record["cuda"] for record in records.values()} == {"3", "5"}
    assert records["1"]["cuda"] != records["2"]["cuda"]  # spread over the GPUs before sharing
    assert {record["omp"] for record in records.values()} == {str(max(1, (os.cpu_count() or 1) // 4))}
    assert max(len(record["alive"]) for record in records.values()) == 4
    for x, record in records.items():
        assert record["alive"][f"g_x{x}"] == record["cuda"]  # it saw itself, on its own GPU
        on_gpu = list(record["alive"].values())
        assert max(on_gpu.count("3"), on_gpu.count("5")) <= 2, record["alive"]


def test_sigterm_to_the_sweep_stops_runs_resumably_and_the_next_sweep_resumes(tmp_path, fake):
    process = subprocess.Popen([sys.executable, "-u", *SWEEP, "--grid", "seed=1,2", "--", str(fake),
                                "--sleep", "60", "--tensorname", "f"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=script_env())
    log = tmp_path / "runs/f_sweep/logs/f_seed1.log"
    deadline = time.time() + 60
    while not (log.is_file() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    rows = {row["tensorname"]: row for row in read_csv(tmp_path / "runs/f_sweep/summary.csv")}
    assert rows["f_seed1"]["status"] == "interrupted (exit 130, resumable)"
    assert rows["f_seed2"]["status"] == "not run"  # --jobs 1: never started after the signal

    again = run_sweep(tmp_path, "--grid", "seed=1,2", "--", str(fake), "--sleep", "0", "--tensorname", "f")
    assert again.returncode == 0, again.stdout + again.stderr
    first, resumed = calls(tmp_path, "f_seed1")
    assert "--resume" not in first["args"] and resumed["args"][-1] == "--resume"
    assert "--resume" not in calls(tmp_path, "f_seed2")[0]["args"]
    record = json.loads((tmp_path / "runs/f_sweep/status/f_seed1.json").read_text())
    assert record["attempts"] == 2 and record["exit_status"] == 0


def test_leftover_folder_is_restarted_with_overwrite(tmp_path, fake, monkeypatch, capsys):
    (tmp_path / "runs/o_seed1").mkdir(parents=True)
    (tmp_path / "runs/o_seed1/args.json").write_text("{}")
    result = sweep_here(monkeypatch, capsys, tmp_path, "--grid", "seed=1", "--", str(fake), "--tensorname", "o")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls(tmp_path, "o_seed1")[0]["args"][-1] == "--overwrite"


# --- SLURM ----------------------------------------------------------------------------------------

def test_slurm_dry_run_prints_an_array_script_whose_body_runs_the_right_point(tmp_path, fake, monkeypatch, capsys):
    grid = ["--grid", "seed=1,2", "--grid", "LR=0.001,0.01"]
    command = ["--", str(fake), "--LR", "0.5", "--tensorname", "s"]
    result = sweep_here(monkeypatch, capsys, tmp_path, "--slurm", "--dryRun", "--partition", "gpu",
                        "--gpusPerTask", "1", "--cpusPerTask", "4", "--mem", "16G", "--time", "2:00:00", *grid,
                        *command)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --array=0-3", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G", "#SBATCH --time=2:00:00",
                 f"#SBATCH --output={tmp_path.resolve()}/runs/s_sweep/logs/slurm_%A_%a.out"):
        assert line in script.splitlines()
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    path = tmp_path / "array.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0

    other = tmp_path / "elsewhere"
    other.mkdir()
    task = subprocess.run(["bash", str(path)], cwd=other, capture_output=True, text=True, timeout=120,
                          env={**script_env(), "SLURM_ARRAY_TASK_ID": "2"})
    assert task.returncode == 0, task.stdout + task.stderr
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["s_seed2_LR0.001", "s_sweep"]
    args = calls(tmp_path, "s_seed2_LR0.001")[0]["args"]
    assert [sweep.flag_value(args, flag) for flag in ("--seed", "--LR", "--tensorname")] == \
        ["2", "0.001", "s_seed2_LR0.001"]
    assert args.count("--LR") == 1

    summary = next(line for line in script.splitlines() if line.startswith("# after the array: "))
    done = subprocess.run(summary.removeprefix("# after the array: "), shell=True, cwd=tmp_path, capture_output=True,
                          text=True, env=script_env())
    assert done.returncode == 1  # three points have not run
    rows = read_csv(tmp_path / "runs/s_sweep/summary.csv")
    assert [row["status"] for row in rows] == ["not run", "not run", "ok", "not run"]


def test_slurm_submits_the_array_and_a_summary_job_after_it(tmp_path, fake, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {tmp_path}/sbatch_calls\necho 4242\n')
    sbatch.chmod(0o755)
    env = {**script_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = sweep_here(monkeypatch, capsys, tmp_path, "--slurm", "--grid", "seed=1,2", "--", str(fake),
                        "--tensorname", "q", env=env)
    assert result.returncode == 0, result.stderr
    array_call, summary_call = (tmp_path / "sbatch_calls").read_text().splitlines()
    assert array_call == "--parsable runs/q_sweep/sweep.sbatch"
    assert "#SBATCH --array=0-1" in (tmp_path / "runs/q_sweep/sweep.sbatch").read_text()
    assert (tmp_path / "runs/q_sweep/logs").is_dir()  # SLURM does not create the --output folder
    assert "--dependency=afterany:4242" in summary_call and "--summarize" in summary_call
    assert "submitted array job 4242" in result.stdout


# --- real stage-2 runs -----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_by_two_grid_of_stage2_runs_then_a_second_sweep_skips_them(workdir):
    args = ["--grid", "seed=1,2", "--grid", "LR=0.001,0.01", "--jobs", "2", "--", STAGE2, *TINY, "--tensorname", "g"]
    result = run_sweep(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [f"g_seed{seed}_LR{lr}" for seed in (1, 2) for lr in ("0.001", "0.01")]
    rows = read_csv(workdir / "runs/g_sweep/summary.csv")
    assert [row["tensorname"] for row in rows] == names
    for row in rows:
        run = workdir / "runs" / row["tensorname"]
        saved = json.loads((run / "args.json").read_text())
        assert (saved["seed"], saved["LR"], saved["tensorname"]) == (int(row["seed"]), float(row["LR"]),
                                                                      row["tensorname"])
        assert (workdir / "models" / f"{row['tensorname']}.t7").is_file()
        val, epoch = best_val_from_files(run)
        test = json.loads((run / f"evaluate_1shot_seed{row['seed']}.json").read_text())["accuracy"]
        assert row["status"] == "ok" and row["exit_status"] == "0" and float(row["wall_s"]) > 0
        assert (float(row["val_acc"]), int(row["val_epoch"])) == (pytest.approx(val, rel=1e-5), epoch)
        assert float(row["test_acc"]) == pytest.approx(test, rel=1e-5)
    picked = max(rows, key=lambda row: float(row["val_acc"]))
    assert f"picked on val (select_acc): {picked['tensorname']}," in result.stdout
    logs = {name: (workdir / f"runs/g_sweep/logs/{name}.log").read_text() for name in names}
    assert all("test accuracy:" in text for text in logs.values())

    again = run_sweep(workdir, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [line for line in again.stdout.splitlines() if line.startswith(("skip", "start"))] == \
        [f"skip {name} (finished)" for name in names]
    assert {name: (workdir / f"runs/g_sweep/logs/{name}.log").read_text() for name in names} == logs


@pytest.mark.slow
def test_killed_stage2_run_is_reported_then_resumed_and_the_other_finishes(workdir):
    args = ["--grid", "seed=1,2", "--jobs", "2", "--", STAGE2, *TINY, "--numEpochs", "4", "--tensorname", "k"]
    process = subprocess.Popen([sys.executable, "-u", *SWEEP, *args], cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=script_env())
    pid = None
    for line in process.stdout:
        if line.startswith("start k_seed1 "):
            pid = int(re.search(r"pid (\d+)", line).group(1))
            break
    log = workdir / "runs/k_sweep/logs/k_seed1.log"
    deadline = time.time() + 300
    while "epoch 0:" not in log.read_text() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)  # the run saves its state and exits 130
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 1, output
    rows = {row["tensorname"]: row for row in read_csv(workdir / "runs/k_sweep/summary.csv")}
    assert rows["k_seed1"]["status"] == "interrupted (exit 130, resumable)"
    assert rows["k_seed2"]["status"] == "ok" and rows["k_seed2"]["test_acc"] != ""
    assert f"not finished: k_seed1: interrupted (exit 130, resumable); log {log.relative_to(workdir)}" in output

    again = run_sweep(workdir, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skip k_seed2 (finished)" in again.stdout and "start k_seed1 (--resume," in again.stdout
    assert "resuming k_seed1 at epoch" in log.read_text()
    assert len(read_metrics(workdir / "runs/k_seed1/metrics.csv")) == 4
    rows = {row["tensorname"]: row for row in read_csv(workdir / "runs/k_sweep/summary.csv")}
    assert rows["k_seed1"]["status"] == "ok" and rows["k_seed1"]["test_acc"] != ""


@pytest.mark.slow
def test_failing_grid_point_is_reported_and_the_others_finish(workdir):
    result = run_sweep(workdir, "--grid", "augnum=0,1", "--jobs", "2", "--", STAGE2, *TINY, "--tensorname", "bad")
    assert result.returncode == 1
    rows = {row["tensorname"]: row for row in read_csv(workdir / "runs/bad_sweep/summary.csv")}
    failed = rows["bad_augnum0"]
    assert failed["status"] == "bad input (exit 2)" and failed["exit_status"] == "2"
    assert "error: --augnum must be at least 1" in (workdir / failed["log"]).read_text()
    assert (f"not finished: bad_augnum0: bad input (exit 2); log {failed['log']}: error: --augnum must be at least 1"
            in result.stdout)
    assert rows["bad_augnum1"]["status"] == "ok" and rows["bad_augnum1"]["test_acc"] != ""
