"""What the benchmarks share: the data they generate, the timers the speed benchmarks (per step) and gpu_check
(whole passes) pass to the engine, memory probes, output."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import torch

from datasets import toy
from engine.options import add_image_size_flag
from engine.timing import Timer
from utils.options import (
    HelpFormatter,
    add_amp_flag,
    add_dataroot_flag,
    add_device_flag,
    add_seed_flag,
    add_threads_flag,
)


def generate_once(generate, root: Path, marker: str, what: str | None = None, **params) -> float:
    """Seconds spent generating a data set into ``root`` with ``params`` (announced as ``what`` data when
    given); 0 when the file ``marker`` there records the same ``params`` (then reused)."""
    path = root / marker
    if path.is_file() and json.loads(path.read_text()) == params:
        return 0.0
    if what:
        print(f"generating {what} data in {root}", flush=True)
    seconds, _ = timed(torch.device("cpu"), generate, root, **params)
    path.write_text(json.dumps(params))
    return seconds


# --- the speed benchmarks (episode.py, stage1.py, ops.py) -------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    """The flags the speed benchmarks have."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_dataroot_flag(p, None, "dataset root (default: a generated toy dataset)")
    p.add_argument("--toyDir", default=None, help="generate the toy dataset here, reuse it on later runs")
    p.add_argument("--toySize", type=int, default=None, help="toy image side (default: ceil(imageSize*256/224))")
    add_image_size_flag(p, use="")
    add_device_flag(p)
    add_amp_flag(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed block")
    add_threads_flag(p, 4, use="DataLoader workers (and gallery decode threads)")
    p.add_argument("--torchThreads", type=int, default=None, help="torch.set_num_threads in this process")
    p.add_argument("--pssInterval", type=float, default=2.0, help="seconds between worker memory samples (0: none)")
    add_seed_flag(p)
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    return p


def setup(a: argparse.Namespace, per_class: int) -> tuple[dict, Path, float, tempfile.TemporaryDirectory | None]:
    """``(environment, dataset root, seconds generating it, TemporaryDirectory or None)``: ``--dataroot``,
    else the toy dataset (side ``ceil(imageSize * 256 / 224)`` so the evaluation crop does real work)
    in ``--toyDir`` (reused when its marker matches) or in a temporary directory."""
    if a.torchThreads:
        torch.set_num_threads(a.torchThreads)
    env = environment()
    if a.dataroot is not None:
        return env, Path(a.dataroot), 0.0, None
    holder = None if a.toyDir else tempfile.TemporaryDirectory(prefix="idemenet_bench_")
    out = Path(a.toyDir or holder.name)
    seconds = generate_once(toy.generate, out, ".benchmark_toy.json", per_class=per_class,
                            size=a.toySize or max(16, math.ceil(a.imageSize * 256 / 224)), seed=0)
    return env, out, seconds, holder


class FirstItems:
    """The first ``count`` items of ``loader`` for a training loop, each kept in ``items`` as the loop takes it."""

    def __init__(self, loader: Iterable, count: int) -> None:
        self.loader, self.count, self.items = loader, count, []

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for item in islice(self.loader, self.count):
            self.items.append(item)
            yield item


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    """``(seconds, fn(*args, **kwargs))``, the device synchronised before the clock stops."""
    tick = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - tick, out


class Stopwatch(Timer):
    """Wall ``seconds`` of a ``with`` block from the end of its loop's first ``skip`` steps on (cuDNN's
    choices, the allocator, a loader's workers warmed), the device synchronised at both ends, and the CUDA
    allocator's ``peak_mb`` over them (None on the CPU). Unlike :class:`StepTimer` nothing waits for the
    device between steps, as in the scripts."""

    def __init__(self, device: torch.device, skip: int = 0) -> None:
        self.device, self.skip, self.steps, self.seconds, self.peak_mb = device, skip, 0, 0.0, None

    def restart(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()

    def __enter__(self) -> Stopwatch:
        self.restart()
        return self

    def end_step(self) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.restart()

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)


class StepTimer(Timer):
    """The engine's :class:`Timer`: per step, seconds per section, ``total`` (since the previous step
    ended), ``unaccounted`` (total minus sections), this process's ``cpu_user``, ``cpu_sys``, ``minflt``.

    Keeps the rows of steps ``skip + 1`` to ``skip + keep``. On CUDA a section is the stream time
    between two events except ``data_wait`` (host time blocked on the loader); :meth:`end_step`
    synchronises. It times inside ``with timer:``, which enters ``probe``: the workers' memory sampled
    between steps (every ``pss_interval`` s, and after the last kept step)."""

    def __init__(self, device: torch.device, skip: int, keep: int, probe: MemoryProbe) -> None:
        self.device, self.skip, self.keep, self.probe = device, skip, keep, probe
        self.rows: list[dict[str, float]] = []
        self.steps = 0

    def __enter__(self) -> StepTimer:
        """Enter the probe and start the first step (not at construction: a timer may be built before an
        earlier pass)."""
        self.probe.__enter__()
        self.sampled = time.perf_counter()
        self.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.probe.__exit__(*exc)

    def done(self) -> bool:
        """The kept steps have all ended (a loop's ``stop``)."""
        return self.steps >= self.skip + self.keep

    def begin(self) -> None:
        """Start a step now."""
        self.times: dict[str, float] = defaultdict(float)
        self.events: list = []
        self.usage = resource.getrusage(resource.RUSAGE_SELF)
        self.start = time.perf_counter()

    @contextmanager
    def section(self, name: str):
        if self.device.type == "cuda" and name != "data_wait":
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

    def end_step(self) -> None:
        synchronize(self.device)
        total, usage = time.perf_counter() - self.start, resource.getrusage(resource.RUSAGE_SELF)
        row = dict(self.times)
        for name, start, end in self.events:
            row[name] = row.get(name, 0.0) + start.elapsed_time(end) / 1000
        row.update(unaccounted=total - sum(row.values()), total=total,
                   cpu_user=usage.ru_utime - self.usage.ru_utime, cpu_sys=usage.ru_stime - self.usage.ru_stime,
                   minflt=float(usage.ru_minflt - self.usage.ru_minflt))
        self.steps += 1
        if self.skip < self.steps <= self.skip + self.keep:
            self.rows.append(row)
        now = time.perf_counter()
        if self.steps == self.skip + self.keep or now > self.sampled + self.probe.pss_interval:
            self.probe.sample_workers()
            self.sampled = time.perf_counter()
        self.begin()


def ratio(loop: list[dict], floor: list[dict], stat=statistics.median) -> float | None:
    """``stat`` of the loop's step times over the floor's (None when either did not run)."""
    return stat(r["total"] for r in loop) / stat(r["total"] for r in floor) if loop and floor else None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _kb(path: str, *names: str) -> list[int]:
    """The ``name: N kB`` fields of a /proc file (0 where missing or unreadable)."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", _read(path), re.MULTILINE))
    return [int(fields.get(name, 0)) for name in names]


def children_cpu_s() -> float:
    """CPU time of the finished children (loader workers) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class MemoryProbe:
    """Peak memory over the phases run inside ``with probe:`` (maxima over all of them): ``rss_mb``,
    this process's VmHWM (reset on entry through /proc/self/clear_refs where allowed);
    ``workers_private_mb``, the largest sampled sum of its children's private memory; ``total_mb``,
    the two added; ``total_pss_mb``, the largest sampled PSS of the process and its children (samples:
    :class:`StepTimer` and the exit; 0 ``pss_interval``: none); ``cuda_mb``, the CUDA allocator peak."""

    lifetime_kb = 0  # the process's peak before the VmHWM resets (which also reset ru_maxrss)

    def __init__(self, device: torch.device, pss_interval: float) -> None:
        self.device, self.pss_interval = device, pss_interval
        self.rss_mb = self.total_pss_mb = self.workers_private_mb = self.total_mb = self.cuda_mb = 0.0

    def sample_workers(self) -> None:
        """One PSS and private-memory sample of the process and its children, now."""
        if self.pss_interval <= 0:
            return
        children = [pid for task in Path("/proc/self/task").glob("*") for pid in _read(task / "children").split()]
        workers = [_kb(f"/proc/{pid}/smaps_rollup", "Pss", "Private_Clean", "Private_Dirty") for pid in children]
        own = _kb("/proc/self/smaps_rollup", "Pss")[0]
        self.workers_private_mb = max(self.workers_private_mb, sum(w[1] + w[2] for w in workers) / 1024)
        self.total_pss_mb = max(self.total_pss_mb, (own + sum(w[0] for w in workers)) / 1024)

    def __enter__(self) -> MemoryProbe:  # noqa: PYI034
        MemoryProbe.lifetime_kb = max(MemoryProbe.lifetime_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        hwm = _kb("/proc/self/status", "VmHWM")[0]
        MemoryProbe.lifetime_kb = max(MemoryProbe.lifetime_kb, hwm)
        self.rss_mb = max(self.rss_mb, hwm / 1024)
        self.sample_workers()
        self.total_mb = max(self.total_mb, self.rss_mb + self.workers_private_mb)
        if self.device.type == "cuda":
            synchronize(self.device)
            self.cuda_mb = max(self.cuda_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)


def memory_fields(probes: dict[str, MemoryProbe]) -> dict[str, float]:
    """The probes' figures per phase, the process's lifetime peak and the largest finished worker's RSS."""
    out = {"peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, MemoryProbe.lifetime_kb) / 1024,
           "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    for phase, p in probes.items():
        out.update({f"{phase}_peak_rss_mb": p.rss_mb, f"{phase}_peak_total_mb": p.total_mb,
                    f"{phase}_peak_total_pss_mb": p.total_pss_mb, f"{phase}_workers_private_mb": p.workers_private_mb})
        if p.device.type == "cuda":
            out[f"cuda_peak_{phase}_mb"] = p.cuda_mb
    return out


def environment() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": round(os.getloadavg()[0], 2)}


def print_table(title: str, rows: dict[str, list[dict[str, float]]], keys: list[str],
                total_label: str) -> tuple[dict[str, dict[str, float]], dict]:
    """Print the medians over each loop's rows (a column per loop that ran, a row per key: the engine's section
    names; milliseconds, '-' where a section did not run). Returns them (0 in the rows without a key) and the
    summary's ``timed_steps`` (rows per loop) and ``breakdown_ms`` (the table; page faults as counts)."""
    columns = {column: {key: statistics.median(row.get(key, 0.0) for row in loop)
                        for key in dict.fromkeys(k for row in loop for k in row)}
               for column, loop in rows.items() if loop}
    print(f"\n{title}\n" + " " * 20 + "".join(f"{c:>14}" for c in columns))
    for key in keys:
        cells = [columns[c].get(key, math.nan) for c in columns]
        print(f"{total_label if key == 'total' else key:<20}"
              + "".join(f"{'-' if math.isnan(v) else f'{1000 * v:.1f}':>14}" for v in cells))
    return columns, {"timed_steps": {column: len(loop) for column, loop in rows.items()},
                     "breakdown_ms": {c: {k: v if k == "minflt" else 1000 * v for k, v in values.items()}
                                      for c, values in columns.items()}}


def rounded(obj):
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return round(obj, 4) if isinstance(obj, float) else obj


def finish(summary: dict, env_start: dict, path: str | None, holder, device: torch.device | None = None) -> None:
    """Add the GPU's name, the machine's load, print the JSON line (the output's last, also written to
    ``path``) and remove the temporary toy dataset."""
    if device is not None and device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    env_end = environment()
    print(f"load average {env_start['load_avg']} at start, {env_end['load_avg']} at end "
          f"({env_start['cpu_count']} CPUs, {env_start['torch_threads']} torch threads)")
    summary.update({k: v for k, v in env_start.items() if k != "load_avg"}, load_avg_start=env_start["load_avg"],
                   load_avg_end=env_end["load_avg"])
    line = json.dumps(rounded(summary))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(line + "\n")
    print(line, flush=True)
    if holder is not None:
        holder.cleanup()
