"""Searcher replicas over a real PostgreSQL: they follow each other's writes, survive SIGKILLs, rebuild.

Every replica is a real searcher process with its own data folder (its snapshots) sharing one
PostgreSQL database; clients reach them through one round-robin channel (ipv4:a,b).
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import numpy as np
import pytest

from lookalike.client.connection import ChannelSettings, LookalikeError, UnavailableError, call_with_retries
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, search_request
from lookalike.client.shard_map import ShardMapClient
from lookalike.codec import pack_vector
from lookalike.routing import Routing
from lookalike.tools.processes import free_port, running_service
from lookalike.v1 import common_pb2, searcher_pb2 as pb, searcher_pb2_grpc
from tests.conftest import store_in
from tests.test_searcher_durability import CATEGORIES, DIM, MODEL, State, check_state, holds, listing, random_vector


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


class MapStub:
    """The Search of a stub, through the shard-map client: check_state then sees every group's shards."""

    def __init__(self, client: ShardMapClient) -> None:
        self.client = client

    def Search(self, request: pb.SearchRequest, timeout: float) -> pb.SearchResponse:  # noqa: N802 - a stub's name
        return self.client.search(np.frombuffer(request.vector.values, "<f4"), request.model_id, request.k,
                                  request.routing, request.ef, timeout)


class Groups:
    """Replica groups of real searcher processes on fixed ports (so a killed replica comes back where its
    group's target says), sharing one PostgreSQL database."""

    def __init__(self, dsn: str, root: Path, groups: dict[str, int], *extra: str) -> None:
        self.dsn, self.root, self.extra = dsn, root, extra
        self.ports = {name: [free_port() for _ in range(count)] for name, count in groups.items()}
        self.processes: dict[tuple[str, int], tuple[ExitStack, subprocess.Popen]] = {}
        for name, ports in self.ports.items():
            for index in range(len(ports)):
                self.start(name, index)

    def target(self, name: str) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in self.ports[name])

    @property
    def seed(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for ports in self.ports.values() for port in ports)

    def start(self, name: str, index: int) -> None:
        stack = ExitStack()
        process, _ = stack.enter_context(running_service("lookalike.searcher", replica_args(
            self.root / f"{name}{index}", self.dsn, "--group", name, "--advertise", self.target(name),
            "--move-grace", "1", *self.extra), address=f"127.0.0.1:{self.ports[name][index]}"))
        self.processes[(name, index)] = (stack, process)

    def kill(self, name: str, index: int) -> None:
        stack, process = self.processes.pop((name, index))
        os.kill(process.pid, signal.SIGKILL)
        stack.close()

    def stubs(self) -> list[searcher_pb2_grpc.SearcherStub]:
        return [searcher_pb2_grpc.SearcherStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
                for ports in self.ports.values() for port in ports]

    def close(self) -> None:
        for stack, _ in self.processes.values():
            stack.close()


@pytest.mark.timeout(400)
def test_sigkill_one_replica_of_each_group_no_failed_search_no_lost_write(fresh_database: str, tmp_path: Path) -> None:
    """Two groups of two replicas; searches and writes through the shard-map client while one replica of
    each group is SIGKILLed at a random moment and restarted, for several rounds. The client's retry on
    UNAVAILABLE moves a call to the group's other replica within its deadline (without the retry, about
    1 in 500 searches failed)."""
    groups = Groups(fresh_database, tmp_path, {"a": 2, "b": 2}, "--snapshot-interval", "0.5")
    rng, pick = np.random.default_rng(11), random.Random(11)
    ids = [f"sku-{n}" for n in range(200)]
    acked: dict[str, State] = {}
    uncertain: dict[str, tuple[State, State]] = {}
    searches, acknowledged_writes = 0, 0
    failed_searches: list[Exception] = []
    failed_writes: list[Exception] = []
    probe = random_vector(rng)
    client = ShardMapClient(ChannelSettings(groups.seed, timeout=15.0), strict=True, refresh_seconds=1.0)
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
        for round_number in range(4):
            time.sleep(pick.uniform(0.5, 1.5))
            victims = [("a", pick.randrange(2)), ("b", pick.randrange(2))]
            for victim in victims:
                groups.kill(*victim)
                time.sleep(pick.uniform(0.0, 0.4))
            time.sleep(pick.uniform(0.1, 0.6))
            for victim in victims:
                groups.start(*victim)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    stubs = groups.stubs()
    wait_converged(stubs)
    # Every replica serves exactly its group's categories; together they hold the acknowledged state.
    placements = {p.category: p.group for p in stubs[0].GetShardMap(pb.GetShardMapRequest(), timeout=10).placements}
    assert set(placements.values()) == {"a", "b"}, "both groups got categories"
    for stub, group in zip(stubs, ["a", "a", "b", "b"]):
        assert {s.category for s in stub.GetStats(pb.GetStatsRequest(), timeout=10).shards} == {
            c for c, g in placements.items() if g == group}
    final = check_state(MapStub(client), acked, uncertain)
    for stub, group in zip(stubs, ["a", "a", "b", "b"]):
        mine = {c for c, g in placements.items() if g == group}
        expected = {i: s for i, s in final.items() if s is not None and s[0] in mine}
        assert all(holds(stub, i, s) for i, s in expected.items()), f"a replica of {group} misses an item"
        assert set(listing(stub, sorted(mine))) <= set(expected), f"a replica of {group} holds a deleted item"
    client.close()
    groups.close()
    assert not failed_searches, f"{len(failed_searches)} of {searches} searches failed: {failed_searches[:3]}"
    assert not failed_writes, f"{len(failed_writes)} writes failed: {failed_writes[:3]}"
    assert searches > 100 and acknowledged_writes > 50


def test_a_replica_on_an_empty_disk_serves_what_one_from_a_snapshot_does(fresh_database: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = {f"sku-{n}": random_vector(rng) for n in range(1500)}
    with running_service("lookalike.searcher", replica_args(tmp_path / "a", fresh_database)) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as client:
            items = [CatalogueItem(i, CATEGORIES[n % len(CATEGORIES)], v, MODEL) for n, (i, v) in enumerate(vectors.items())]
            store_in(items, client)
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


@contextmanager
def grouped_and_single(groups: Groups, data: Path, items: list[CatalogueItem],
                       refresh_seconds: float) -> Iterator[tuple[ShardMapClient, SearcherClient]]:
    """The replica groups through a shard-map client, and one SQLite searcher in `data`: both given `items`
    (the single searcher is the reference every grouped answer must equal). Closes all of it after."""
    with ExitStack() as stack:
        stack.callback(groups.close)
        port = stack.enter_context(running_service("lookalike.searcher", ["--data", str(data)]))[1]
        single = stack.enter_context(SearcherClient(f"127.0.0.1:{port}"))
        client = stack.enter_context(ShardMapClient(groups.seed, refresh_seconds=refresh_seconds))
        store_in(items, client, single)
        yield client, single


@pytest.fixture()
def two_groups(fresh_database: str, tmp_path: Path):
    """Groups a (2 replicas) and b (1) holding 1,500 items in 5 categories, and one SQLite searcher
    holding the same items: the reference every grouped answer must equal."""
    rng = np.random.default_rng(21)
    items = [CatalogueItem(f"sku-{n}", CATEGORIES[n % len(CATEGORIES)], random_vector(rng), MODEL, {"n": str(n)})
             for n in range(1500)]
    groups = Groups(fresh_database, tmp_path, {"a": 2, "b": 1})
    with grouped_and_single(groups, tmp_path / "single", items, refresh_seconds=0.5) as (client, single):
        wait_converged(groups.stubs())
        yield groups, client, single, rng


def answers(client, queries: list[np.ndarray]) -> list:
    routings = [Routing.all_shards(), Routing.explicit(["bags", "hats", "nope"]),
                Routing.by_probability([("bags", 0.5), ("coats", 0.3), ("hats", 0.2)], prior_weight=0.05)]
    result = []
    for query in queries:
        for routing in routings:
            response = client.search(query, MODEL, k=10, routing=routing.to_message(), ef=600)
            result.append(([(h.id, h.category, round(h.score, 4)) for h in response.hits],
                           sorted({p.category for p in response.probes}), list(response.unknown_categories)))
    return result


def test_groups_found_through_the_shard_map_answer_like_one_searcher(two_groups) -> None:
    groups, client, single, rng = two_groups
    shard_map = client.shard_map(refresh=True)
    assert {(g.name, g.target, g.live_replicas) for g in shard_map.groups} == {
        ("a", groups.target("a"), 2), ("b", groups.target("b"), 1)}
    assert {p.category for p in shard_map.placements} == set(CATEGORIES)
    assert {p.group for p in shard_map.placements} == {"a", "b"}, "rendezvous hashing used both groups"
    assert all(p.model_id == MODEL and p.dimension == DIM for p in shard_map.placements)
    queries = [random_vector(rng) for _ in range(10)]
    assert answers(client, queries) == answers(single, queries)
    assert client.stats().items == single.stats().items == 1500
    # Every group runs with the default limits: the lowest of each is that default.
    limits = client.limits()
    assert (limits.max_batch, limits.max_batch_queries, limits.max_k) == (1000, 256, 1000)


def test_a_whole_group_down_answers_with_the_rest_and_names_what_is_missing(two_groups) -> None:
    groups, client, _, rng = two_groups
    placed_on_b = sorted(c for c, g in client.placements.items() if g == ["b"])
    groups.kill("b", 0)
    query = random_vector(rng)
    response = client.search(query, MODEL, k=10, timeout=3)
    assert sorted(response.missing_shards) == placed_on_b
    assert response.hits and all(h.category not in placed_on_b for h in response.hits)
    # Stats leave b out as searches do (they raised UNAVAILABLE, and Lookalike.index asks for them first).
    on_a = set(CATEGORIES) - set(placed_on_b)
    assert {s.category for s in client.stats(timeout=2).shards} == on_a
    strict = ShardMapClient(groups.seed, strict=True)
    # The error names the group that failed.
    with pytest.raises(UnavailableError, match=f"replica group 'b' at {groups.target('b')}: "):
        strict.search(query, MODEL, k=10, timeout=3)
    with pytest.raises(UnavailableError, match=f"replica group 'b' at {groups.target('b')}: "):
        strict.stats(timeout=2)
    # Writes still succeed while any searcher is up, also for b's categories (the store is shared).
    item = CatalogueItem("while-b-is-down", placed_on_b[0], query, MODEL)
    assert client.upsert([item]).statuses[0].code == 0
    strict.close()
    # Once b has no live replica (15 s without a heartbeat), a new client's map places categories on b but
    # lists no target for it: b's shards are named missing the same way, and strict mode refuses.
    deadline = time.monotonic() + 40
    with ShardMapClient(groups.seed) as watcher:
        while "b" in {group.name for group in watcher.shard_map(refresh=True).groups}:
            assert time.monotonic() < deadline, "b stayed in the map"
            time.sleep(0.5)
    with ShardMapClient(groups.seed) as fresh, ShardMapClient(groups.seed, strict=True) as fresh_strict:
        assert sorted(fresh.search(query, MODEL, k=10, timeout=3).missing_shards) == placed_on_b
        with pytest.raises(UnavailableError, match="replica group 'b': no live replica in the shard map"):
            fresh_strict.search(query, MODEL, k=10, timeout=3)
    # The client that knew b drops it with the map that no longer lists it: b's shards are named missing at
    # once instead of after the search's retries on b, and its stats (without a timeout) leave b out.
    started = time.monotonic()
    assert sorted(client.search(query, MODEL, k=10, timeout=20).missing_shards) == placed_on_b
    assert time.monotonic() - started < 3 and "b" not in client.groups
    assert sorted(client.search_batch([search_request(query, MODEL, 10, None, 0)])[0].missing_shards) == placed_on_b
    assert {s.category for s in client.stats().shards} == on_a
    groups.start("b", 0)
    wait_converged(groups.stubs())
    # A searcher answers a moment before its first heartbeat puts it in the map, and the client searches
    # only the groups the map lists.
    deadline = time.monotonic() + 20
    while "b" not in {group.name for group in client.shard_map(refresh=True).groups}:
        assert time.monotonic() < deadline, "b did not come back to the map"
        time.sleep(0.2)
    assert client.search(query, MODEL, k=1, routing=Routing.explicit([placed_on_b[0]]).to_message()).hits[0].id == item.id


def test_moving_a_category_between_groups_keeps_every_answer(two_groups) -> None:
    groups, client, single, rng = two_groups
    queries = [random_vector(rng) for _ in range(6)]
    before = answers(client, queries)
    category = next(c for c, g in sorted(client.placements.items()) if g == ["a"])
    response = client.move(category, "b")
    assert (response.placement.group, response.placement.moving_to) == ("a", "b")
    deadline = time.monotonic() + 30
    while {p.category: p.group for p in client.shard_map(refresh=True).placements}[category] != "b":
        assert time.monotonic() < deadline, "the move did not complete"
        # Meanwhile searches keep working and answer the same.
        assert answers(client, queries[:1]) == before[:3]
        time.sleep(0.2)
    assert answers(client, queries) == before == answers(single, queries)
    # The old group drops the category after the grace period; b's replica serves it.
    stubs = groups.stubs()
    deadline = time.monotonic() + 15
    while any(category in {s.category for s in stub.GetStats(pb.GetStatsRequest(), timeout=5).shards}
              for stub in stubs[:2]):
        assert time.monotonic() < deadline, "group a kept the moved category"
        time.sleep(0.2)
    assert category in {s.category for s in stubs[2].GetStats(pb.GetStatsRequest(), timeout=5).shards}
    assert answers(client, queries) == before
    # Each replica's health name for the category follows it: b's replica took it up, a's let it go (told
    # just after the shard is dropped, so polled).
    def statuses() -> list[int]:
        found = []
        for port in [port for ports in groups.ports.values() for port in ports]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                found.append(health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=f"lookalike.v1.Searcher/{category}"), timeout=5).status)
        return found

    expected = [health_pb2.HealthCheckResponse.NOT_SERVING] * 2 + [health_pb2.HealthCheckResponse.SERVING]
    deadline = time.monotonic() + 10
    while statuses() != expected:
        assert time.monotonic() < deadline, f"health names {statuses()}, expected {expected}"
        time.sleep(0.2)


def test_move_category_refuses_what_it_cannot_do(two_groups, tmp_path: Path) -> None:
    _, client, single, _ = two_groups
    for category, group, code in (("nope", "b", grpc.StatusCode.NOT_FOUND), ("bags", "z", grpc.StatusCode.NOT_FOUND),
                                  ("", "b", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(LookalikeError) as refused:
            client.move(category, group)
        assert refused.value.code == code
    with pytest.raises(LookalikeError) as refused:
        call_with_retries(single.stub.MoveCategory, pb.MoveCategoryRequest(category="bags", group="b"),
                          single.settings, 5)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "SQLite" in refused.value.details
    assert client.search(random_vector(np.random.default_rng(0)), MODEL, k=3).hits, "still serving"


def test_lookalike_shards_prints_the_map_and_moves(two_groups) -> None:
    groups, client, _, _ = two_groups

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lookalike.tools.cli", "shards", "--searcher", groups.seed, *args],
                              capture_output=True, text=True, timeout=60)

    shown = cli("--json")
    assert shown.returncode == 0, shown.stderr
    import json

    document = json.loads(shown.stdout)
    assert {g["name"]: g["live_replicas"] for g in document["groups"]} == {"a": 2, "b": 1}
    assert {p["category"] for p in document["placements"]} == set(CATEGORIES)
    category = next(p["category"] for p in document["placements"] if p["group"] == "b")
    moved = cli("--move", category, "a")
    assert moved.returncode == 0 and moved.stdout.strip() == f"{category}: in group b, moving to a"
    refused = cli("--move", category, "nowhere")
    assert refused.returncode == 1 and "group 'nowhere' has no live replica" in refused.stderr
    text = cli()
    assert f"group a: 2 live replicas at {groups.target('a')}" in text.stdout


@pytest.mark.timeout(240)
def test_a_category_past_max_shard_items_splits_across_groups_and_answers_the_same(fresh_database: str,
                                                                                    tmp_path: Path) -> None:
    """300 items per category against --max-shard-items 200: each category splits into 3 parts by a hash
    of item id, placed on both groups; searched in parallel and merged, the answers equal one SQLite
    searcher's before, during and after the split, and for writes after it."""
    rng = np.random.default_rng(31)
    items = [CatalogueItem(f"sku-{n}", CATEGORIES[n % len(CATEGORIES)], random_vector(rng), MODEL) for n in range(1500)]
    groups = Groups(fresh_database, tmp_path, {"a": 1, "b": 1}, "--max-shard-items", "200", "--follow-interval", "0.3")
    with grouped_and_single(groups, tmp_path / "single", items, refresh_seconds=0.3) as (client, single):
        queries = [random_vector(rng) for _ in range(8)]
        expected = answers(single, queries)
        deadline = time.monotonic() + 60
        while True:
            placements = client.shard_map(refresh=True).placements
            if all(p.parts == 3 and not p.building for p in placements) and len(placements) == 3 * len(CATEGORIES):
                break
            assert time.monotonic() < deadline, f"no split: {[(p.category, p.part, p.parts, p.building) for p in placements]}"
            assert answers(client, queries) == expected  # searches keep their answers while the parts build
            time.sleep(0.3)
        assert {p.group for p in placements} == {"a", "b"}, "the parts spread over both groups"
        # `lookalike shards` shows each part and where it lives (it printed six lines of "bag: a" alike).
        import json

        shown = subprocess.run([sys.executable, "-m", "lookalike.tools.cli", "shards", "--searcher", groups.seed,
                                "--json"], capture_output=True, text=True, timeout=60)
        listed = {(p["category"], p["part"], p["parts"], p["building"]) for p in json.loads(shown.stdout)["placements"]}
        assert listed == {(c, part, 3, False) for c in CATEGORIES for part in range(3)}
        text = subprocess.run([sys.executable, "-m", "lookalike.tools.cli", "shards", "--searcher", groups.seed],
                              capture_output=True, text=True, timeout=60).stdout
        assert all(f"{c} part {n} of 3: " in text for c in CATEGORIES for n in (1, 2, 3)), text
        # Past --move-grace the whole shards are dropped: wait for it (a fixed sleep raced with slow rounds).
        deadline = time.monotonic() + 15
        while True:
            stats = client.stats()
            if {(s.category, s.parts) for s in stats.shards} == {(c, 3) for c in CATEGORIES}:
                break
            assert time.monotonic() < deadline, [(s.category, s.part, s.parts) for s in stats.shards]
            time.sleep(0.2)
        assert answers(client, queries) == expected
        assert stats.items == 1500 and all(s.items < 200 for s in stats.shards)
        # Writes after the split land in the right parts.
        more = [CatalogueItem(f"new-{n}", CATEGORIES[n % len(CATEGORIES)], random_vector(rng), MODEL) for n in range(200)]
        assert all(s.code == 0 for s in client.upsert(more).statuses)
        single.upsert(more)
        gone = [f"sku-{n}" for n in range(0, 1500, 9)]
        assert client.delete(gone).deleted == single.delete(gone).deleted == len(gone)
        wait_converged(groups.stubs())
        assert answers(client, queries) == answers(single, queries)
        assert client.stats().items == single.stats().items


def test_a_category_being_split_is_not_moved(fresh_database: str, tmp_path: Path) -> None:
    """A move asked while a category's parts are still building records nothing (the split's completion
    would drop the whole placement, and the move with it): the store hands back a building part, which
    MoveCategory refuses with FAILED_PRECONDITION."""
    from lookalike.searcher.store import ItemWrite, open_store

    store = open_store(fresh_database, tmp_path, "unused.sqlite3")
    try:
        store.upsert([ItemWrite(f"i{n}", "bags", random_vector(np.random.default_rng(n)), {}, MODEL) for n in range(4)],
                     "a")
        assert sum(placement.building for placement in store.split("bags", 2)) == 2
        answer = store.move("bags", "b")
        assert answer.building and answer.parts == 2
        assert not any(placement.moving_to for placement in store.placements())
    finally:
        store.close()


def test_a_replica_building_a_category_moved_to_it_keeps_applying_writes(fresh_database: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking up a category that moved into its group, a replica reads the category whole from the store (minutes
    for a large one). It did so holding its apply lock: meanwhile it applied nothing, writes through it waited
    past their deadlines and it stopped reporting alive. Now the build runs beside: with the build held open,
    a write through the replica is acknowledged, and a write made to the moving category meanwhile is in the
    shard once it is served. In process, over the test's PostgreSQL."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite

    def replica(group: str) -> Catalogue:
        return Catalogue(SearcherConfig(data_dir=tmp_path / group, store=fresh_database, group=group,
                                        snapshot_interval=0, probe_threads=1))

    rng = np.random.default_rng(5)
    a, b = replica("a"), replica("b")
    try:
        a.upsert([ItemWrite(f"c{n}", "C", random_vector(rng), {}, MODEL) for n in range(50)])
        a.heartbeat()
        b.heartbeat()
        a.move("C", "b")
        building, release = threading.Event(), threading.Event()
        build = Catalogue._build

        def held_open(catalogue: Catalogue, key: tuple, up_to: int) -> tuple:
            if catalogue is b and key[0] == "C":
                building.set()
                release.wait(30)
            return build(catalogue, key, up_to)

        monkeypatch.setattr(Catalogue, "_build", held_open)
        taking_up = threading.Thread(target=b.heartbeat)
        taking_up.start()
        assert building.wait(10)
        acknowledged: list[int] = []
        writing = threading.Thread(target=lambda: acknowledged.append(
            b.upsert([ItemWrite("d1", "D", random_vector(rng), {}, MODEL)])[1]))
        writing.start()
        writing.join(20)  # the build is held open for 30 s: a write that waits for it is still caught
        assert acknowledged, "the write waited for the build"
        a.upsert([ItemWrite("c-late", "C", random_vector(rng), {}, MODEL)])
        assert b.catch_up() > acknowledged[0]
        release.set()
        taking_up.join(30)
        assert len(b.shards[("C", 0, 1)]) == 51 and "c-late" in b.shards[("C", 0, 1)].label_of
    finally:
        release.set()
        a.close()
        b.close()


def store_item(item_id: str) -> "ItemWrite":
    from lookalike.searcher.store import ItemWrite

    vector = np.random.default_rng(len(item_id)).standard_normal(DIM).astype(np.float32)
    return ItemWrite(item_id, CATEGORIES[0], vector / np.linalg.norm(vector), {}, MODEL)


def test_writers_keep_their_order_under_a_repeatable_read_default(fresh_database: str) -> None:
    """A database whose default isolation is repeatable read (ALTER DATABASE ... SET
    default_transaction_isolation, a setting some administrators apply everywhere): the writers' transactions
    took their snapshot at the lock's statement and read a stale counter, and concurrent writes through two
    stores failed (serialization failures, duplicate keys). Each write now runs read committed whatever the
    default: every write is stored, each with its own sequence number."""
    import psycopg

    from lookalike.searcher.store import PostgresStore

    PostgresStore(fresh_database).close()  # the tables
    database = fresh_database.rsplit("/", 1)[1]
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {database} SET default_transaction_isolation = 'repeatable read'")
    stores = [PostgresStore(fresh_database) for _ in range(2)]
    failures: list[BaseException] = []

    def write(writer: int) -> None:
        for n in range(40):
            try:
                stores[writer % 2].upsert([store_item(f"w{writer}-{n}")])
            except Exception as error:  # noqa: BLE001 - counted and shown
                failures.append(error)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert failures == []
    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT seq) FROM items").fetchone() == (160, 160)


def test_connections_the_database_closed_are_replaced_before_use(fresh_database: str) -> None:
    """A restart of the database (here: every connection of the store terminated by the server, as a restart
    terminates them) left dead connections in the pool, and the next writes, one per pooled connection,
    failed UNAVAILABLE though the database was back. The pool now checks a connection before handing it
    out: the first write after succeeds."""
    import psycopg

    from lookalike.searcher.store import PostgresStore

    store = PostgresStore(fresh_database)
    try:
        readers = [threading.Thread(target=lambda: [store.head() for _ in range(30)]) for _ in range(6)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
                                 "current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert ended >= 2, "the pool held several connections"
        for n in range(6):
            store.upsert([store_item(f"after-{n}")])
        assert store.head() == 6
    finally:
        store.close()


@pytest.mark.parametrize("dsn_of, message", [
    (lambda dsn: dsn.rsplit("/", 1)[0] + "/no_such_database",
     r'refused the connection: .*database "no_such_database" does not exist'),
    (lambda dsn: re.sub(r"//[^@/]*@", "//nobody@", dsn),
     r'refused the connection: .*role "nobody" does not exist'),
    (lambda dsn: dsn + "?sslmod=require", r"store: .*invalid URI query parameter"),
])
def test_a_store_that_cannot_be_used_is_one_line_at_once(postgres_dsn: str, tmp_path: Path, dsn_of,
                                                         message: str) -> None:
    """A database or role that does not exist waited the whole --store-timeout and then said only that it could
    not connect (the cause in an earlier pool warning); a DSN parameter libpq does not know ended in a
    traceback. Each now ends the searcher at once with one line naming the cause, and exit status 1."""
    started = time.monotonic()
    ended = subprocess.run([sys.executable, "-m", "lookalike.searcher", "--data", str(tmp_path), "--store",
                            dsn_of(postgres_dsn), "--store-timeout", "60", "--address", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60)
    assert ended.returncode == 1
    assert time.monotonic() - started < 30
    lines = ended.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start:" in lines[0] and "Traceback" not in ended.stderr
    assert re.search(message, lines[0]), lines[0]


def test_a_role_that_may_not_create_the_tables_is_one_line(fresh_database: str, tmp_path: Path) -> None:
    """A role without CREATE on the database's schema ended start-up in a 27-line traceback
    (InsufficientPrivilege); now one line naming the store and the refusal."""
    import psycopg

    role = f"reader_{os.getpid()}"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        ended = subprocess.run([sys.executable, "-m", "lookalike.searcher", "--data", str(tmp_path), "--store",
                                re.sub(r"//[^@/]*@", f"//{role}@", fresh_database), "--address", "127.0.0.1:0"],
                               capture_output=True, text=True, timeout=60)
        lines = ended.stderr.strip().splitlines()
        assert ended.returncode == 1 and len(lines) == 1, ended.stderr
        assert re.search(r"cannot start: cannot set up the tables of the PostgreSQL store at .*: permission denied "
                         "for schema public", lines[0]), lines[0]
    finally:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")


def test_a_replica_reports_alive_while_writes_hold_its_apply_lock(fresh_database: str, tmp_path: Path) -> None:
    """Heartbeats went out from the follower after it had applied the log, and it waits for the apply lock that
    every write holds while applying its batch: under 24 bulk writers on 2 cores a replica went 38-93 s without
    one, past the 15 s after which the shard map takes it for gone, and searches lost its group's categories.
    They now go out from a thread of their own: with the apply lock held for twice the time a replica may stay
    silent (here 2 s instead of 15), the replica is still in the map. In process, over the test's PostgreSQL."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import PostgresStore

    replica = Catalogue(SearcherConfig(data_dir=tmp_path / "a", store=fresh_database, follow_interval=0.5,
                                       snapshot_interval=0, probe_threads=1))
    observer = PostgresStore(fresh_database)
    observer.LIVE_SECONDS = 2.0
    try:
        replica.start_background()
        replica.upsert([store_item("first")])
        with replica._apply_mutex:
            time.sleep(2 * observer.LIVE_SECONDS)
            assert [r.id for r in observer.live_replicas()] == [replica.replica_id]
    finally:
        observer.close()
        replica.close()


def test_a_store_whose_tables_were_dropped_says_so(fresh_database: str) -> None:
    """The database dropped and created again (or restored empty) under a running searcher: every write and
    stats call failed INTERNAL ('UndefinedTable') for good. Now UNAVAILABLE with what happened and the remedy."""
    import psycopg

    from lookalike.searcher.store import PostgresStore, StoreUnavailable

    store = PostgresStore(fresh_database)
    try:
        store.upsert([store_item("before")])
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        with pytest.raises(StoreUnavailable, match="has lost its tables .*relation .* does not exist.*: was the "
                                                   "database created again\\? Restart the searchers to set it up"):
            store.upsert([store_item("after")])
    finally:
        store.close()


def test_a_role_with_only_read_and_write_on_the_tables_runs_the_searcher(fresh_database: str,
                                                                         tmp_path: Path) -> None:
    """Least privilege: the tables created by their owner, the searcher's own role granted only SELECT, INSERT,
    UPDATE and DELETE on them. Start-up ran CREATE TABLE IF NOT EXISTS and ALTER TABLE every time, which need
    the privileges to create and own them, and failed; it now changes nothing in a current schema, and a
    write and a search through the searcher work."""
    import psycopg

    from lookalike.searcher.store import PostgresStore

    PostgresStore(fresh_database).close()  # the owner sets the schema up
    role = f"writer_{os.getpid()}"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        dsn = re.sub(r"//[^@/]*@", f"//{role}@", fresh_database)
        with running_service("lookalike.searcher", replica_args(tmp_path / "r", dsn)) as (_, port):
            with SearcherClient(f"127.0.0.1:{port}") as client:
                vector = np.frombuffer(random_vector(np.random.default_rng(1)).tobytes(), np.float32)
                client.upsert([CatalogueItem("only", CATEGORIES[0], vector, MODEL)])
                assert [hit.id for hit in client.search(vector, MODEL, k=1).hits] == ["only"]
    finally:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
