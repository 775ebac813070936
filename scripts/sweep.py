"""Several runs as one experiment: a grid of flag values over a training script, run on the CPU,
on the visible GPUs or as a SLURM array; resumable; picked on val and reported over seeds.

    python scripts/sweep.py --grid seed=0,1,2 --grid LR=0.001,0.0005 --perGPU 2 -- \\
        onlyBasetwoLoss.py --dataroot data/miniImageNet --network softRandom --tensorname metaNet

Each grid point is the script's command line with ``--FLAG value`` for each grid flag and
``--tensorname NAME_<flag><value>...``. Outputs: ``runs/NAME_sweep/`` (``logs/<run>.log``,
``status/<run>.json``, ``summary.csv``, ``settings.csv``, ``summary.png`` with matplotlib).
Exit status: 0 every run finished, 1 some did not, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.cpus import usable_cpus  # noqa: E402  (the repository root is on the path only from here)
from utils.errors import OptionError  # noqa: E402
from utils.files import RUNS_DIR, csv_cell, read_csv, write_csv, write_json  # noqa: E402
from utils.interrupt import INTERRUPTED_EXIT as INTERRUPTED  # noqa: E402

SEED_FLAG = "seed"
RESERVED = ("tensorname", "resume", "overwrite")
EXIT_MEANING = {2: "bad input", 3: "diverged", INTERRUPTED: "interrupted"}
SUMMARY_FIELDS = ["tensorname", "status", "val_metric", "val_acc", "val_epoch", "test_acc", "exit_status", "wall_s",
                  "log"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise OptionError(message)


@dataclass
class Run:
    """One grid point: its name, its grid values and the script's command line for it."""

    index: int
    name: str
    values: dict[str, str]
    script: str
    args: list[str] = field(default_factory=list)

    def run_dir(self) -> Path:
        return RUNS_DIR / self.name

    def evaluate_file(self) -> Path:
        """Stage 2's test result, written once training (or ``--evaluate``) has finished."""
        shots, seed = flag_value(self.args, "--shots") or "1", flag_value(self.args, "--seed") or "0"
        return self.run_dir() / f"evaluate_{shots}shot_seed{seed}.json"

    def result_files(self) -> list[Path]:
        """Files a finished run leaves: stage 1's summary.json, stage 2's evaluate JSON."""
        return [self.run_dir() / "summary.json", self.evaluate_file()]


def get_parser() -> Parser:
    parser = Parser(prog="sweep.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage="%(prog)s [--grid 'FLAG=v1,v2' ...] [--jobs N | --perGPU K | --slurm [--dryRun]] "
                          "-- SCRIPT ARGS... --tensorname NAME",
                    description=__doc__.split("\n\n")[0],
                    epilog="Runs are named NAME_<flag><value>... (grid flags in the order given); a finished run is "
                           "skipped, an interrupted one continued with --resume, a leftover folder restarted with "
                           "--overwrite.")
    parser.add_argument("--grid", action="append", default=[], metavar="FLAG=v1,v2",
                        help="one script flag and its values; several --grid: their product")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time, no GPU pinning (default 1)")
    parser.add_argument("--perGPU", type=int, default=None,
                        help="runs sharing each visible GPU, each pinned with CUDA_VISIBLE_DEVICES")
    parser.add_argument("--slurm", action="store_true", help="write runs/NAME_sweep/sweep.sbatch and submit it")
    parser.add_argument("--dryRun", action="store_true", help="with --slurm: print the array script, submit nothing")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--gpusPerTask", type=int, help="GPUs per array task (--gres=gpu:N)")
    parser.add_argument("--gres", help="SLURM --gres, as written (instead of --gpusPerTask)")
    parser.add_argument("--cpusPerTask", type=int, help="SLURM --cpus-per-task")
    parser.add_argument("--mem", help="SLURM --mem per task, e.g. 16G")
    parser.add_argument("--time", help="SLURM --time per task, e.g. 24:00:00")
    parser.add_argument("--maxParallel", type=int, help="SLURM: at most this many array tasks at once")
    parser.add_argument("--runIndex", type=int, help="run only grid point K (what each SLURM array task does)")
    parser.add_argument("--summarize", action="store_true", help="only write and print the summary")
    return parser


# --- command lines and the grid ------------------------------------------------------------

def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def without_flag(args: list[str], flag: str) -> list[str]:
    """``args`` without any ``--flag v`` or ``--flag=v``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``['seed=1,2', 'LR=0.001']`` -> ``[('seed', ['1', '2']), ('LR', ['0.001'])]``."""
    grid, seen = [], set()
    for spec in specs:
        flag, sep, values = spec.partition("=")
        flag = flag.strip().removeprefix("--")
        items = [v.strip() for v in values.split(",")]
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", flag) or not all(items):
            raise OptionError(f"--grid {spec!r}: expected FLAG=v1,v2 (a script flag without dashes, values "
                             "separated by commas)")
        if flag in RESERVED:
            raise OptionError(f"--grid {spec!r}: --{flag} is set by the sweep, not a grid flag")
        if flag in seen or len(set(items)) < len(items):
            raise OptionError(f"--grid {spec!r}: flag or value given twice")
        seen.add(flag)
        grid.append((flag, items))
    return grid


def name_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", value)


def expand(command: list[str], grid: list[tuple[str, list[str]]]) -> list[Run]:
    """The grid's runs in product order (first --grid slowest), each with its own command line."""
    script, args = command[0], command[1:]
    base = flag_value(args, "--tensorname")
    args = without_flag(args, "--tensorname")
    for flag, _ in grid:
        args = without_flag(args, f"--{flag}")
    flags = [flag for flag, _ in grid]
    runs = []
    for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
        values = dict(zip(flags, combo))
        name = base + "".join(f"_{flag}{name_part(value)}" for flag, value in values.items())
        run_args = args + [item for flag, value in values.items() for item in (f"--{flag}", value)]
        runs.append(Run(index, name, values, script, run_args + ["--tensorname", name]))
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise OptionError("--grid: two values give the same run name (only letters, digits and . + - are kept)")
    return runs


# --- state of one run -------------------------------------------------------------------------

def run_state(run: Run) -> str:
    """``finished`` (result file newer than any resume.pt), ``interrupted`` (resume.pt),
    ``leftover`` (a folder with neither) or ``new``."""
    run_dir, resume = run.run_dir(), run.run_dir() / "resume.pt"
    done = [path.stat().st_mtime_ns for path in run.result_files() if path.is_file()]
    if done and (not resume.is_file() or max(done) >= resume.stat().st_mtime_ns):
        return "finished"
    if resume.is_file():
        return "interrupted"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "leftover"
    return "new"


def command_for(run: Run, state: str) -> list[str]:
    extra = {"interrupted": ["--resume"], "leftover": ["--overwrite"]}.get(state, [])
    return [sys.executable, run.script, *run.args, *extra]


def sweep_dir(base: str) -> Path:
    return RUNS_DIR / f"{base}_sweep"


def log_path(base: str, run: Run) -> Path:
    return sweep_dir(base) / "logs" / f"{run.name}.log"


def record_path(base: str, run: Run) -> Path:
    return sweep_dir(base) / "status" / f"{run.name}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- devices ------------------------------------------------------------------------------------

def parse_gpus(cuda_visible: str | None, smi_listing: str | None) -> list[str]:
    """Visible GPU ids: from CUDA_VISIBLE_DEVICES when set (up to an invalid ``-1``), else one
    per ``GPU N:`` line of ``nvidia-smi -L``."""
    if cuda_visible is not None:
        ids = []
        for item in (part.strip() for part in cuda_visible.split(",")):
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    return [str(i) for i, line in enumerate(line for line in (smi_listing or "").splitlines()
                                            if line.startswith("GPU "))]


def visible_gpus() -> list[str]:
    listing = None
    if "CUDA_VISIBLE_DEVICES" not in os.environ and shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listing = None
    return parse_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), listing)


def gpu_slots(gpus: list[str], per_gpu: int) -> list[str]:
    """Worker slots, one GPU id each, ``per_gpu`` per GPU, spread over the GPUs first: the
    first ``len(gpus)`` runs get one GPU each, the next ones share."""
    return [gpu for _ in range(per_gpu) for gpu in gpus]


def child_env(base: dict[str, str], slot: str | None, slots: int, cpus: int) -> dict[str, str]:
    """The environment of a run: pinned to GPU ``slot`` (none: unchanged), unbuffered output,
    and the CPU cores shared among the slots unless OMP_NUM_THREADS is already set."""
    env = dict(base)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // slots)))
    return env


# --- running ----------------------------------------------------------------------------------

class Stopper:
    """SIGINT/SIGTERM: no new run starts; with ``forward`` the running ones get one SIGTERM per
    signal (they save and exit 130), else they get the signal themselves (same process group)."""

    def __init__(self, forward: bool) -> None:
        self.forward, self.requested, self.children = forward, False, []
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        print(f"{signal.Signals(signum).name}: starting no more runs"
              + ("; asking the running ones to save and stop" if self.forward else ""), flush=True)
        if self.forward:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def execute(base: str, runs: list[Run], slots: Sequence[str | None], forward: bool) -> tuple[bool, float, float]:
    """Run ``runs`` over the worker ``slots``, skipping finished ones.

    Returns:
        (interrupted, wall seconds, sum of the runs' seconds).
    """
    pending, free = deque(runs), deque(slots)
    running: dict[subprocess.Popen, tuple[Run, str | None, float, Any]] = {}
    stopper = Stopper(forward)
    start, busy, cpus = time.perf_counter(), 0.0, usable_cpus()
    try:
        while running or (pending and not stopper.requested):
            while pending and free and not stopper.requested:
                run = pending.popleft()
                state = run_state(run)
                if state == "finished":
                    print(f"skip {run.name} (finished)", flush=True)
                    continue
                slot, command = free.popleft(), command_for(run, state)
                log = log_path(base, run)
                log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(log, "a")
                handle.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {state} run: {shlex.join(command)}\n")
                handle.flush()
                child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_env(dict(os.environ), slot, len(slots), cpus),
                                         start_new_session=forward)
                stopper.children.append(child)
                running[child] = (run, slot, time.perf_counter(), handle)
                how = {"new": "new", "interrupted": "--resume", "leftover": "--overwrite"}[state]
                where = "" if slot is None else f", GPU {slot}"
                print(f"start {run.name} ({how}, pid {child.pid}{where}; log {log})", flush=True)
            for child in [c for c in running if c.poll() is not None]:
                run, slot, began, handle = running.pop(child)
                seconds = time.perf_counter() - began
                busy += seconds
                handle.write(f"# exit status {child.returncode} after {seconds:.1f} s\n")
                handle.close()
                free.append(slot)
                old = read_json(record_path(base, run)) or {}
                write_json(record_path(base, run), {
                    "exit_status": child.returncode, "wall_s": round(old.get("wall_s", 0.0) + seconds, 2),
                    "attempts": old.get("attempts", 0) + 1, "log": str(log_path(base, run)),
                    "command": shlex.join(child.args)})
                print(f"{'done' if child.returncode == 0 else 'FAILED'} {run.name}: exit status {child.returncode} "
                      f"after {seconds:.1f} s", flush=True)
            if running:
                time.sleep(0.1)
    finally:
        stopper.restore()
    return stopper.requested, time.perf_counter() - start, busy


# --- summary ----------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict[str, str]]:
    try:
        return read_csv(path)
    except OSError:
        return []


def best_val(rows: list[dict[str, str]]) -> tuple[str, float | None, int | None]:
    """(metric, best val accuracy, its epoch) from a metrics CSV's rows, by column name:
    stage 2's ``select_acc`` on rows with ``select_split == val``, stage 1's ``val_1shot`` (``val_1shot_precise``
    when the run re-estimated its BatchNorm statistics, as its ``_best.t7`` was selected)."""
    if rows and "select_acc" in rows[0]:
        metric = "select_acc"
        rows = [row for row in rows if row.get("select_split") == "val"]
        if not rows:
            return "none (--selectOn test)", None, None
    elif rows and "val_1shot" in rows[0]:
        metric = "val_1shot_precise" if any(to_float(row.get("val_1shot_precise")) is not None for row in rows) \
            else "val_1shot"
    else:
        return "", None, None
    best, epoch = None, None
    for row in rows:
        value = to_float(row.get(metric))
        if value is not None and (best is None or value > best):
            best, epoch = value, int(row["epoch"])
    return metric, best, epoch


def to_float(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def describe(state: str, record: dict[str, Any] | None) -> str:
    """``ok`` for a finished run, else why not."""
    if state == "finished":
        return "ok"
    code = None if record is None else record.get("exit_status")
    resumable = ", resumable" if state == "interrupted" else ""
    if code is None:
        return "interrupted (resumable)" if state == "interrupted" else "not run"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (exit {code}{resumable})"
    if code == 0:
        return "no result file (exit 0)"
    return f"{EXIT_MEANING.get(code, 'failed')} (exit {code}{resumable})"


def collect(base: str, runs: list[Run]) -> list[dict[str, Any]]:
    """One summary row per run: grid values, status, best val accuracy and epoch, test accuracy."""
    rows = []
    for run in runs:
        state, record = run_state(run), read_json(record_path(base, run))
        rows_csv = read_metrics(run.run_dir() / "metrics.csv")
        metric, val, epoch = best_val(rows_csv)
        evaluated = read_json(run.evaluate_file())
        test = None if evaluated is None else to_float(str(evaluated.get("accuracy")))
        rows.append({**run.values, "tensorname": run.name, "status": describe(state, record), "val_metric": metric,
                     "val_acc": val, "val_epoch": epoch, "test_acc": test,
                     "exit_status": None if record is None else record.get("exit_status"),
                     "wall_s": None if record is None else record.get("wall_s"),
                     "log": str(log_path(base, run)) if log_path(base, run).is_file() else None})
    return rows


def pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run with the best val accuracy (first in grid order on ties); never test."""
    best = None
    for row in rows:
        if row["status"] == "ok" and row["val_acc"] is not None and (best is None or row["val_acc"] > best["val_acc"]):
            best = row
    return best


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def settings(rows: list[dict[str, Any]], flags: list[str]) -> list[dict[str, Any]]:
    """Per setting (grid values without ``seed``): finished runs, mean val, mean +- std test."""
    keys = [flag for flag in flags if flag != SEED_FLAG]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    out = []
    for key, members in groups.items():
        done = [row for row in members if row["status"] == "ok"]
        val_mean, val_std = mean_std([row["val_acc"] for row in done if row["val_acc"] is not None])
        test_mean, test_std = mean_std([row["test_acc"] for row in done if row["test_acc"] is not None])
        out.append({**dict(zip(keys, key)), "runs": len(members), "ok": len(done), "val_mean": val_mean,
                    "val_std": val_std, "test_mean": test_mean, "test_std": test_std,
                    "test_n": sum(row["test_acc"] is not None for row in done)})
    return out


def table(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """Aligned columns; accuracies to two decimals."""
    cells = [fields] + [[f"{row[key]:.2f}" if isinstance(row[key], float) else csv_cell(row[key]) for key in fields]
                        for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(fields))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def last_error(log: str | None) -> str:
    """``: <the log's last 'error: ...' line>``, or nothing."""
    try:
        errors = [line for line in Path(log).read_text(errors="replace").splitlines() if line.startswith("error:")]
    except (OSError, TypeError):
        return ""
    return f": {errors[-1]}" if errors else ""


def report(base: str, rows: list[dict[str, Any]], per_setting: list[dict[str, Any]], flags: list[str]) -> str:
    """The printed summary: the runs, the failures, the pick on val, the seed averages."""
    lines = [f"sweep {base}: {len(rows)} run(s), {sum(row['status'] == 'ok' for row in rows)} finished "
             f"({sweep_dir(base) / 'summary.csv'})",
             table(rows, flags + ["tensorname", "status", "val_acc", "val_epoch", "test_acc"])]
    for row in rows:
        if row["status"] not in ("ok", "not run"):
            lines.append(f"not finished: {row['tensorname']}: {row['status']}; log {row['log']}"
                         + last_error(row["log"]))
    on_test = [row["tensorname"] for row in rows if row["val_metric"].startswith("none")]
    if on_test:
        lines.append(f"selected on test (--selectOn test), so no val accuracy and never picked: {', '.join(on_test)}")
    chosen = pick(rows)
    if chosen is not None:
        lines.append(f"picked on val ({chosen['val_metric']}): {chosen['tensorname']}, val {pct(chosen['val_acc'])} % "
                     f"at epoch {chosen['val_epoch']}; its test accuracy {pct(chosen['test_acc'])} % (one run: "
                     "report the seed average below)")
    keys = [flag for flag in flags if flag != SEED_FLAG]
    lines.append("per setting: test accuracy mean +- sample std (ddof=1) over "
                 + ("seeds" if SEED_FLAG in flags else "runs (no seed flag in the grid: one run each)"))
    for group in per_setting:
        label = " ".join(f"{key}={group[key]}" for key in keys) or "all"
        spread = "" if group["test_std"] is None else f" +- {group['test_std']:.2f}"
        lines.append(f"  {label}: test {pct(group['test_mean'])}{spread} % (n={group['test_n']}), "
                     f"val mean {pct(group['val_mean'])} % ({group['ok']}/{group['runs']} finished)")
    scored = [group for group in per_setting if group["val_mean"] is not None]
    if len(scored) > 1 and keys:
        best = max(scored, key=lambda group: group["val_mean"])
        spread = "" if best["test_std"] is None else f" +- {best['test_std']:.2f}"
        lines.append(f"setting picked on mean val: {' '.join(f'{key}={best[key]}' for key in keys)}: "
                     f"test {pct(best['test_mean'])}{spread} % over {best['test_n']} run(s)")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> bool:
    """Val and test accuracy per run as bars (needs matplotlib; False without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [row["tensorname"] for row in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 4))
    for offset, key in ((-0.2, "val_acc"), (0.2, "test_acc")):
        axis.bar([p + offset for p in positions], [row[key] or 0.0 for row in rows], width=0.4, label=key)
    axis.set_xticks(list(positions), [name + (" *" if row is chosen else "") for name, row in zip(names, rows)],
                    rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("accuracy (%)")
    axis.set_title("* picked on val")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def summarize(base: str, runs: list[Run], flags: list[str]) -> list[dict[str, Any]]:
    """Write summary.csv, settings.csv (and summary.png), print the report; return the rows."""
    rows = collect(base, runs)
    per_setting = settings(rows, flags)
    out = sweep_dir(base)
    write_csv(out / "summary.csv", rows, flags + SUMMARY_FIELDS)
    write_csv(out / "settings.csv", per_setting, [flag for flag in flags if flag != SEED_FLAG]
              + ["runs", "ok", "val_mean", "val_std", "test_mean", "test_std", "test_n"])
    print(report(base, rows, per_setting, flags))
    if plot(out / "summary.png", rows, pick(rows)):
        print(f"plot: {out / 'summary.png'}")
    return rows


# --- SLURM ------------------------------------------------------------------------------------

def slurm_script(base: str, runs: list[Run], opts: argparse.Namespace, sweep_argv: list[str],
                 command: list[str]) -> str:
    """An sbatch array script: task K runs ``sweep.py --runIndex K`` (skip if finished, resume if
    interrupted), in the folder the sweep was started from."""
    logs = (Path.cwd() / sweep_dir(base) / "logs").resolve()
    me = str(Path(__file__).resolve())
    array = f"0-{len(runs) - 1}" + (f"%{opts.maxParallel}" if opts.maxParallel else "")
    gres = opts.gres or (f"gpu:{opts.gpusPerTask}" if opts.gpusPerTask else None)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={base}_sweep", f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/slurm_%A_%a.out"]
    for option, value in (("partition", opts.partition), ("gres", gres), ("cpus-per-task", opts.cpusPerTask),
                          ("mem", opts.mem), ("time", opts.time)):
        if value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    lines.append(f"# {len(runs)} grid points; task K runs point K (finished: skipped; interrupted: resumed):")
    lines += [f"#   {run.index}: {run.name}" for run in runs]
    summary = shlex.join([sys.executable, me, *sweep_argv, "--summarize", "--", *command])
    lines += [f"# after the array: {summary}", "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              f'exec {shlex.join([sys.executable, me, *sweep_argv])} --runIndex "$SLURM_ARRAY_TASK_ID" -- '
              f"{shlex.join(command)}"]
    return "\n".join(lines) + "\n"


def submit(base: str, script: str, opts: argparse.Namespace, sweep_argv: list[str], command: list[str]) -> None:
    """Write and submit the array, then a summary job that runs after it (afterany)."""
    out = sweep_dir(base)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "sweep.sbatch"
    path.write_text(script)
    array = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if array.returncode:
        raise RuntimeError(f"sbatch {path}: {array.stderr.strip() or array.stdout.strip()}")
    job = array.stdout.strip().split(";")[0]
    print(f"submitted array job {job} ({path})")
    summary = shlex.join([sys.executable, str(Path(__file__).resolve()), *sweep_argv, "--summarize", "--", *command])
    extra = [f"--partition={opts.partition}"] if opts.partition else []
    follow = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", f"--job-name={base}_summary",
                             f"--output={(out / 'logs').resolve()}/summary_%j.out", *extra,
                             f"--wrap=cd {shlex.quote(str(Path.cwd()))} && {summary}"],
                            capture_output=True, text=True)
    if follow.returncode:
        print(f"summary job not submitted ({follow.stderr.strip()}); when the array is done: {summary}")
    else:
        print(f"submitted summary job {follow.stdout.strip().split(';')[0]} (after the array): "
              f"{out / 'summary.csv'}")


# --- entry point ------------------------------------------------------------------------------

def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check(opts: argparse.Namespace, command: list[str], grid: list[tuple[str, list[str]]]) -> None:
    """Checks that need no run folder; raises OptionError naming the flag."""
    for flag in ("jobs", "perGPU", "gpusPerTask", "cpusPerTask", "maxParallel"):
        if getattr(opts, flag) is not None and getattr(opts, flag) < 1:
            raise OptionError(f"--{flag} must be at least 1, got {getattr(opts, flag)}")
    if opts.jobs is not None and opts.perGPU is not None:
        raise OptionError("--jobs and --perGPU: give one (--jobs N on the CPU, --perGPU K per visible GPU)")
    slurm_only = [f"--{flag}" for flag in ("partition", "gpusPerTask", "gres", "cpusPerTask", "mem", "time",
                                           "maxParallel", "dryRun") if getattr(opts, flag) not in (None, False)]
    if slurm_only and not opts.slurm:
        raise OptionError(f"{slurm_only[0]} is for --slurm only")
    if opts.slurm and (opts.jobs or opts.perGPU or opts.runIndex is not None or opts.summarize):
        raise OptionError("--slurm: --jobs, --perGPU, --runIndex and --summarize do not apply")
    if opts.gres and opts.gpusPerTask:
        raise OptionError("--gres and --gpusPerTask: give one")
    if opts.runIndex is not None and (opts.summarize or opts.jobs or opts.perGPU):
        raise OptionError("--runIndex runs one grid point: --summarize, --jobs and --perGPU do not apply")
    runs_of = math.prod(len(values) for _, values in grid)
    if opts.runIndex is not None and not 0 <= opts.runIndex < runs_of:
        raise OptionError(f"--runIndex {opts.runIndex}: the grid has points 0 to {runs_of - 1}")
    if opts.slurm and not opts.dryRun and shutil.which("sbatch") is None:
        raise OptionError("--slurm: sbatch not found on this machine (use --dryRun to print the script)")
    if not command:
        raise OptionError("missing '-- SCRIPT ARGS...' (the stage-1 or stage-2 command line to sweep)")
    if not command[0].endswith(".py") or not Path(command[0]).is_file():
        raise OptionError(f"SCRIPT {command[0]!r}: no such Python file (give its path, e.g. onlyBasetwoLoss.py)")
    args = command[1:]
    name = flag_value(args, "--tensorname")
    if not name:
        raise OptionError("--tensorname: the script's command line after -- needs --tensorname NAME")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise OptionError(f"--tensorname {name!r}: use letters, digits and . _ + - only")
    for flag in ("--resume", "--overwrite"):
        if flag in args:
            raise OptionError(f"{flag} in the script's command line: the sweep decides it run by run")
    devices = [flag_value(args, "--device")] + [value for flag, values in grid if flag == "device" for value in values]
    pinned = [device for device in devices if device and re.fullmatch(r"cuda:\d+", device)]
    if pinned and (opts.perGPU or opts.slurm):
        raise OptionError(f"--device {pinned[0]} in the swept command: each run sees only its own GPU(s) "
                          f"({'--perGPU' if opts.perGPU else '--slurm'}), so give --device cuda or none")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sweep_argv, command = split_command(argv)
    try:
        opts = get_parser().parse_args(sweep_argv)
        grid = parse_grid(opts.grid)
        check(opts, command, grid)
        runs = expand(command, grid)
        base = flag_value(command[1:], "--tensorname")
        slots: Sequence[str | None] = [None] * (opts.jobs or 1)
        if opts.perGPU:
            gpus = visible_gpus()
            if not gpus:
                raise OptionError("--perGPU: no GPU visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L)")
            slots = gpu_slots(gpus, opts.perGPU)
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flags = [flag for flag, _ in grid]
    grid_argv = [f"--grid={spec}" for spec in opts.grid]
    if opts.slurm:
        script = slurm_script(base, runs, opts, grid_argv, command)
        if opts.dryRun:
            print(script, end="")
            return 0
        try:
            submit(base, script, opts, grid_argv, command)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if opts.summarize:
        return 0 if all(row["status"] == "ok" for row in summarize(base, runs, flags)) else 1
    if opts.runIndex is not None:  # one SLURM array task: the summary job summarises
        interrupted, _, _ = execute(base, [runs[opts.runIndex]], slots, forward=False)
        return INTERRUPTED if interrupted else 0 if run_state(runs[opts.runIndex]) == "finished" else 1
    interrupted, wall, busy = execute(base, runs, slots, forward=True)
    summarize(base, runs, flags)
    if busy:
        print(f"wall time {wall:.1f} s; the runs started here took {busy:.1f} s in all "
              f"({busy / wall:.2f} x the wall time, {len(slots)} slot(s))")
    if interrupted:
        return INTERRUPTED
    return 0 if all(run_state(run) == "finished" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
