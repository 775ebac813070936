"""Experiments over the training scripts: a run launched as a process (its log, environment, process group,
timeout, output echoed as it comes), a sweep's runs packed onto GPU or CPU slots, the state of a run folder, a result
reused when its recorded settings match, what a run wrote read back, the variants compared (flags, code
revisions) and the numbers over seeds. No torch: the sweep starts runs without loading it."""
from __future__ import annotations

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
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

from utils.cpus import usable_cpus
from utils.errors import OptionError
from utils.files import RUNS_DIR, write_json
from utils.metrics import mean_t_ci95

REPO = Path(__file__).resolve().parent.parent


# --- one run ------------------------------------------------------------------------------------

class Launch:
    """``command`` started in the background, its output (stdout and stderr) appended to ``log`` after a
    header line (the time and the command), then a footer (exit status, seconds) by :meth:`close`;
    ``group``: in a process group of its own, which a terminal's Ctrl-C does not reach."""

    def __init__(self, command: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
                 group: bool = False) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.start, self.handle = log, time.perf_counter(), open(log, "a")
        self.handle.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} run: {shlex.join(command)}\n")
        self.handle.flush()
        self.offset = self.handle.tell()  # where the run's own output begins
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=group)

    def close(self) -> float:
        """Once the run has ended: the footer written, the log closed; the run's ``seconds``."""
        self.seconds = time.perf_counter() - self.start
        with open(self.log, "rb") as output:  # the footer on a line of its own
            output.seek(-1, os.SEEK_END)
            newline = "" if output.read() == b"\n" else "\n"
        self.handle.write(f"{newline}# exit status {self.process.returncode} after {self.seconds:.1f} s\n")
        self.handle.close()
        return self.seconds

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM to the run's process group, SIGKILL after ``grace`` seconds."""
        with suppress(ProcessLookupError):  # the group is gone
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run(command: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, echo: str | None = None,
        stop_at: re.Pattern | None = None) -> tuple[int | None, float, str]:
    """``(exit status, None when it timed out; seconds; output)`` of ``command`` run to its end
    (:class:`Launch`), each line of its output also printed after the prefix ``echo`` when given; SIGTERM to
    its process group once the output matches ``stop_at``, and past ``timeout`` seconds."""
    launch = Launch(command, log, cwd, env, group=timeout is not None or stop_at is not None)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    output, shown = "", 0
    with open(log, errors="replace") as reader:
        reader.seek(launch.offset)
        while True:
            status = launch.process.poll()
            output += reader.read()  # what the run wrote so far (all of it once it has ended)
            if echo is not None:
                end = len(output) if status is not None else output.rfind("\n") + 1
                for line in output[shown:end].splitlines():
                    print(f"{echo}{line}", flush=True)
                shown = max(shown, end)
            if status is not None:
                break
            if stop_at is not None and stop_at.search(output):
                os.killpg(launch.process.pid, signal.SIGTERM)
                stop_at = None
            if time.monotonic() > deadline:
                launch.stop()
                output += f"\n(timed out after {timeout:.0f} s)"
                break
            time.sleep(0.1)
    return status, launch.close(), output


def run_checked(command: list[str], log: Path, cwd: Path | None = None) -> float:
    """The seconds of ``command`` run to its end (:func:`run`); RuntimeError with the log's end if it fails."""
    status, seconds, _ = run(command, log, cwd)
    if status:
        last = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(command[1]).name} exited with {status} (log {log}):\n" + "\n".join(last))
    return seconds


# --- a sweep's runs, packed onto slots ---------------------------------------------------------------

@dataclass
class GridPoint:
    """A grid point of a sweep (``scripts/sweep.py``): its name, its grid values and the script's command line for
    it; its sweep's folder (its log and status record there)."""

    name: str
    values: dict[str, str]
    script: str
    args: list[str]
    sweep: Path

    def run_dir(self) -> Path:
        return RUNS_DIR / self.name

    def evaluate_file(self) -> Path:
        shots, seed = (flag_value(self.args, flag) for flag in ("--shots", "--seed"))
        return evaluate_path(self.run_dir(), shots or "1", seed or "0")

    def state(self) -> str:
        """``finished`` (stage 1's summary.json or stage 2's evaluate JSON, newer than any resume.pt),
        ``interrupted`` (resume.pt), ``leftover`` (a folder with neither) or ``new``."""
        folder, resume = self.run_dir(), self.run_dir() / "resume.pt"
        done = [path.stat().st_mtime_ns for path in (folder / "summary.json", self.evaluate_file()) if path.is_file()]
        if done and (not resume.is_file() or max(done) >= resume.stat().st_mtime_ns):
            return "finished"
        if resume.is_file():
            return "interrupted"
        return "leftover" if folder.is_dir() and any(folder.iterdir()) else "new"

    def log(self) -> Path:
        return self.sweep / "logs" / f"{self.name}.log"

    def status_path(self) -> Path:
        return self.sweep / "status" / f"{self.name}.json"


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``), or None."""
    values = [after if arg == flag else arg[len(flag) + 1:] for arg, after in zip(args, [*args[1:], None])
              if arg == flag and after is not None or arg.startswith(flag + "=")]
    return values[-1] if values else None


def parse_gpus(cuda_visible: str | None, smi_listing: str | None) -> list[str]:
    """Visible GPU ids: from CUDA_VISIBLE_DEVICES when set (up to an invalid ``-1``), else one per
    ``GPU N:`` line of ``nvidia-smi -L``."""
    if cuda_visible is not None:
        return list(takewhile(lambda item: item and not item.startswith("-"),
                              (part.strip() for part in cuda_visible.split(","))))
    return [str(i) for i, _ in enumerate(line for line in (smi_listing or "").splitlines() if line.startswith("GPU "))]


def visible_gpus() -> list[str]:
    listing = None
    if "CUDA_VISIBLE_DEVICES" not in os.environ and shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listing = None
    return parse_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), listing)


def child_env(base: dict[str, str], slot: str | None, slots: int, cpus: int) -> dict[str, str]:
    """The environment of a run: pinned to GPU ``slot`` (None: unchanged), unbuffered output, and the
    ``cpus`` CPU cores shared among the ``slots`` unless OMP_NUM_THREADS is already set."""
    env = {**base, "PYTHONUNBUFFERED": "1"}
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // slots)))
    return env


def pack(runs: Iterable[GridPoint], slots: Sequence[str | None], forward: bool) -> tuple[bool, float, float]:
    """``(interrupted, wall seconds, sum of the runs' seconds)`` of ``runs`` over the worker ``slots``, one at
    a time on each: a finished run skipped, an interrupted one resumed (``--resume``), a leftover folder
    restarted (``--overwrite``); each attempt appended to the run's log and counted in its status record.
    SIGINT or SIGTERM: no run starts any more; with ``forward`` the running ones get one SIGTERM per signal
    (they save and exit 130), else they get the signal themselves (same process group)."""
    pending, free, running, stops, cpus = deque(runs), deque(slots), {}, [], usable_cpus()

    def stop(signum: int, frame: object) -> None:
        stops.append(signum)
        print(f"{signal.Signals(signum).name}: starting no more runs"
              + ("; asking the running ones to save and stop" if forward else ""), flush=True)
        for launch in list(running) if forward else []:
            if launch.process.poll() is None:
                launch.process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    begin, busy = time.perf_counter(), 0.0
    try:
        while running or (pending and not stops):
            while pending and free and not stops:
                run, slot = pending.popleft(), free[0]
                state = run.state()
                if state == "finished":
                    print(f"skip {run.name} (finished)", flush=True)
                    continue
                how = {"new": "new", "interrupted": "--resume", "leftover": "--overwrite"}[state]
                env = child_env(dict(os.environ), slot, len(slots), cpus)
                launch = Launch([sys.executable, run.script, *run.args, *([] if how == "new" else [how])], run.log(),
                                env=env, group=forward)
                running[launch] = run, free.popleft()
                where = "" if slot is None else f", GPU {slot}"
                print(f"start {run.name} ({how}, pid {launch.process.pid}{where}; log {run.log()})", flush=True)
            for launch in [launch for launch in running if launch.process.poll() is not None]:
                run, slot = running.pop(launch)
                busy += launch.close()
                free.append(slot)
                status, old = launch.process.returncode, read_json(run.status_path()) or {}
                write_json(run.status_path(), {"exit_status": status, "attempts": old.get("attempts", 0) + 1,
                                               "wall_s": round(old.get("wall_s", 0.0) + launch.seconds, 2),
                                               "log": str(run.log()), "command": shlex.join(launch.process.args)})
                print(f"{'done' if status == 0 else 'FAILED'} {run.name}: exit status {status} after "
                      f"{launch.seconds:.1f} s", flush=True)
            if running:
                time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return bool(stops), time.perf_counter() - begin, busy


# --- what a run left ----------------------------------------------------------------------------

def evaluate_path(run_dir: Path, shots: int | str, seed: int | str, suffix: str = "") -> Path:
    """Stage 2's test report (``--testWeights last``: ``suffix`` ``_last``), written once training or
    ``--evaluate`` has finished."""
    return run_dir / f"evaluate_{shots}shot_seed{seed}{suffix}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def recorded(path: Path, settings: dict) -> dict | None:
    """The record saved at ``path`` when it was made with ``settings``, else None."""
    saved = read_json(path)
    return saved if saved is not None and saved.get("settings") == settings else None


# --- variants and their code ----------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A named way to run both stages: extra flags for each, and the code tree the scripts come from."""
    name: str
    revision: str | None
    stage1_flags: tuple[str, ...]
    stage2_flags: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """``NAME[@REV]:FLAGS`` (FLAGS for both stages) or ``NAME[@REV]:FLAGS1 // FLAGS2``."""
    head, sep, flags = text.partition(":")
    name, _, revision = head.partition("@")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise OptionError(f"--variant {text!r}: expected NAME[@REVISION]:FLAGS, NAME of letters, digits, - and _")
    first, split, second = flags.partition(" // ")
    stage1 = tuple(shlex.split(first))
    return Variant(name, revision or None, stage1, tuple(shlex.split(second)) if split else stage1)


def code_tree(revision: str | None, workdir: Path) -> tuple[Path, str]:
    """``(folder holding the scripts, commit)``: this checkout, or ``revision`` exported (``git archive``)
    into ``workdir/code/<commit>``."""
    def git(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False, **kwargs)

    head = git("rev-parse", "HEAD", text=True).stdout.strip() or "unknown"
    if revision is None:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", text=True).stdout.strip())
        return REPO, head + ("+uncommitted" if dirty else "")
    found = git("rev-parse", "--verify", f"{revision}^{{commit}}", text=True)
    if found.returncode:
        raise OptionError(f"--variant ...@{revision}: not a commit of {REPO}")
    commit = found.stdout.strip()
    tree = workdir / "code" / commit
    if not (tree / "classification.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=git("archive", commit).stdout, check=True)
    return tree, commit


# --- numbers over seeds ---------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def over_seeds(values: list[float]) -> dict:
    """Mean, sample standard deviation and 95 % t half-interval over a few seeds' values (None, nan for one
    value), the values, and whether the interval leaves out 0 (``exceeds_noise``; None for one value)."""
    mean, half = mean_t_ci95(values)
    return {"mean": mean, "std": mean_std(values)[1], "half_width_95": half, "values": values,
            "exceeds_noise": bool(abs(mean) > half) if len(values) > 1 else None}


def compare(numbers: dict[tuple[str, int], dict[str, float]], names: list[str], seeds: list[int],
            metrics: list[str], paired: list[str]) -> dict:
    """``numbers[name, seed][metric]`` over the seeds: per variant and metric :func:`over_seeds`; per variant
    after the first and ``paired`` metric, the same of its seed-by-seed difference from the first."""
    return {"variants": {n: {m: over_seeds([numbers[n, s][m] for s in seeds]) for m in metrics} for n in names},
            "differences": {n: {m: over_seeds([numbers[n, s][m] - numbers[names[0], s][m] for s in seeds])
                                for m in paired} for n in names[1:]}}
