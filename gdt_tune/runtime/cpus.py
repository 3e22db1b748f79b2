"""How many CPUs this process may really use: its CPU affinity, capped by a cgroup CPU quota.

A container or a Slurm job limited by a quota (Kubernetes ``limits.cpu``, ``cpu.max``) still sees
every core of the host in ``os.cpu_count()`` and in its affinity; sizing thread pools and worker
processes by that count oversubscribes the cores it may use (8 threads a rank on 2 allowed cores).
The recipe's threads per rank and the dataset indexer's processes use :func:`available_cpus`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> int | None:
    """CPUs allowed by the cgroup quota (rounded up), or None when there is none: cgroup v2
    ``cpu.max`` ("200000 100000" is 2 CPUs; "max" is none), else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota, period = int((v1 / "cpu.cfs_quota_us").read_text()), int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    return None


def available_cpus(root: Path = CGROUP) -> int:
    """The CPUs of this process's affinity, capped by the cgroup quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return max(1, min(count, quota) if quota else count)
