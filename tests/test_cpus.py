"""Threads follow the CPUs a pod may use: the cgroup quota (v2 and v1) and the process's affinity."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lookalike.serving.cpus import available_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def cgroup_v1(tmp_path: Path, quota: int, period: int) -> Path:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_a_quota_below_the_cores_rounds_up_to_whole_cpus(tmp_path: Path) -> None:
    assert available_cpus(cgroup_v2(tmp_path, "50000 100000")) == 1  # half a CPU: one thread
    if AFFINITY >= 2:
        assert available_cpus(cgroup_v2(tmp_path, "150000 100000")) == 2


def test_no_quota_or_a_quota_above_the_cores_gives_the_affinity(tmp_path: Path) -> None:
    assert available_cpus(cgroup_v2(tmp_path, "max 100000")) == AFFINITY
    assert available_cpus(cgroup_v2(tmp_path, f"{100 * 100000} 100000")) == AFFINITY
    assert available_cpus(tmp_path / "no-cgroup-here") == AFFINITY


@pytest.mark.parametrize(("quota", "expected"), [(-1, AFFINITY), (100000, 1), (10**9, AFFINITY)])
def test_cgroup_v1(tmp_path: Path, quota: int, expected: int) -> None:
    assert available_cpus(cgroup_v1(tmp_path, quota, 100000)) == expected


def test_this_machine() -> None:
    assert 1 <= available_cpus() <= AFFINITY
