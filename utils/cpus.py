"""The CPU cores this process may use (no torch import: scripts that only start others use it too)."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores in this process's affinity (cgroup, ``taskset``), at most ``SLURM_CPUS_PER_TASK`` when set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus
