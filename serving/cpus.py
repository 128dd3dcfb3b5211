"""How many CPUs this process may use: the cgroup's quota (a pod's CPU limit) and affinity, not the node's cores."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    """The smaller of this process's CPU affinity and its cgroup's CPU quota (v2 cpu.max, or v1
    cpu.cfs_quota_us / cpu.cfs_period_us), rounded up; at least 1.

    A pod limited to 2 CPUs on a 64-core node would otherwise start 64 ONNX Runtime or hnswlib threads
    that the quota then throttles.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _quota(cgroup)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _quota(cgroup: Path) -> float | None:
    """CPUs the cgroup's quota allows, or None when it sets none."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 means no quota
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
