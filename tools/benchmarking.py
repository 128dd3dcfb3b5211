"""Timing helpers shared by the benchmark commands."""
from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

# The real photo sets: ../shared/datasets beside the checkout, or the folder LOOKALIKE_DATASETS names (the
# tests read them from here too).
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def measure(call: Callable[[], int], seconds: float, clients: int) -> tuple[float, list[float]]:
    """Runs `call` (which returns how many units of work it did) from `clients` threads for `seconds`.

    Returns (units per second over the whole run, every call's latency in seconds).
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(index: int) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            counts[index] += call()
            latencies[index].append(time.perf_counter() - started)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return sum(counts) / elapsed, [value for values in latencies for value in values]


def p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    return (round(float(np.percentile(latencies, 50)) * 1000, 3), round(float(np.percentile(latencies, 99)) * 1000, 3))


def default_photos(workdir: Path) -> Path:
    """Real photos to benchmark with: grocery's validation list in DATASETS, else Fashion-MNIST images."""
    grocery = DATASETS / "grocery" / "val.txt"
    if grocery.is_file():
        return grocery
    from lookalike.quality.fashion_mnist import materialize

    return materialize(workdir / "fashion-mnist", "test", 30)


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resident_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
