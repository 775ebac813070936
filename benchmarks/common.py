"""Helpers shared by the benchmarks: toy data, section timers, memory probes, output.

Nothing here changes library behaviour; the benchmarks only time the library's own calls.
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOY_MARKER = ".benchmark_toy.json"


# ----------------------------------------------------------------------------------------- data
def toy_size(image_size: int) -> int:
    """Side of the toy JPEGs: at least the evaluation resize (S * 256 / 224), so crops are real."""
    return max(16, math.ceil(image_size * 256 / 224))


def toy_dataset(root: str | None, per_class: int, size: int, keep: str | None = None):
    """The dataset root to benchmark on, generating the toy dataset when ``root`` is None.

    Args:
        root: an existing dataset (``--dataroot``); used as is.
        per_class, size: toy images per class and their side.
        keep: a directory to generate into and reuse across runs (a marker file records the
            parameters; a matching directory is not regenerated). None: a temporary directory.

    Returns:
        ``(path, seconds spent generating, TemporaryDirectory or None)``; keep the last alive
        as long as the data is needed.
    """
    if root is not None:
        return Path(root), 0.0, None
    from datasets import toy

    params = {"per_class": per_class, "size": size, "seed": 0}
    holder = None
    if keep is not None:
        out = Path(keep)
        marker = out / TOY_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return out, 0.0, None
    else:
        holder = tempfile.TemporaryDirectory(prefix="idemenet_bench_")
        out = Path(holder.name)
    start = time.perf_counter()
    toy.generate(out, per_class=per_class, size=size, seed=0)
    seconds = time.perf_counter() - start
    if keep is not None:
        (out / TOY_MARKER).write_text(json.dumps(params))
    return out, seconds, holder


# --------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SectionClock:
    """Sums time per named section within one episode.

    On the CPU a section is wall time (``perf_counter``). On CUDA each section records a pair of
    CUDA events (no synchronisation, so the measured loop keeps its overlap); the elapsed stream
    time is read in :meth:`collect` after the caller has synchronised. Sections may nest (an
    outer section includes its inner ones; callers derive residuals).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, object, object]] = []

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events.append((name, start, end))
        else:
            tick = time.perf_counter()
            try:
                yield
            finally:
                self.times[name] += time.perf_counter() - tick

    def add(self, name: str, seconds: float) -> None:
        """A host-side interval (e.g. waiting for the data loader)."""
        self.times[name] += seconds

    def collect(self) -> dict[str, float]:
        """Seconds per section since the last call (call after synchronising on CUDA)."""
        out = dict(self.times)
        for name, start, end in self.events:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000
        self.times, self.events = defaultdict(float), []
        return out


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def section_medians(rows: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    """Median seconds per section over the episodes (0 where a section never ran)."""
    return {name: median(row.get(name, 0.0) for row in rows) for name in names}


# --------------------------------------------------------------------------------------- memory
def _status_kb(field: str, pid: str = "self") -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def _smaps_kb(pid: str) -> tuple[int, int]:
    """(PSS, private) kB of a process from /proc/<pid>/smaps_rollup (costs milliseconds per GB mapped)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    pss = int(fields.get("Pss", 0))
    private = int(fields.get("Private_Clean", 0)) + int(fields.get("Private_Dirty", 0))
    return pss, private


def child_pids() -> list[str]:
    """Direct children of this process (the DataLoader workers), from /proc."""
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids.extend((task / "children").read_text().split())
        except OSError:
            pass
    return pids


_LIFETIME_PEAK_KB = 0  # this process's high-water mark before MemoryProbe resets it


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """High-water resident set size from getrusage (Linux reports kB). For this process, the peak
    over its whole life: resetting VmHWM (MemoryProbe) also resets ``ru_maxrss``, so the peaks seen
    before each reset are kept here."""
    peak = resource.getrusage(who).ru_maxrss
    if who == resource.RUSAGE_SELF:
        peak = max(peak, _LIFETIME_PEAK_KB)
    return peak / 1024


def self_usage() -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def usage_delta(before: tuple[float, float, int]) -> dict[str, float]:
    """CPU and page-fault counters since ``before`` (see :func:`self_usage`)."""
    user, system, faults = self_usage()
    return {"cpu_user": user - before[0], "cpu_sys": system - before[1], "minflt": float(faults - before[2])}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PSS_INTERVAL = 2.0  # seconds between smaps_rollup walks; set by the benchmarks' --pssInterval (0: never)


class MemoryProbe:
    """Peak memory of one phase of a benchmark.

    ``rss_mb``: this process's resident high-water mark over the phase (VmHWM, reset at the start
    through /proc/self/clear_refs where allowed, else sampled every ``interval`` s);
    ``workers_private_mb``: the largest sampled sum of the private (unshared) memory of this
    process's children (the DataLoader workers); ``total_mb`` = ``rss_mb`` + ``workers_private_mb``:
    what the job holds at most, shared pages counted once; ``total_pss_mb``: the largest sampled sum
    of proportional set sizes of this process and its children; ``cuda_mb``:
    ``torch.cuda.max_memory_allocated`` over the phase.

    Walking a process's page tables (smaps_rollup) costs ~10 ms per GB mapped, so the PSS and
    private figures are sampled only every ``PSS_INTERVAL`` seconds (sampling every 50 ms took
    most of a core away from the measured loop).
    """

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.rss_mb = self.total_pss_mb = self.workers_private_mb = self.total_mb = self.cuda_mb = 0.0
        self._stop = threading.Event()
        self._thread = None
        self._hwm_reset = False
        self._sampled_rss = 0

    def sample_now(self) -> None:
        """Take the PSS / private sample now (e.g. while the workers are still alive)."""
        if PSS_INTERVAL > 0:
            self._smaps()

    def _smaps(self) -> None:
        pss, _ = _smaps_kb("self")
        workers = [_smaps_kb(pid) for pid in child_pids()]
        self.workers_private_mb = max(self.workers_private_mb, sum(w[1] for w in workers) / 1024)
        self.total_pss_mb = max(self.total_pss_mb, (pss + sum(w[0] for w in workers)) / 1024)

    def _sample(self) -> None:
        last = time.perf_counter()
        while True:
            if not self._hwm_reset:
                self._sampled_rss = max(self._sampled_rss, _status_kb("VmRSS"))
            if PSS_INTERVAL > 0 and time.perf_counter() - last >= PSS_INTERVAL:
                self._smaps()
                last = time.perf_counter()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemoryProbe:  # noqa: PYI034
        global _LIFETIME_PEAK_KB
        _LIFETIME_PEAK_KB = max(_LIFETIME_PEAK_KB, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_kb("VmHWM") if self._hwm_reset else 0
        self.rss_mb = max(hwm, self._sampled_rss) / 1024
        if PSS_INTERVAL > 0:
            self._smaps()
        self.total_mb = self.rss_mb + self.workers_private_mb
        global _LIFETIME_PEAK_KB
        _LIFETIME_PEAK_KB = max(_LIFETIME_PEAK_KB, hwm, self._sampled_rss,
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        if self.device.type == "cuda":
            synchronize(self.device)
            self.cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


# --------------------------------------------------------------------------------------- output
def environment() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": round(os.getloadavg()[0], 2)}


def fmt_ms(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:9.1f}"


def print_table(title: str, columns: list[str], rows: list[tuple[str, list[float | None]]]) -> None:
    """Rows of seconds shown in milliseconds; None shows as '-'."""
    width = max(len(label) for label, _ in rows) + 2
    print(title)
    print(" " * width + "".join(f"{c:>14}" for c in columns))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f"{fmt_ms(v) if v is not None else '-':>14}" for v in values))


def round_floats(obj, digits: int = 4):
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def emit_json(summary: dict, path: str | None) -> None:
    """The final line of the benchmark's output (and ``path`` when given)."""
    line = json.dumps(round_floats(summary), sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(line + "\n")
    print(line, flush=True)
