"""`lookalike bench soak`: a bounded mixed load on both servers with auth on, watching for leaks and drift.

Both services run as separate processes requiring bearer tokens. The catalogue is filled first with
`catalogue_items` items; client threads then mix the calls a shop makes (search by photo, search by
vector, re-index photos, delete items) over those same ids, so the catalogue size stays level and any
memory growth is the servers' own. Every `sample_seconds` the run
records calls served and failed, p50/p99 latency over that interval, and both servers' resident memory.
The summary gives the memory slope after warm-up (least squares over the later samples), in MiB per hour.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lookalike.client.connection import ChannelSettings, LookalikeError
from lookalike.client.facade import Lookalike
from lookalike.client.searcher_client import routing_for
from lookalike.tools.benchmarking import resident_bytes
from lookalike.tools.processes import running_service

# Share of each operation in the mix.
OPERATIONS = {"search_photo": 0.45, "search_vector": 0.25, "index": 0.2, "delete": 0.1}


@dataclass
class Sample:
    seconds: float
    served: int
    failed: int
    p50_ms: float
    p99_ms: float
    embedder_rss_mib: float
    searcher_rss_mib: float


@dataclass
class SoakReport:
    machine: str
    seconds: float
    clients: int
    catalogue_items: int
    served: int
    failed: int
    failures: dict[str, int]
    served_by_operation: dict[str, int]
    embedder_rss_slope_mib_per_hour: float
    searcher_rss_slope_mib_per_hour: float
    warm_up_seconds: float
    samples: list[Sample] = field(default_factory=list)


def slope_per_hour(samples: list[Sample], attribute: str, after: float) -> float:
    """Least-squares growth of `attribute` in MiB per hour over the samples taken after `after` seconds."""
    points = [(s.seconds, getattr(s, attribute)) for s in samples if s.seconds >= after]
    if len(points) < 3:
        return 0.0
    times, values = np.array(points).T
    return float(np.polyfit(times, values, 1)[0] * 3600)


class _Load:
    """Client threads running the mix, with per-interval tallies the sampler drains."""

    def __init__(self, lookalike: Lookalike, photos: list[bytes], vectors: list[np.ndarray], items: int) -> None:
        self.lookalike, self.photos, self.vectors, self.items = lookalike, photos, vectors, items
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.interval_failed = 0
        self.served: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def run_one(self, rng: random.Random) -> str:
        operation = rng.choices(list(OPERATIONS), weights=list(OPERATIONS.values()))[0]
        if operation == "search_photo":
            self.lookalike.search(rng.choice(self.photos), k=10)
        elif operation == "search_vector":
            self.lookalike.searcher.search(rng.choice(self.vectors), self.lookalike.model_id, k=10,
                                           routing=routing_for(categories=["soak"]))
        elif operation == "index":
            count = rng.randint(1, 4)
            ids = [f"item-{rng.randrange(self.items)}" for _ in range(count)]
            result = self.lookalike.index(rng.sample(self.photos, count), ids, categories=["soak"] * count,
                                          attributes=[{"price": str(rng.randint(1, 500))}] * count)
            if result.failed:
                raise RuntimeError(f"index refused items: {result.failed[:2]}")
        else:
            self.lookalike.delete([f"item-{rng.randrange(self.items)}" for _ in range(rng.randint(1, 3))])
        return operation

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                operation = self.run_one(rng)
            except (LookalikeError, RuntimeError) as error:
                with self.lock:
                    self.interval_failed += 1
                    self.failures[error.code.name if isinstance(error, LookalikeError) else str(error)] += 1
                continue
            with self.lock:
                self.latencies.append(time.perf_counter() - started)
                self.served[operation] += 1

    def drain(self) -> tuple[list[float], int]:
        with self.lock:
            latencies, failed = self.latencies, self.interval_failed
            self.latencies, self.interval_failed = [], 0
        return latencies, failed


def soak(model_dir: Path, photos: list[bytes], seconds: float, sample_seconds: float = 10.0, clients: int = 4,
         catalogue_items: int = 1000, warm_up_seconds: float | None = None, progress: bool = False) -> SoakReport:
    """Runs the mixed load for `seconds` against fresh servers with auth on; returns the report.

    The first third of the run (or `warm_up_seconds`) is warm-up, left out of the memory slopes.
    """
    warm_up = seconds / 3 if warm_up_seconds is None else warm_up_seconds
    write_token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="lookalike-soak-") as scratch:
        tokens = Path(scratch) / "tokens"
        tokens.write_text(f"write {hashlib.sha256(write_token.encode()).hexdigest()}\n")
        auth = ["--auth-tokens", str(tokens)]
        with running_service("lookalike.embedder", ["--model", str(model_dir), *auth]) as (embedder, embedder_port), \
             running_service("lookalike.searcher", ["--data", str(Path(scratch) / "data"), "--snapshot-interval",
                                                    "30", *auth]) as (searcher, searcher_port):
            settings = {name: ChannelSettings(f"127.0.0.1:{port}", token=write_token)
                        for name, port in (("embedder", embedder_port), ("searcher", searcher_port))}
            with Lookalike(settings["embedder"], settings["searcher"]) as lookalike:
                vectors = [e.vector for e in lookalike.embedder.embed(photos[:64]) if e.ok]
                filled = lookalike.index([photos[n % len(photos)] for n in range(catalogue_items)],
                                         [f"item-{n}" for n in range(catalogue_items)],
                                         categories=["soak"] * catalogue_items)
                if filled.failed:
                    raise RuntimeError(f"could not fill the catalogue: {filled.failed[:2]}")
                load = _Load(lookalike, photos, vectors, catalogue_items)
                threads = [threading.Thread(target=load.worker, args=(n,), daemon=True) for n in range(clients)]
                began = time.monotonic()
                for thread in threads:
                    thread.start()
                samples: list[Sample] = []
                while (elapsed := time.monotonic() - began) < seconds:
                    time.sleep(min(sample_seconds, seconds - elapsed))
                    latencies, failed = load.drain()
                    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (0.0, 0.0)
                    samples.append(Sample(round(time.monotonic() - began, 1), len(latencies), failed, round(p50, 2),
                                          round(p99, 2), round(resident_bytes(embedder.pid) / 2**20, 1),
                                          round(resident_bytes(searcher.pid) / 2**20, 1)))
                    if progress:
                        print(_sample_line(samples[-1]), flush=True)
                load.stop.set()
                for thread in threads:
                    thread.join()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    return SoakReport(machine=machine, seconds=seconds, clients=clients, catalogue_items=catalogue_items,
                      served=sum(s.served for s in samples), failed=sum(s.failed for s in samples), failures=dict(load.failures),
                      served_by_operation=dict(load.served),
                      embedder_rss_slope_mib_per_hour=round(slope_per_hour(samples, "embedder_rss_mib", warm_up), 2),
                      searcher_rss_slope_mib_per_hour=round(slope_per_hour(samples, "searcher_rss_mib", warm_up), 2),
                      warm_up_seconds=warm_up, samples=samples)


def _sample_line(s: Sample) -> str:
    return (f"{s.seconds:>8} {s.served:>7} {s.failed:>6} {s.p50_ms:>8} {s.p99_ms:>8} {s.embedder_rss_mib:>12} "
            f"{s.searcher_rss_mib:>12}")


def run_soak_bench(model_dir: Path, photos: list[bytes], seconds: float, sample_seconds: float, clients: int,
                   catalogue_items: int, as_json: bool = False) -> int:
    """The command: prints each sample as it is taken, then the summary (or everything as JSON)."""
    if not as_json:
        print(f"soak: {seconds:.0f} s, {clients} clients, {catalogue_items} catalogue items, mix {OPERATIONS}, "
              f"auth on; samples every {sample_seconds:.0f} s")
        print(f"{'seconds':>8} {'served':>7} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} {'embedder MiB':>12} "
              f"{'searcher MiB':>12}")
    report = soak(model_dir, photos, seconds, sample_seconds, clients, catalogue_items, progress=not as_json)
    if as_json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"served {report.served} ({report.served_by_operation}), failed {report.failed} {report.failures}; "
              f"resident memory slope after {report.warm_up_seconds:.0f} s warm-up: embedder "
              f"{report.embedder_rss_slope_mib_per_hour} MiB/h, searcher {report.searcher_rss_slope_mib_per_hour} "
              f"MiB/h; {report.machine}")
    return 0 if report.failed == 0 else 1
