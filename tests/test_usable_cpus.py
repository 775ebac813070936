"""--nthreads defaults to the CPU cores this process may use (its affinity, at most SLURM's allocation),
not to the machine's count."""
from __future__ import annotations

import os

import pytest

from engine.options import stage1_parser, stage2_parser
from utils.cpus import usable_cpus


@pytest.fixture
def machine(monkeypatch):
    """A 128-core machine on which this process may use 8 cores (a taskset or a cgroup)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    return monkeypatch


def test_usable_cpus_is_the_affinity_at_most_slurms_allocation(machine) -> None:
    assert usable_cpus() == 8
    machine.setenv("SLURM_CPUS_PER_TASK", "6")
    assert usable_cpus() == 6
    machine.setenv("SLURM_CPUS_PER_TASK", "32")
    assert usable_cpus() == 8
    machine.setenv("SLURM_CPUS_PER_TASK", "")
    assert usable_cpus() == 8


@pytest.mark.parametrize("parser", [stage1_parser, stage2_parser], ids=["stage1", "stage2"])
def test_the_nthreads_default_follows_the_usable_cores(machine, parser) -> None:
    machine.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    assert parser().get_default("nthreads") == 2  # not 4 (min(4, os.cpu_count()) = 4 on this machine)
    machine.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    machine.setenv("SLURM_CPUS_PER_TASK", "3")
    assert parser().get_default("nthreads") == 3
    machine.delenv("SLURM_CPUS_PER_TASK")
    assert parser().get_default("nthreads") == 4  # capped


def test_utils_cpus_needs_no_torch() -> None:
    import subprocess
    import sys
    code = "import sys, utils.cpus; assert 'torch' not in sys.modules; print(utils.cpus.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert int(out.stdout) >= 1
