"""`lookalike bench replicas`: what replication over PostgreSQL costs and buys, measured in one run.

- Upsert throughput into a searcher over SQLite against one over PostgreSQL (same machine, same items,
  batches of 500, then single-item calls);
- replication lag under a steady write load: writes acknowledged by replica A, the time until replica B
  serves them (B's GetStats polled every few milliseconds), p50/p99;
- failover: a client searching back to back through one round-robin channel over A and B while A is
  SIGKILLed; the time from the kill to the client's first successful answer;
- start-up of a replica on an empty disk (built from PostgreSQL) against one from its snapshot, at the
  catalogue's size or, with --startup-items, at that many rows written straight into the store.

Items are synthetic unit vectors (the costs measured do not depend on what the vectors mean). PostgreSQL
is a throwaway local server (Debian's package) unless --store names one.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from lookalike.client.connection import ChannelSettings
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
from lookalike.tools.processes import free_port, running_service

MODEL = "synthetic@bench"
CATEGORIES = 10


def _vectors(count: int, dimension: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _items(vectors: np.ndarray, prefix: str) -> list[CatalogueItem]:
    return [CatalogueItem(f"{prefix}-{i}", f"category-{i % CATEGORIES}", vector, MODEL) for i, vector in enumerate(vectors)]


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(values, 99)) * 1000, 2),
            "max_ms": round(float(np.max(values)) * 1000, 2), "samples": len(values)}


@contextmanager
def _postgres(store: str, work: Path) -> Iterator[str]:
    if store:
        yield store
        return
    from lookalike.tools.postgres import postgres_available, running_postgres

    reason = postgres_available()
    if reason:
        raise RuntimeError(f"no PostgreSQL to measure against: {reason} (or give --store postgresql://...)")
    with running_postgres(work / "postgres") as dsn:
        yield dsn


def _upsert_rates(work: Path, dsn: str, items: list[CatalogueItem], singles: int) -> dict:
    """items/s in batches of 500, and single-item upserts/s with their latency, for each store."""
    rates = {}
    for name, extra in (("sqlite", []), ("postgresql", ["--store", dsn])):
        args = ["--data", str(work / f"upsert-{name}"), "--snapshot-interval", "0", *extra]
        with running_service("lookalike.searcher", args) as (_, port), SearcherClient(f"127.0.0.1:{port}") as client:
            started = time.perf_counter()
            for start in range(0, len(items), 500):
                client.upsert(items[start:start + 500], timeout=300)
            batch_rate = len(items) / (time.perf_counter() - started)
            latencies = []
            for item in items[:singles]:
                began = time.perf_counter()
                client.upsert([CatalogueItem(item.id + "-single", item.category, item.vector, MODEL)])
                latencies.append(time.perf_counter() - began)
        rates[name] = {"batch_500_items_per_second": round(batch_rate, 1),
                       "single_item_upserts_per_second": round(len(latencies) / sum(latencies), 1),
                       "single_item": _percentiles_ms(latencies)}
    rates["postgresql_over_sqlite_batch"] = round(rates["postgresql"]["batch_500_items_per_second"]
                                                  / rates["sqlite"]["batch_500_items_per_second"], 3)
    return rates


def _lag(a: SearcherClient, b: SearcherClient, vectors: np.ndarray, writes_per_second: float, seconds: float) -> dict:
    """Writes of 10 items through A at a steady rate; for each, the time until B has applied it."""
    acked: list[tuple[int, float]] = []
    applied: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            sequence = b.stats().sequence
            # Timed when the answer is back: an upper bound on when B had applied it (timing the request's
            # start instead read up to a round trip too early).
            applied.append((time.perf_counter(), sequence))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    interval, rng = 1.0 / writes_per_second, np.random.default_rng(3)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        rows = rng.integers(0, len(vectors), 10)
        response = a.upsert(_items(vectors[rows], f"lag-{len(acked)}"))
        acked.append((response.sequence, time.perf_counter()))
        time.sleep(max(0.0, interval - (time.perf_counter() - began)))
    time.sleep(1.0)
    stop.set()
    watcher.join()
    lags = []
    for sequence, at in acked:
        seen = next((t for t, s in applied if s >= sequence and t >= at), None)
        if seen is not None:
            lags.append(seen - at)
    return {"writes_per_second": writes_per_second, "items_per_write": 10, "seconds": seconds,
            "unseen_writes": len(acked) - len(lags), **_percentiles_ms(lags)}


def _failover(work: Path, dsn: str, kills: int, dimension: int) -> dict:
    """SIGKILL a replica while a client searches back to back through a round-robin channel over both."""
    ports = [free_port(), free_port()]
    query = _vectors(1, dimension, 9)[0]
    replicas: list[tuple[ExitStack, object]] = []

    def start(index: int) -> tuple[ExitStack, object]:
        stack = ExitStack()
        process, _ = stack.enter_context(running_service("lookalike.searcher", [
            "--data", str(work / f"failover-{index}"), "--store", dsn, "--snapshot-interval", "0"],
            address=f"127.0.0.1:{ports[index]}"))
        return stack, process

    gaps = []
    try:
        replicas.extend(start(index) for index in range(2))
        settings = ChannelSettings(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", timeout=10.0)
        with SearcherClient(settings) as client:
            client.upsert(_items(_vectors(200, dimension, 8), "failover"))
            for kill in range(kills):
                done: list[float] = []
                stop = threading.Event()

                def search() -> None:
                    while not stop.is_set():
                        client.search(query, MODEL, k=10)
                        done.append(time.perf_counter())

                searcher = threading.Thread(target=search)
                searcher.start()
                time.sleep(0.5)
                victim = kill % 2
                killed_at = time.perf_counter()
                os.kill(replicas[victim][1].pid, signal.SIGKILL)  # type: ignore[attr-defined]
                time.sleep(1.0)
                stop.set()
                searcher.join()
                # The first answer that ends after the kill: how long the client went without one.
                gaps.append(min(end for end in done if end > killed_at) - killed_at)
                replicas[victim][0].close()
                replicas[victim] = start(victim)
    finally:
        for stack, _ in replicas:
            stack.close()
    return {"kills": kills, **_percentiles_ms(gaps)}


def _fill_store(dsn: str, count: int, dimension: int, present: int) -> int:
    """Writes synthetic items straight into the store (no searcher) until it holds `count`; returns how many
    it holds. Start-up at a million items needs a million rows, not a million indexed upserts."""
    from lookalike.searcher.store import ItemWrite, PostgresStore

    store = PostgresStore(dsn)
    try:
        for start in range(present, count, 20_000):
            vectors = _vectors(min(20_000, count - start), dimension, start)
            store.upsert([ItemWrite(f"fill-{start + i}", f"category-{(start + i) % CATEGORIES}", vector, {}, MODEL)
                          for i, vector in enumerate(vectors)])
    finally:
        store.close()
    return max(count, present)


def _startup(work: Path, dsn: str, count: int) -> dict:
    """Start-up to SERVING of a replica on an empty disk and of one from its own snapshot."""
    seconds = {}
    for label, data in (("empty_disk_seconds", "startup-a"), ("from_snapshot_seconds", "startup-a")):
        started = time.perf_counter()
        with running_service("lookalike.searcher", ["--data", str(work / data), "--store", dsn, "--snapshot-interval",
                                                    "0"], startup_timeout=3600) as (_, port):
            seconds[label] = round(time.perf_counter() - started, 2)
            with SearcherClient(f"127.0.0.1:{port}") as client:
                assert client.stats().items == count, "a replica serves the whole catalogue"
    return {"items": count, **seconds}


def run_replicas_bench(*, items: int, dimension: int, store: str = "", seconds: float = 10.0,
                       startup_items: int = 0, as_json: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-replicas-"))
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "items": items, "dimension": dimension}
    try:
        with _postgres(store, work) as dsn:
            vectors = _vectors(items, dimension, 1)
            catalogue = _items(vectors, "item")
            report["upsert"] = _upsert_rates(work, dsn, catalogue[:20_000], singles=300)
            report["failover"] = _failover(work, dsn, kills=5, dimension=dimension)
            with ExitStack() as stack:
                ports = []
                for name in ("a", "b"):
                    ports.append(stack.enter_context(running_service("lookalike.searcher", [
                        "--data", str(work / f"lag-{name}"), "--store", dsn, "--snapshot-interval", "0"]))[1])
                a = stack.enter_context(SearcherClient(f"127.0.0.1:{ports[0]}"))
                b = stack.enter_context(SearcherClient(f"127.0.0.1:{ports[1]}"))
                report["lag"] = _lag(a, b, vectors, writes_per_second=50, seconds=seconds)
                # New ids only: the upsert rates above already stored item-0 .. item-19999 (replacing is slower).
                fresh = _items(vectors, "bulk")
                started = time.perf_counter()
                for start in range(0, items, 1000):
                    a.upsert(fresh[start:start + 1000], timeout=600)
                report["bulk_load_items_per_second"] = round(items / (time.perf_counter() - started), 1)
                total = a.stats().items
            if startup_items > total:
                started, before = time.perf_counter(), total
                total = _fill_store(dsn, startup_items, dimension, total)
                report["fill_store_rows_per_second"] = round((total - before) / (time.perf_counter() - started), 1)
            report["startup"] = _startup(work, dsn, total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _print(report: dict) -> None:
    print(f"machine: {report['machine']}; synthetic {report['dimension']}-d unit vectors, {CATEGORIES} categories")
    for store in ("sqlite", "postgresql"):
        row = report["upsert"][store]
        print(f"upsert into {store:<10} batches of 500: {row['batch_500_items_per_second']:>9} items/s;  single items: "
              f"{row['single_item_upserts_per_second']:>7}/s, p50 {row['single_item']['p50_ms']} ms, "
              f"p99 {row['single_item']['p99_ms']} ms")
    print(f"  PostgreSQL / SQLite (batches): {report['upsert']['postgresql_over_sqlite_batch']}")
    lag = report["lag"]
    print(f"replication lag, {lag['writes_per_second']} writes/s of {lag['items_per_write']} items through A, seen "
          f"applied by B: p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms "
          f"({lag['samples']} writes, {lag['unseen_writes']} not seen)")
    failover = report["failover"]
    print(f"failover, SIGKILL of one of two replicas under back-to-back searches ({failover['kills']} kills): first "
          f"answer after the kill p50 {failover['p50_ms']} ms, max {failover['max_ms']} ms")
    startup = report["startup"]
    print(f"bulk load through one replica: {report['bulk_load_items_per_second']} items/s")
    print(f"replica start-up at {startup['items']} items: empty disk {startup['empty_disk_seconds']} s, from its "
          f"snapshot {startup['from_snapshot_seconds']} s")
