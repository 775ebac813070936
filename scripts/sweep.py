"""Several runs as one experiment: a grid of flag values over a training script, run on the CPU,
on the visible GPUs or as a SLURM array; resumable; picked on val and reported over seeds.

    python -m scripts.sweep --grid seed=0,1,2 --grid LR=0.001,0.0005 --perGPU 2 -- \\
        onlyBasetwoLoss.py --dataroot data/miniImageNet --network softRandom --tensorname metaNet

Each grid point is the script's command line with ``--FLAG value`` for each grid flag and
``--tensorname NAME_<flag><value>...``. Outputs: ``runs/NAME_sweep/`` (``logs/<run>.log``,
``status/<run>.json``, ``summary.csv``, ``settings.csv``, ``summary.png`` with matplotlib).
Exit status: 0 every run finished, 1 some did not, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __spec__ is None:  # started as a file: the repository's packages import only under python -m
    sys.stderr.write(f"{sys.argv[0]}: run it from the repository root as python -m scripts.sweep\n")
    sys.exit(2)

from engine import experiments
from engine.experiments import GridPoint, flag_value
from utils.errors import OptionError
from utils.files import RUNS_DIR, csv_cell, read_csv, write_csv
from utils.interrupt import INTERRUPTED_EXIT as INTERRUPTED

SEED_FLAG = "seed"
RESERVED = ("tensorname", "resume", "overwrite")
EXIT_MEANING = {2: "bad input", 3: "diverged", INTERRUPTED: "interrupted"}
SUMMARY_FIELDS = ["tensorname", "status", "val_metric", "val_acc", "val_epoch", "test_acc", "exit_status", "wall_s",
                  "log"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise OptionError(message)


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


def sweep_dir(base: str) -> Path:
    return RUNS_DIR / f"{base}_sweep"


def name_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", value)


def expand(command: list[str], grid: list[tuple[str, list[str]]]) -> list[GridPoint]:
    """The grid's runs in product order (first --grid slowest), each with its own command line."""
    script, args = command[0], command[1:]
    base = flag_value(args, "--tensorname")
    args = without_flag(args, "--tensorname")
    for flag, _ in grid:
        args = without_flag(args, f"--{flag}")
    flags = [flag for flag, _ in grid]
    runs = []
    for combo in itertools.product(*(values for _, values in grid)):
        values = dict(zip(flags, combo))
        name = base + "".join(f"_{flag}{name_part(value)}" for flag, value in values.items())
        run_args = args + [item for flag, value in values.items() for item in (f"--{flag}", value)]
        runs.append(GridPoint(name, values, script, run_args + ["--tensorname", name], sweep_dir(base)))
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise OptionError("--grid: two values give the same run name (only letters, digits and . + - are kept)")
    return runs


# --- summary ----------------------------------------------------------------------------------

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
        precise = any(to_float(row.get("val_1shot_precise")) is not None for row in rows)
        metric = "val_1shot_precise" if precise else "val_1shot"
    else:
        return "", None, None
    scored = [(to_float(row.get(metric)), int(row["epoch"])) for row in rows]
    best = max((pair for pair in scored if pair[0] is not None), key=lambda pair: pair[0], default=(None, None))
    return metric, *best


def to_float(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def describe(state: str, record: dict[str, Any] | None) -> str:
    """``ok`` for a finished run, else why not."""
    code = None if record is None else record.get("exit_status")
    resumable = ", resumable" if state == "interrupted" else ""
    if state == "finished":
        return "ok"
    if code is None:
        return "interrupted (resumable)" if state == "interrupted" else "not run"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (exit {code}{resumable})"
    return "no result file (exit 0)" if code == 0 else f"{EXIT_MEANING.get(code, 'failed')} (exit {code}{resumable})"


def collect(runs: list[GridPoint]) -> list[dict[str, Any]]:
    """One summary row per run: grid values, status, best val accuracy and epoch, test accuracy."""
    rows = []
    for run in runs:
        record = experiments.read_json(run.status_path()) or {}
        metrics = run.run_dir() / "metrics.csv"
        metric, val, epoch = best_val(read_csv(metrics) if metrics.is_file() else [])
        test = to_float(str((experiments.read_json(run.evaluate_file()) or {}).get("accuracy")))
        rows.append({**run.values, "tensorname": run.name, "status": describe(run.state(), record or None),
                     "val_metric": metric, "val_acc": val, "val_epoch": epoch, "test_acc": test,
                     "exit_status": record.get("exit_status"), "wall_s": record.get("wall_s"),
                     "log": str(run.log()) if run.log().is_file() else None})
    return rows


def pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run with the best val accuracy (first in grid order on ties); never test."""
    return max((row for row in rows if row["status"] == "ok" and row["val_acc"] is not None),
               key=lambda row: row["val_acc"], default=None)


def settings(rows: list[dict[str, Any]], flags: list[str]) -> list[dict[str, Any]]:
    """Per setting (grid values without ``seed``): finished runs, mean val, mean +- std test."""
    keys = [flag for flag in flags if flag != SEED_FLAG]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    out = []
    for key, members in groups.items():
        done = [row for row in members if row["status"] == "ok"]
        val_mean, val_std = experiments.mean_std([row["val_acc"] for row in done if row["val_acc"] is not None])
        tests = [row["test_acc"] for row in done if row["test_acc"] is not None]
        test_mean, test_std = experiments.mean_std(tests)
        out.append({**dict(zip(keys, key)), "runs": len(members), "ok": len(done), "val_mean": val_mean,
                    "val_std": val_std, "test_mean": test_mean, "test_std": test_std, "test_n": len(tests)})
    return out


def table(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """Aligned columns; accuracies to two decimals."""
    cells = [fields] + [[f"{row[key]:.2f}" if isinstance(row[key], float) else csv_cell(row[key]) for key in fields]
                        for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(fields))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells)


def pct(value: float | None, std: float | None = None) -> str:
    """``value`` to two decimals (``-``: none), ``+- std`` when given."""
    return ("-" if value is None else f"{value:.2f}") + ("" if std is None else f" +- {std:.2f}")


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
    lines += [f"not finished: {row['tensorname']}: {row['status']}; log {row['log']}" + last_error(row["log"])
              for row in rows if row["status"] not in ("ok", "not run")]
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
        lines.append(f"  {' '.join(f'{key}={group[key]}' for key in keys) or 'all'}: test "
                     f"{pct(group['test_mean'], group['test_std'])} % (n={group['test_n']}), "
                     f"val mean {pct(group['val_mean'])} % ({group['ok']}/{group['runs']} finished)")
    scored = [group for group in per_setting if group["val_mean"] is not None]
    if len(scored) > 1 and keys:
        best = max(scored, key=lambda group: group["val_mean"])
        lines.append(f"setting picked on mean val: {' '.join(f'{key}={best[key]}' for key in keys)}: "
                     f"test {pct(best['test_mean'], best['test_std'])} % over {best['test_n']} run(s)")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> bool:
    """Val and test accuracy per run as bars (needs matplotlib; False without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 4))
    for offset, key in ((-0.2, "val_acc"), (0.2, "test_acc")):
        axis.bar([p + offset for p in positions], [row[key] or 0.0 for row in rows], width=0.4, label=key)
    axis.set_xticks(list(positions), [row["tensorname"] + (" *" if row is chosen else "") for row in rows],
                    rotation=60, ha="right", fontsize=7)
    axis.set(ylabel="accuracy (%)", title="* picked on val")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def summarize(base: str, runs: list[GridPoint], flags: list[str]) -> list[dict[str, Any]]:
    """Write summary.csv, settings.csv (and summary.png), print the report; return the rows."""
    rows = collect(runs)
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

def sweep_command(sweep_argv: list[str], *more: str) -> str:
    """This sweep run again from any folder (``python -m scripts.sweep`` with the repository on PYTHONPATH)
    with the flags ``more``: ``--summarize -- COMMAND``, the SLURM summary job's, or an array task's."""
    return shlex.join(["env", f"PYTHONPATH={experiments.REPO}", sys.executable, "-m", "scripts.sweep", *sweep_argv,
                       *more])


def slurm_script(base: str, runs: list[GridPoint], opts: argparse.Namespace, sweep_argv: list[str],
                 command: list[str]) -> str:
    """An sbatch array script: task K runs ``sweep.py --runIndex K`` (skip if finished, resume if
    interrupted), in the folder the sweep was started from."""
    logs = (Path.cwd() / sweep_dir(base) / "logs").resolve()
    array = f"0-{len(runs) - 1}" + (f"%{opts.maxParallel}" if opts.maxParallel else "")
    gres = opts.gres or (f"gpu:{opts.gpusPerTask}" if opts.gpusPerTask else None)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={base}_sweep", f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/slurm_%A_%a.out"]
    lines += [f"#SBATCH --{option}={value}" for option, value in (
        ("partition", opts.partition), ("gres", gres), ("cpus-per-task", opts.cpusPerTask), ("mem", opts.mem),
        ("time", opts.time)) if value is not None]
    lines.append(f"# {len(runs)} grid points; task K runs point K (finished: skipped; interrupted: resumed):")
    lines += [f"#   {index}: {run.name}" for index, run in enumerate(runs)]
    lines += [f"# after the array: {sweep_command(sweep_argv, '--summarize', '--', *command)}", "set -euo pipefail",
              f"cd {shlex.quote(str(Path.cwd()))}",
              f'exec {sweep_command(sweep_argv)} --runIndex "$SLURM_ARRAY_TASK_ID" -- {shlex.join(command)}']
    return "\n".join(lines) + "\n"


def submit(base: str, script: str, opts: argparse.Namespace, sweep_argv: list[str], command: list[str]) -> int:
    """Write and submit the array, then a summary job that runs after it (afterany); the exit status."""
    out = sweep_dir(base)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "sweep.sbatch"
    path.write_text(script)
    array = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if array.returncode:
        print(f"error: sbatch {path}: {array.stderr.strip() or array.stdout.strip()}", file=sys.stderr)
        return 1
    job = array.stdout.strip().split(";")[0]
    print(f"submitted array job {job} ({path})")
    summary = sweep_command(sweep_argv, "--summarize", "--", *command)
    extra = [f"--partition={opts.partition}"] if opts.partition else []
    follow = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", f"--job-name={base}_summary",
                             f"--output={(out / 'logs').resolve()}/summary_%j.out", *extra,
                             f"--wrap=cd {shlex.quote(str(Path.cwd()))} && {summary}"], capture_output=True, text=True)
    if follow.returncode:
        print(f"summary job not submitted ({follow.stderr.strip()}); when the array is done: {summary}")
    else:
        print(f"submitted summary job {follow.stdout.strip().split(';')[0]} (after the array): {out / 'summary.csv'}")
    return 0


# --- entry point ------------------------------------------------------------------------------

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
    sweep_argv, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        opts = get_parser().parse_args(sweep_argv)
        grid = parse_grid(opts.grid)
        check(opts, command, grid)
        runs = expand(command, grid)
        slots: Sequence[str | None] = [None] * (opts.jobs or 1)
        if opts.perGPU:
            gpus = experiments.visible_gpus()
            slots = [gpu for _ in range(opts.perGPU) for gpu in gpus]  # spread over the GPUs first, then shared
            if not slots:
                raise OptionError("--perGPU: no GPU visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L)")
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base, flags = flag_value(command[1:], "--tensorname"), [flag for flag, _ in grid]
    grid_argv = [f"--grid={spec}" for spec in opts.grid]
    if opts.slurm:
        script = slurm_script(base, runs, opts, grid_argv, command)
        if opts.dryRun:
            print(script, end="")
            return 0
        return submit(base, script, opts, grid_argv, command)
    if opts.summarize:
        return 0 if all(row["status"] == "ok" for row in summarize(base, runs, flags)) else 1
    if opts.runIndex is not None:  # one SLURM array task: the summary job summarises
        interrupted, _, _ = experiments.pack([runs[opts.runIndex]], slots, forward=False)
        return INTERRUPTED if interrupted else 0 if runs[opts.runIndex].state() == "finished" else 1
    interrupted, wall, busy = experiments.pack(runs, slots, forward=True)
    summarize(base, runs, flags)
    if busy:
        print(f"wall time {wall:.1f} s; the runs started here took {busy:.1f} s in all "
              f"({busy / wall:.2f} x the wall time, {len(slots)} slot(s))")
    return INTERRUPTED if interrupted else 0 if all(run.state() == "finished" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
