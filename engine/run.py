"""A training run's folder ``runs/<name>/``, lock, resumable state, interruption and metrics log (both stages)."""
from __future__ import annotations

import atexit
import csv
import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.options import TrainConfig
from utils.checkpoint import atomic_save, safe_load
from utils.distributed import DistInfo, raise_together
from utils.errors import OptionError, TrainingDiverged
from utils.files import RUNS_DIR, read_csv, write_json
from utils.forward import load_scaler_state
from utils.interrupt import INTERRUPTED_EXIT, GracefulInterrupt

LOCK_FILE = ".lock"  # in the run folder: "<pid> <host>" of the process training the run

def open_run(config: TrainConfig, resume_keys: tuple[str, ...],
             runs_dir: Path = RUNS_DIR) -> tuple[Path, dict[str, Any] | None]:
    """The run folder ``runs/<tensorname>`` and, with ``--resume``, its saved state; writes nothing. Raises
    OptionError for a held folder without ``--resume``/``--overwrite``, a missing state, or other ``resume_keys``."""
    run_dir, state_path = runs_dir / config.tensorname, runs_dir / config.tensorname / "resume.pt"
    held = run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if held and not (config.resume or config.overwrite):
        raise OptionError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start anew")
    if not config.resume:
        return run_dir, None
    if not state_path.is_file():
        raise OptionError(f"--resume: no resumable state {state_path}")
    state = safe_load(state_path)
    saved = state["args"]
    conflicts = [f"--{k} {saved[k] if k in saved else 'unrecorded (an earlier version wrote it)'} (saved) vs "
                 f"{getattr(config, k, None)} (now)" for k in resume_keys if saved.get(k) != getattr(config, k, None)]
    if conflicts:
        raise OptionError("--resume with incompatible arguments: " + "; ".join(conflicts))
    return run_dir, state


def format_row(row: dict[str, Any]) -> str:
    """``epoch E: name value, ...`` (floats to 4 significant digits, empty columns left out)."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                      if k != "epoch" and v is not None and v != "")
    return f"epoch {row['epoch']}: {shown}"


class MetricsLog:
    """One ``metrics.csv`` row per epoch, mirrored to TensorBoard when the package is installed."""

    def __init__(self, run_dir: Path, fields: list[str], keep_rows: int = 0) -> None:
        self.path, self.fields = run_dir / "metrics.csv", fields
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = read_csv(self.path)[:keep_rows] if keep_rows and self.path.is_file() else []
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.rows = len(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            SummaryWriter = None
        self.board = None if SummaryWriter is None else SummaryWriter(str(run_dir))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += 1
        if self.board is not None:
            step = int(row.get("epoch", self.rows))
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.board.add_scalar(key, value, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def lock_run(run_dir: Path):
    """Hold ``run_dir/.lock`` (a ``flock`` the kernel releases however the process ends; ``<pid> <host>``) so no
    second process trains the run; a dead holder's is taken over. Raises OptionError naming a live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    handle.seek(0)
    holder = handle.read().split()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        pid, host = holder if len(holder) == 2 else ("unknown", "unknown")
        raise OptionError(f"{run_dir} is in use by process {pid} on {host}; wait for it to end or choose "
                          "another --tensorname") from None
    if len(holder) == 2:
        print(f"taking over the lock of {run_dir} from process {holder[0]} on {holder[1]}, which is gone", flush=True)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {socket.gethostname()}\n")
    handle.flush()
    atexit.register(release_run, handle)
    return handle


def release_run(handle) -> None:
    """Empty the lock file (a clean end leaves no holder) and release it."""
    if not handle.closed:
        handle.truncate(0)
        handle.close()


def lock_together(run_dir: Path, info: DistInfo):
    """The main process's :func:`lock_run` handle (None elsewhere); a refusal is raised by every process."""
    handle, refusal = None, None
    if info.is_main:
        try:
            handle = lock_run(run_dir)
        except OptionError as error:
            refusal = error
    raise_together(refusal, info)
    return handle


@contextmanager
def run_lock(run_dir: Path, info: DistInfo = DistInfo()) -> Iterator[None]:
    """Hold ``run_dir``'s lock for a ``with`` block (:func:`lock_together`)."""
    handle = lock_together(run_dir, info)
    try:
        yield
    finally:
        if handle is not None:
            release_run(handle)


class Run:
    """One run of a training script, what both scripts' loops share.

    The constructor checks the folder and loads a ``--resume``d state (``resumed``; a larger ``--numEpochs``
    extends the run, a smaller one is refused), writing nothing; :meth:`restore` comes next, then :meth:`start`
    takes the lock and writes (the main process only). As a context manager it catches the first SIGINT/SIGTERM
    (``interrupted``; a second raises StopNow) and names the last good ``checkpoint`` in a divergence error."""

    def __init__(self, config: TrainConfig, resume_keys: tuple[str, ...], fields: list[str], checkpoint: Path,
                 info: DistInfo = DistInfo()) -> None:
        self.dir, self.resumed = open_run(config, resume_keys)
        if self.resumed is not None and self.resumed["epoch"] > config.numEpochs:
            raise OptionError(f"--numEpochs {config.numEpochs} is fewer than the {self.resumed['epoch']} epochs "
                              f"{self.dir} has already trained")
        self.args, self.fields, self.checkpoint, self.info = asdict(config), fields, checkpoint, info
        self.is_main, self.state_path = info.is_main, self.dir / "resume.pt"  # the main process writes the files
        self.log_file: MetricsLog | None = None
        self.record: dict[str, Any] = {}
        self._objects: dict[str, Any] = {}
        self._interrupt, self._saved, self._lock = GracefulInterrupt(), False, None

    def start(self) -> None:
        """Take the lock, empty a new run's folder, write args.json and metrics.csv (the resumed rows kept)."""
        self._lock = lock_together(self.dir, self.info)
        if self.is_main:
            if not self.resumed and self.dir.exists():  # a new run (--overwrite): all but the lock goes
                for path in self.dir.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.name != LOCK_FILE:
                        path.unlink()
            write_json(self.dir / "args.json", self.args)
            self.log_file = MetricsLog(self.dir, self.fields, keep_rows=self.record["rows"])

    def restore(self, model: nn.Module, objects: dict[str, Any], progress: dict, record: dict,
                unit: str) -> tuple[int, dict]:
        """Load a resumed state into ``model`` and ``objects`` (by key: what :meth:`save_state` saves) and
        :attr:`record` (the bests :meth:`keep_best` keeps and the metrics.csv ``rows``, for a new run ``record``);
        returns its ``(epoch, progress)``, for a new run ``(0, progress)``. ``unit``: a step's name."""
        self._objects, self.record = objects, {**record, "rows": 0}
        if self.resumed is None:
            return 0, progress
        model.load_state_dict(self.resumed["model"])
        for key, obj in objects.items():
            if isinstance(obj, torch.amp.GradScaler):
                load_scaler_state(obj, self.resumed.get(key))
            else:
                obj.load_state_dict(self.resumed[key])
        epoch, progress, self.record = self.resumed["epoch"], self.resumed["progress"], self.resumed["record"]
        if self.is_main:
            print(f"resuming {self.args['tensorname']} at epoch {epoch}, {unit} {progress['step']}")
        return epoch, progress

    def save_state(self, epoch: int, progress: dict, model_state: dict[str, torch.Tensor], **extra: Any) -> None:
        """Write the resumable state atomically: the restored objects' ``state_dict()`` by key, :attr:`record`."""
        if self.is_main:
            atomic_save({"model": model_state, **{key: obj.state_dict() for key, obj in self._objects.items()},
                         "epoch": epoch, "progress": progress, "record": self.record, **extra, "args": self.args},
                        self.state_path)
        self._saved = True

    def keep_best(self, key: str, value: float, weights: Callable[[], dict], path: Path, lowest: bool = False) -> None:
        """Note ``value`` and save ``weights()`` to ``path`` when it beats ``record[key]`` (lower with ``lowest``)."""
        best = self.record[key]
        if best is None or (value < best if lowest else value > best):
            self.record[key] = value
            if self.is_main:
                atomic_save(weights(), path)

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.csv (counted in ``record["rows"]``)."""
        if self.is_main:
            self.log_file.log(row)
            self.record["rows"] = self.log_file.rows

    def announce(self, row: dict[str, Any]) -> None:
        """Print the epoch line, once its row and the resumable state are written."""
        if self.is_main:
            print(format_row(row), flush=True)

    @property
    def interrupted(self) -> bool:
        """True once SIGINT or SIGTERM arrived."""
        return self._interrupt.requested

    def stop(self, where: str) -> int:
        """Say where the run stopped and how to continue it; the exit status of an interrupted run."""
        if self.is_main:
            how = "continue with --resume" if self.resumed is not None or self._saved else \
                "nothing was saved yet: run the same command again"
            print(f"stopped {where}; {how}", flush=True)
        return INTERRUPTED_EXIT

    def __enter__(self) -> "Run":
        self._interrupt.__enter__()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._interrupt.__exit__()
        if self.log_file is not None:
            self.log_file.close()
        if self._lock is not None:  # the run is over: a later run in this process may take it
            release_run(self._lock)
        if isinstance(error, TrainingDiverged):
            last = self.checkpoint if self.checkpoint.exists() else "none yet"
            raise TrainingDiverged(f"{error}; nothing was saved over the last good checkpoint ({last}; "
                                   f"resumable state {self.state_path})") from None
        return False
