"""Searcher replicas over a real PostgreSQL: they follow each other's writes, survive SIGKILLs, rebuild.

Every replica is a real searcher process with its own data folder (its snapshots) sharing one
PostgreSQL database; clients reach them through one round-robin channel (ipv4:a,b).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookalike.client.connection import ChannelSettings
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
from lookalike.codec import pack_vector
from lookalike.tools.processes import running_service
from lookalike.v1 import common_pb2, searcher_pb2 as pb, searcher_pb2_grpc
from tests.test_searcher_durability import CATEGORIES, DIM, MODEL, State, check_state, random_vector


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def replica_args(data: Path, dsn: str, *extra: str) -> list[str]:
    return ["--data", str(data), "--store", dsn, "--follow-interval", "0.5", "--initial-capacity", "16", *extra]


def wait_converged(stubs: list[searcher_pb2_grpc.SearcherStub], timeout: float = 20.0) -> int:
    """Waits until every replica has applied the store's last write; returns that sequence number."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [stub.GetStats(pb.GetStatsRequest(), timeout=10) for stub in stubs]
        head = max(s.store_sequence for s in stats)
        if all(s.sequence >= head for s in stats):
            return head
        assert time.monotonic() < deadline, f"replicas did not converge: {[(s.sequence, s.store_sequence) for s in stats]}"
        time.sleep(0.05)


def upsert_request(items: dict[str, tuple[str, bytes]]) -> pb.UpsertRequest:
    return pb.UpsertRequest(items=[pb.Item(id=i, category=c, vector=common_pb2.Vector(values=v, dimension=DIM),
                                           model_id=MODEL) for i, (c, v) in items.items()])


@pytest.mark.timeout(180)
def test_concurrent_writers_through_different_replicas_end_in_the_acknowledged_state(fresh_database: str,
                                                                                      tmp_path: Path) -> None:
    """Writers race on the same ids through two replicas; the write with the highest acknowledged
    sequence number decides each id, and both replicas end with exactly that state."""
    with ExitStack() as stack:
        ports = [stack.enter_context(running_service("lookalike.searcher", replica_args(tmp_path / f"r{i}", fresh_database)))[1]
                 for i in range(2)]
        channels = [stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}")) for port in ports]
        stubs = [searcher_pb2_grpc.SearcherStub(channel) for channel in channels]
        ids = [f"sku-{n}" for n in range(120)]
        last: dict[str, tuple[int, State]] = {}  # id -> (sequence of its last acknowledged write, state)
        lock = threading.Lock()
        errors: list[BaseException] = []
        deadline = time.monotonic() + 5.0

        def writer(worker: int) -> None:
            rng, pick = np.random.default_rng(worker), random.Random(worker)
            stub = stubs[worker % 2]
            try:
                while time.monotonic() < deadline:
                    chosen = pick.sample(ids, pick.randint(1, 8))
                    if pick.random() < 0.75:
                        new: dict[str, State] = {i: (pick.choice(CATEGORIES), random_vector(rng).tobytes()) for i in chosen}
                        response = stub.Upsert(upsert_request(new), timeout=10)  # type: ignore[arg-type]
                        assert all(s.code == 0 for s in response.statuses)
                    else:
                        new = {i: None for i in chosen}
                        response = stub.Delete(pb.DeleteRequest(ids=chosen), timeout=10)
                    # One transaction's sequence numbers are its own, so the response's (its last) orders
                    # this write against every other write of the same ids.
                    with lock:
                        for item_id, state in new.items():
                            if item_id not in last or last[item_id][0] < response.sequence:
                                last[item_id] = (response.sequence, state)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        assert len(last) > 60
        wait_converged(stubs)
        expected = {item_id: state for item_id, (_, state) in last.items()}
        for stub in stubs:
            check_state(stub, expected, {})


@pytest.mark.timeout(300)
def test_sigkill_one_replica_at_a_time_no_failed_search_no_lost_write(fresh_database: str, tmp_path: Path) -> None:
    """Searches and writes go through one round-robin channel over two replicas while one of them is
    SIGKILLed at a random moment and restarted, for several rounds. The client's retry on UNAVAILABLE
    moves a call to the other replica within its deadline (without it, about 1 in 500 searches failed)."""
    ports = [free_port(), free_port()]
    settings = ChannelSettings(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", timeout=15.0)
    rng, pick = np.random.default_rng(11), random.Random(11)
    ids = [f"sku-{n}" for n in range(200)]
    acked: dict[str, State] = {}
    uncertain: dict[str, tuple[State, State]] = {}
    searches, acknowledged_writes = 0, 0
    failed_searches: list[Exception] = []
    failed_writes: list[Exception] = []
    probe = random_vector(rng)

    def start(index: int) -> tuple[ExitStack, subprocess.Popen]:
        stack = ExitStack()
        process, _ = stack.enter_context(running_service("lookalike.searcher", replica_args(
            tmp_path / f"r{index}", fresh_database, "--snapshot-interval", "0.5"), address=f"127.0.0.1:{ports[index]}"))
        return stack, process

    replicas = [start(0), start(1)]
    client = SearcherClient(settings)
    stop = threading.Event()

    def search_forever() -> None:
        nonlocal searches
        while not stop.is_set():
            try:
                response = client.search(probe, MODEL, k=10)
                assert len({h.id for h in response.hits}) == len(response.hits)
                searches += 1
            except Exception as error:  # noqa: BLE001 - counted and reported
                failed_searches.append(error)

    def write_forever() -> None:
        nonlocal acknowledged_writes
        while not stop.is_set():
            chosen = pick.sample(ids, pick.randint(1, 10))
            if pick.random() < 0.75:
                new: dict[str, State] = {i: (pick.choice(CATEGORIES), random_vector(rng).tobytes()) for i in chosen}
                call = lambda: client.upsert([CatalogueItem(i, c, np.frombuffer(v, np.float32), MODEL)  # noqa: E731
                                              for i, (c, v) in new.items()])  # type: ignore[misc]
            else:
                new = {i: None for i in chosen}
                call = lambda: client.delete(chosen)  # noqa: E731
            for item_id, state in new.items():
                uncertain[item_id] = (acked.get(item_id), state)
            try:
                response = call()
            except Exception as error:  # noqa: BLE001 - counted and reported; these ids stay uncertain
                failed_writes.append(error)
                continue
            if isinstance(response, pb.UpsertResponse):
                assert all(s.code == 0 for s in response.statuses)
            for item_id, state in new.items():
                acked[item_id] = state
                uncertain.pop(item_id, None)
            acknowledged_writes += 1

    workers = [threading.Thread(target=search_forever), threading.Thread(target=write_forever)]
    for worker in workers:
        worker.start()
    try:
        for round_number in range(6):
            time.sleep(pick.uniform(0.5, 1.5))
            victim = round_number % 2
            stack, process = replicas[victim]
            os.kill(process.pid, signal.SIGKILL)
            time.sleep(pick.uniform(0.1, 0.8))
            stack.close()
            replicas[victim] = start(victim)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    stubs = [searcher_pb2_grpc.SearcherStub(grpc.insecure_channel(f"127.0.0.1:{port}")) for port in ports]
    wait_converged(stubs)
    final = [check_state(stub, acked, uncertain) for stub in stubs]
    assert final[0] == final[1], "the replicas disagree"
    client.close()
    for stack, _ in replicas:
        stack.close()
    assert not failed_searches, f"{len(failed_searches)} of {searches} searches failed: {failed_searches[:3]}"
    assert not failed_writes, f"{len(failed_writes)} writes failed: {failed_writes[:3]}"
    assert searches > 100 and acknowledged_writes > 50


def test_a_replica_on_an_empty_disk_serves_what_one_from_a_snapshot_does(fresh_database: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = {f"sku-{n}": random_vector(rng) for n in range(1500)}
    with running_service("lookalike.searcher", replica_args(tmp_path / "a", fresh_database)) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            items = [CatalogueItem(i, CATEGORIES[n % len(CATEGORIES)], v, MODEL) for n, (i, v) in enumerate(vectors.items())]
            for start in range(0, len(items), 500):
                assert all(s.code == 0 for s in client.upsert(items[start:start + 500]).statuses)
            client.delete([f"sku-{n}" for n in range(0, 1500, 7)])
    # SIGTERM above snapshotted every shard into a/. More writes after the snapshot, through another replica:
    with running_service("lookalike.searcher", replica_args(tmp_path / "b", fresh_database)) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            client.upsert([CatalogueItem(f"sku-{n}", CATEGORIES[(n + 1) % len(CATEGORIES)], vectors[f"sku-{n}"], MODEL)
                           for n in range(1, 300, 3)])  # moves
            client.delete([f"sku-{n}" for n in range(2, 1500, 11)])
    assert any((tmp_path / "a" / "snapshots").iterdir())
    queries = [random_vector(rng) for _ in range(30)]
    answers = []
    for folder in ("a", "empty"):
        with running_service("lookalike.searcher", replica_args(tmp_path / folder, fresh_database)) as (_, port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = searcher_pb2_grpc.SearcherStub(channel)
                answers.append([[(h.id, h.category, round(h.similarity, 5)) for h in stub.Search(pb.SearchRequest(
                    vector=pack_vector(q), model_id=MODEL, k=10, ef=500), timeout=10).hits] for q in queries])
                stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
                answers[-1].append([(s.category, s.items) for s in stats.shards])
    assert answers[0] == answers[1]


def test_a_snapshot_older_than_pruned_removals_is_rebuilt(fresh_database: str, tmp_path: Path) -> None:
    """Replica b snapshots, then a deletes and prunes those removals: b must not bring the items back."""
    rng = np.random.default_rng(9)
    items = [CatalogueItem(f"sku-{n}", "hats", random_vector(rng), MODEL) for n in range(50)]
    with running_service("lookalike.searcher", replica_args(tmp_path / "b", fresh_database)) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            client.upsert(items)
    with running_service("lookalike.searcher", replica_args(tmp_path / "a", fresh_database,
                                                            "--tombstone-retention", "0")) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            client.delete([f"sku-{n}" for n in range(20)])
    # a's SIGTERM snapshot pruned the 20 removals (retention 0); b's snapshot still holds the items.
    import psycopg

    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0
        assert conn.execute("SELECT pruned_to FROM shards WHERE category = 'hats'").fetchone()[0] > 0
    with running_service("lookalike.searcher", replica_args(tmp_path / "b", fresh_database)) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            hits = client.search(items[0].vector, MODEL, k=50).hits
    assert sorted(h.id for h in hits) == sorted(f"sku-{n}" for n in range(20, 50))


def test_an_unreachable_store_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lookalike.searcher", "--data", str(tmp_path), "--address",
                             "127.0.0.1:0", "--store", f"postgresql://someone:hunter2@127.0.0.1:{free_port()}/shop",
                             "--store-timeout", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot start: could not connect to the PostgreSQL store at 127.0.0.1:" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_malformed_store_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lookalike.searcher", "--data", str(tmp_path), "--address",
                             "127.0.0.1:0", "--store", "mysql://db/shop"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "store 'mysql://db/shop': expected a postgresql:// DSN" in result.stderr
