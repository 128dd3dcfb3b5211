"""Durability and concurrency: SIGKILL at random moments, and parallel search/upsert/delete."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
import pytest

from lookalike.tools.processes import running_service
from lookalike.codec import pack_vector
from lookalike.v1 import common_pb2, searcher_pb2 as pb, searcher_pb2_grpc
from tests.conftest import start_searcher

DIM = 24
CATEGORIES = ["bags", "boots", "coats", "hats", "shirts"]
MODEL = "test-model@0"

State = tuple[str, bytes] | None  # (category, vector bytes), or None when deleted / never stored


def random_vector(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def listing(stub: searcher_pb2_grpc.SearcherStub, categories: Sequence[str] = CATEGORIES) -> dict[str, str]:
    """id -> category of every stored item. k and ef far above every shard's size make hnswlib visit all of
    it: with k alone, a shard with many deleted slots can yield fewer live items than it holds."""
    found: dict[str, str] = {}
    probe = pack_vector(np.ones(DIM, np.float32))
    for category in categories:
        response = stub.Search(pb.SearchRequest(vector=probe, model_id=MODEL, k=1000, ef=4000,
                                                routing=pb.Routing(explicit=pb.ExplicitRouting(categories=[category]))),
                               timeout=30)
        for hit in response.hits:
            assert hit.id not in found, f"{hit.id} is stored twice"
            found[hit.id] = hit.category
    return found


def holds(stub: searcher_pb2_grpc.SearcherStub, item_id: str, state: State) -> bool:
    """True when the searcher's item `item_id` is exactly `state` (its category and its latest vector)."""
    if state is None:
        return False
    category, vector = state
    response = stub.Search(pb.SearchRequest(vector=common_pb2.Vector(values=vector, dimension=DIM), model_id=MODEL, k=1,
                                            routing=pb.Routing(explicit=pb.ExplicitRouting(categories=[category]))),
                           timeout=30)
    return bool(response.hits) and response.hits[0].id == item_id and response.hits[0].similarity > 0.9999


def check_state(stub: searcher_pb2_grpc.SearcherStub, acked: dict[str, State],
                uncertain: dict[str, tuple[State, State]]) -> dict[str, State]:
    """Every acknowledged state is served exactly; in-flight ids are in one of their two states.

    Returns the observed state of every id, to be the next round's acknowledged baseline.
    """
    stored = listing(stub)
    observed: dict[str, State] = {}
    for item_id in set(acked) | set(uncertain):
        options = uncertain.get(item_id, (acked.get(item_id),))
        present = [state for state in options if state is not None and holds(stub, item_id, state)]
        # Asked for by its own vector, not only by the listing's one probe: in a shard with many replaced
        # deleted slots hnswlib's graph can leave a stored item out of a generic query's reach.
        if item_id in stored or present:
            assert present, f"{item_id} is stored but matches none of {len(options)} acceptable states"
            observed[item_id] = present[0]
        else:
            assert None in options, f"acknowledged item {item_id} was lost"
            observed[item_id] = None
    unexpected = set(stored) - {i for i, s in observed.items() if s is not None}
    assert not unexpected, f"items that should not exist came back: {sorted(unexpected)[:5]}"
    return observed


def killed(catalogue: object) -> None:
    """An in-process catalogue gone as a killed process goes: no final snapshot; its store and its data folder's
    lock released, as the kernel releases a dead process's files."""
    catalogue.store.close()  # type: ignore[attr-defined]
    catalogue._data_lock.close()  # type: ignore[attr-defined]


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pick = random.Random(7)
    ids = [f"sku-{n}" for n in range(240)]
    acked: dict[str, State] = {}
    uncertain: dict[str, tuple[State, State]] = {}
    rounds, acknowledged_writes = 6, 0
    for round_number in range(rounds):
        args = ["--data", str(tmp_path), "--snapshot-interval", "0.25", "--initial-capacity", "16"]
        with running_service("lookalike.searcher", args) as (process, port):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = searcher_pb2_grpc.SearcherStub(channel)
            acked = check_state(stub, acked, uncertain)
            uncertain = {}
            stop = threading.Event()

            def write_until_killed() -> None:
                nonlocal acknowledged_writes
                while not stop.is_set():
                    chosen = pick.sample(ids, pick.randint(1, 12))
                    if pick.random() < 0.7:
                        new = {i: (pick.choice(CATEGORIES), random_vector(rng).tobytes()) for i in chosen}
                        request = pb.UpsertRequest(items=[
                            pb.Item(id=i, category=c, vector=common_pb2.Vector(values=v, dimension=DIM), model_id=MODEL)
                            for i, (c, v) in new.items()])
                        call = lambda: stub.Upsert(request, timeout=10)  # noqa: E731
                    else:
                        new = {i: None for i in chosen}
                        call = lambda: stub.Delete(pb.DeleteRequest(ids=chosen), timeout=10)  # noqa: E731
                    for item_id, state in new.items():
                        uncertain[item_id] = (acked.get(item_id), state)
                    try:
                        response = call()
                    except grpc.RpcError:
                        return  # killed mid-request: these ids stay uncertain
                    if isinstance(response, pb.UpsertResponse):
                        assert all(s.code == 0 for s in response.statuses)
                    for item_id, state in new.items():
                        acked[item_id] = state
                        del uncertain[item_id]
                    acknowledged_writes += 1

            writer = threading.Thread(target=write_until_killed)
            writer.start()
            time.sleep(pick.uniform(0.4, 1.6))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            stop.set()
            writer.join(30)
            channel.close()
    with running_service("lookalike.searcher", ["--data", str(tmp_path)]) as (_, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            final = check_state(searcher_pb2_grpc.SearcherStub(channel), acked, uncertain)
    assert acknowledged_writes > 50, "too few writes happened between kills to prove anything"
    assert sum(state is not None for state in final.values()) > 20


@pytest.mark.timeout(120)
def test_parallel_search_upsert_delete_end_in_the_acknowledged_state(tmp_path: Path) -> None:
    started, channel = start_searcher(tmp_path, snapshot_interval=0.2, initial_capacity=16)
    stub = searcher_pb2_grpc.SearcherStub(channel)
    deadline = time.monotonic() + 4.0
    errors: list[BaseException] = []
    final: dict[str, State] = {}
    lock = threading.Lock()

    def writer(worker: int) -> None:
        rng, pick = np.random.default_rng(worker), random.Random(worker)
        own = [f"w{worker}-{n}" for n in range(80)]
        try:
            while time.monotonic() < deadline:
                chosen = pick.sample(own, pick.randint(1, 10))
                if pick.random() < 0.75:
                    new = {i: (pick.choice(CATEGORIES), random_vector(rng).tobytes()) for i in chosen}
                    response = stub.Upsert(pb.UpsertRequest(items=[
                        pb.Item(id=i, category=c, vector=common_pb2.Vector(values=v, dimension=DIM), model_id=MODEL)
                        for i, (c, v) in new.items()]), timeout=10)
                    assert all(s.code == 0 for s in response.statuses)
                else:
                    new = {i: None for i in chosen}
                    stub.Delete(pb.DeleteRequest(ids=chosen), timeout=10)
                with lock:
                    final.update(new)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader(worker: int) -> None:
        rng = np.random.default_rng(100 + worker)
        try:
            while time.monotonic() < deadline:
                routing = None if worker % 2 else pb.Routing(explicit=pb.ExplicitRouting(categories=CATEGORIES[:2]))
                response = stub.Search(pb.SearchRequest(vector=pack_vector(random_vector(rng)), model_id=MODEL, k=10,
                                                        routing=routing), timeout=10)
                assert len({h.id for h in response.hits}) == len(response.hits), "duplicate ids in one answer"
                scores = [h.score for h in response.hits]
                assert scores == sorted(scores, reverse=True)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.OK:
                errors.append(error)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    check_state(stub, final, {})
    started.stop(None)
    # And the same after a restart from the final snapshot.
    started, channel = start_searcher(tmp_path, snapshot_interval=0)
    check_state(searcher_pb2_grpc.SearcherStub(channel), final, {})
    started.stop(None)


def test_a_sigterm_sent_as_soon_as_the_server_says_it_listens_stops_it_gracefully(tmp_path: Path) -> None:
    """The ready line is printed after the signal handlers are installed: a SIGTERM sent the moment a caller
    reads it takes the graceful path (exit 0, the final snapshot), never the default action's kill."""
    lines: list[str] = []
    with running_service("lookalike.searcher", ["--data", str(tmp_path)], log_lines=lines) as (process, _):
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert any("signal 15: shutting down" in line for line in lines), "".join(lines[-20:])


def test_removals_pruned_while_a_shard_is_built_do_not_bring_deleted_items_back(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica loads a snapshot, then reads the removals after it; another replica prunes those removals in
    between (its own snapshot covers them). The build must notice and start from the items alone: before, the
    pruned delete was never replayed and the deleted item was served for good. The prune is forced at that
    moment; SQLite stands in for the shared store."""
    from lookalike.routing import Routing
    from lookalike.searcher.catalogue import Catalogue, SearchQuery
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite, SqliteStore

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    rng = np.random.default_rng(0)
    deleted, kept = random_vector(rng), random_vector(rng)
    first = Catalogue(config)
    first.upsert([ItemWrite("X", "C", deleted, {}, MODEL), ItemWrite("Y", "C", kept, {}, MODEL)])
    assert first.snapshot() == 1  # C's snapshot holds X
    first.delete(["X"])
    killed(first)  # gone without a final snapshot: C's snapshot still holds X

    reading = SqliteStore.removals_after

    def pruned_just_before(store: SqliteStore, category: str, after: int, up_to: int) -> list:
        store.prune_tombstones(category, store.head())
        return reading(store, category, after, up_to)

    monkeypatch.setattr(SqliteStore, "removals_after", pruned_just_before)
    second = Catalogue(config)
    monkeypatch.setattr(SqliteStore, "removals_after", reading)
    try:
        hits = second.search(SearchQuery(deleted, MODEL, 5, routing=Routing())).hits
        assert [hit.id for hit in hits] == ["Y"]
    finally:
        second.close()


def test_snapshot_passes_never_save_a_shard_twice_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown's final snapshot pass may start while a background pass is still saving (its join gives up
    after a while): two saves of one shard in one folder deleted each other's files (FileNotFoundError, the
    rest of the shards left unsaved). Passes now take turns; each save is made slow to hold the window open."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.shard import Shard
    from lookalike.searcher.store import ItemWrite

    catalogue = Catalogue(SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1))
    rng = np.random.default_rng(1)
    catalogue.upsert([ItemWrite(f"{category}-{n}", category, random_vector(rng), {}, MODEL)
                      for category in CATEGORIES[:2] for n in range(20)])
    saving, most_at_once, errors = [0], [0], []
    save = Shard.save

    def slow_save(shard: Shard, directory: Path, store_id: int) -> None:
        saving[0] += 1
        most_at_once[0] = max(most_at_once[0], saving[0])
        time.sleep(0.3)
        try:
            save(shard, directory, store_id)
        finally:
            saving[0] -= 1

    def snapshot() -> None:
        try:
            catalogue.snapshot()
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    monkeypatch.setattr(Shard, "save", slow_save)
    passes = [threading.Thread(target=snapshot) for _ in range(2)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    monkeypatch.setattr(Shard, "save", save)
    assert not errors and most_at_once[0] == 1
    catalogue.close()
    reopened = Catalogue(SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1))
    try:
        assert sum(len(shard) for shard in reopened.shards.values()) == 40
        assert all(shard.applied_seq == reopened.applied_seq for shard in reopened.shards.values())
    finally:
        reopened.close()


def test_a_store_that_lost_its_last_writes_is_followed_from_its_items_again(tmp_path: Path) -> None:
    """The store's log ends before what a running replica applied (a failover that lost commits; here the
    SQLite file is put back to a copy taken earlier): the replica's follower must not skip the writes that
    now reuse those sequence numbers. It rebuilds every shard from the store's items and deletes its
    snapshots, which hold the lost writes; the next writes are served, and so after a restart."""
    import shutil
    import sqlite3

    from lookalike.routing import Routing
    from lookalike.searcher.catalogue import Catalogue, SearchQuery
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite, SqliteStore

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    rng = np.random.default_rng(2)
    query = random_vector(rng)

    def served(catalogue: Catalogue) -> list[str]:
        return sorted(hit.id for hit in catalogue.search(SearchQuery(query, MODEL, 10, routing=Routing())).hits)

    catalogue = Catalogue(config)
    catalogue.upsert([ItemWrite("X", "C", random_vector(rng), {}, MODEL)])  # sequence 1
    database = tmp_path / "catalogue.sqlite3"
    source, copy = sqlite3.connect(database), sqlite3.connect(tmp_path / "earlier.sqlite3")
    source.backup(copy)
    source.close()
    copy.close()
    catalogue.upsert([ItemWrite(i, "C", random_vector(rng), {}, MODEL) for i in ("Y", "Z")])  # 2, 3: to be lost
    catalogue.snapshot()
    catalogue.store.close()
    shutil.copy(tmp_path / "earlier.sqlite3", database)
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    catalogue.store = SqliteStore(database)
    catalogue.catch_up()  # what the follower does each round
    assert served(catalogue) == ["X"] and catalogue.applied_seq == 1
    assert catalogue.upsert([ItemWrite("W", "C", random_vector(rng), {}, MODEL)])[1] == 2  # reuses sequence 2
    assert catalogue.upsert([ItemWrite("V", "C", random_vector(rng), {}, MODEL)])[1] == 3
    assert served(catalogue) == ["V", "W", "X"]
    killed(catalogue)
    restarted = Catalogue(config)
    try:
        assert served(restarted) == ["V", "W", "X"]
    finally:
        restarted.close()


def test_a_shard_whose_labels_are_mostly_of_removed_items_is_rebuilt_compact(tmp_path: Path) -> None:
    """Labels are never reused, and the exact-search table, the id list and the filter columns are sized by
    label: a catalogue replacing its items under new ids grew in memory with every item ever added. A shard
    holding 200 items after 2,000 labels given is rebuilt from the store with 200, answering as before, the
    removed items staying removed; its snapshot and a restart keep the compact form."""
    from lookalike.routing import Routing
    from lookalike.searcher.catalogue import Catalogue, SearchQuery
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    rng = np.random.default_rng(3)
    catalogue = Catalogue(config)
    for generation in range(10):
        catalogue.upsert([ItemWrite(f"g{generation}-{n}", "C", random_vector(rng), {"generation": str(generation)},
                                    MODEL) for n in range(200)])
        if generation:
            catalogue.delete([f"g{generation - 1}-{n}" for n in range(200)])
    shard = catalogue.shards[("C", 0, 1)]
    assert (len(shard), shard.next_label) == (200, 2000)
    queries = [random_vector(rng) for _ in range(20)]

    def answers(searcher: Catalogue) -> list[list[str]]:
        return [[hit.id for hit in searcher.search(SearchQuery(query, MODEL, 10, routing=Routing())).hits]
                for query in queries]

    before = answers(catalogue)
    assert catalogue.compact() == 1 and catalogue.compact() == 0
    compacted = catalogue.shards[("C", 0, 1)]
    assert (len(compacted), compacted.next_label) == (200, 200)
    assert answers(catalogue) == before and all(hit.startswith("g9-") for answer in before for hit in answer)
    assert compacted.attributes["g9-7"] == {"generation": "9"}
    catalogue.close()
    restarted = Catalogue(config)
    try:
        assert restarted.shards[("C", 0, 1)].next_label == 200 and answers(restarted) == before
    finally:
        restarted.close()


def test_a_sigterm_while_starting_ends_the_server_at_once(tmp_path: Path) -> None:
    """A server is its container's PID 1, which ignores a signal it has no handler for: a pod deleted while its
    searcher waited for PostgreSQL (or rebuilt shards) sat out its whole grace period. The server handles
    SIGTERM from the start of main and exits at once with 143 (here: a store that never answers, 30 s of
    waiting allowed). The handler shows in /proc's caught-signal mask before the signal is sent."""
    import subprocess
    import sys

    from lookalike.tools.processes import free_port

    store = f"postgresql://lookalike@127.0.0.1:{free_port()}/nothing"
    process = subprocess.Popen([sys.executable, "-m", "lookalike.searcher", "--data", str(tmp_path), "--store", store,
                                "--store-timeout", "30", "--address", "127.0.0.1:0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = Path(f"/proc/{process.pid}/status").read_text()
            caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
            if caught & (1 << (signal.SIGTERM - 1)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the searcher never installed a SIGTERM handler")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 5
        assert "signal 15 while starting: exiting" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_a_snapshot_save_that_stops_between_its_files_leaves_the_last_one_whole(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot files were named by sequence alone. A compacted shard (new labels, same sequence) saved over the
    current snapshot replaced its index first; stopped before the labels were written (a full disk, a kill),
    CURRENT named the new index beside the old labels: searches answered ids of None, or failed for good."""
    from lookalike.routing import Routing
    from lookalike.searcher import shard as shard_module
    from lookalike.searcher.catalogue import Catalogue, SearchQuery
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.shard import Shard
    from lookalike.searcher.store import ItemWrite

    config = SearcherConfig(data_dir=tmp_path / "data", snapshot_interval=0, probe_threads=1, exact_below=0)
    rng = np.random.default_rng(4)
    catalogue = Catalogue(config)
    try:
        for generation in range(5):  # 3,000 labels given for 600 items: compacted
            catalogue.upsert([ItemWrite(f"g{generation}-{n}", "C", random_vector(rng), {}, MODEL) for n in range(600)])
            if generation:
                catalogue.delete([f"g{generation - 1}-{n}" for n in range(600)])
        folder = tmp_path / "snapshot"
        catalogue.shards[("C", 0, 1)].save(folder, catalogue.store_id)
        query = random_vector(rng)
        before = [hit.id for hit in catalogue.search(SearchQuery(query, MODEL, 10, routing=Routing())).hits]
        assert catalogue.compact() == 1
        compacted = catalogue.shards[("C", 0, 1)]
        writing = shard_module._write_durably

        def full_disk_for_labels(path: Path, data: bytes) -> None:
            if path.name.startswith("meta-"):
                raise OSError(28, "No space left on device")
            writing(path, data)

        monkeypatch.setattr(shard_module, "_write_durably", full_disk_for_labels)
        with pytest.raises(OSError, match="No space left"):
            compacted.save(folder, catalogue.store_id)
        monkeypatch.setattr(shard_module, "_write_durably", writing)
        loaded = Shard.load(folder, catalogue.settings)
        assert loaded is not None
        found = loaded.search(query, 10, 256)
        assert [item_id for item_id, *_ in found.hits] == before
    finally:
        catalogue.close()


def test_snapshots_of_categories_the_store_does_not_know_are_deleted_at_start(tmp_path: Path) -> None:
    """A database put back from a backup taken before category B: B's snapshot stayed on disk, and once B was
    written again past its sequence, a restart took it for current, serving the lost items and not the new."""
    import shutil
    import sqlite3

    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    rng = np.random.default_rng(5)
    catalogue = Catalogue(config)
    catalogue.upsert([ItemWrite("a", "A", random_vector(rng), {}, MODEL)])
    database = tmp_path / "catalogue.sqlite3"
    source, backup = sqlite3.connect(database), sqlite3.connect(tmp_path / "backup.sqlite3")
    source.backup(backup)
    source.close()
    backup.close()
    catalogue.upsert([ItemWrite(f"lost-{n}", "B", random_vector(rng), {}, MODEL) for n in range(5)])
    catalogue.close()  # B's snapshot holds the items about to be lost
    b_snapshot = catalogue._snapshot_dir(("B", 0, 1))
    assert b_snapshot.is_dir()
    shutil.copy(tmp_path / "backup.sqlite3", database)
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    restarted = Catalogue(config)
    try:
        assert set(restarted.shards) == {("A", 0, 1)} and not b_snapshot.exists()
        restarted.upsert([ItemWrite(f"new-{n}", "B", random_vector(rng), {}, MODEL) for n in range(8)])
        killed(restarted)  # B's new items are in the store only
        again = Catalogue(config)
        try:
            assert sorted(again.shards[("B", 0, 1)].label_of) == [f"new-{n}" for n in range(8)]
        finally:
            again.close()
    finally:
        if not restarted._data_lock.closed:  # an assertion failed before it was killed
            killed(restarted)


def test_a_second_searcher_on_one_data_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two searchers over one data folder both started: each wrote the other's snapshots and missed the other's
    writes (an item deleted through one was still served by the other). The second is refused, naming the
    folder; a shutdown whose final snapshot fails still closes the store and frees the folder."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.shard import Shard
    from lookalike.searcher.store import ItemWrite

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    first = Catalogue(config)
    with pytest.raises(OSError, match=f"another searcher is using the data folder {tmp_path}"):
        Catalogue(config)
    first.upsert([ItemWrite("a", "A", random_vector(np.random.default_rng(6)), {}, MODEL)])

    def unwritable(shard: Shard, directory: Path, store_id: int) -> None:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(Shard, "save", unwritable)
    with pytest.raises(PermissionError):
        first.close()
    monkeypatch.undo()
    second = Catalogue(config)  # the folder was freed, the store closed in order
    try:
        assert second.stats().items == 1
    finally:
        second.close()


def test_reading_a_category_page_by_page_holds_up_no_write(tmp_path: Path) -> None:
    """A shard built from the store (a start, a compaction) read its category in one transaction while it
    filled hnswlib: over SQLite every write waited for the whole build (a 40,000-item compaction held a
    one-item write for 18 s). Now each page is its own transaction: a write goes through between pages,
    and the pages still give every item once, in write order."""
    from lookalike.searcher.store import ItemWrite, SqliteStore

    store = SqliteStore(tmp_path / "catalogue.sqlite3")
    rng = np.random.default_rng(7)
    try:
        store.upsert([ItemWrite(f"c{n}", "C", random_vector(rng), {}, MODEL) for n in range(250)])
        head = store.head()
        reading = store.items_after("C", 0, head, page=100)
        first = next(reading)  # the build has begun
        writer = threading.Thread(target=store.upsert, args=([ItemWrite("d", "D", random_vector(rng), {}, MODEL)],))
        writer.start()
        writer.join(timeout=10)
        assert not writer.is_alive(), "the write waited for the reading to end"
        rest = list(reading)
        assert [item.id for item in [first, *rest]] == [f"c{n}" for n in range(250)]
        assert store.head() == head + 1
    finally:
        store.close()


def test_snapshots_of_another_database_are_not_taken_for_current(tmp_path: Path) -> None:
    """A database created again (a PostgreSQL cluster re-created under replicas that keep their disks) starts
    its sequence again: a snapshot of the old one passed for current once the new log grew past it, serving
    the old database's items beside the new one's. Each snapshot now names its database."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.store import ItemWrite, SqliteStore

    config = SearcherConfig(data_dir=tmp_path, snapshot_interval=0, probe_threads=1)
    rng = np.random.default_rng(8)
    old = Catalogue(config)
    old.upsert([ItemWrite(f"old-{n}", "A", random_vector(rng), {}, MODEL) for n in range(3)])
    old.close()  # A's snapshot at sequence 1
    database = tmp_path / "catalogue.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    created_again = SqliteStore(database)  # written by another replica before this one starts again
    for n in range(3):
        created_again.upsert([ItemWrite(f"new-{n}", "A", random_vector(rng), {}, MODEL)])
    created_again.close()
    restarted = Catalogue(config)
    try:
        assert sorted(restarted.shards[("A", 0, 1)].label_of) == ["new-0", "new-1", "new-2"]
    finally:
        restarted.close()


FULL_DISK_SAVE = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from lookalike.searcher.shard import IndexSettings, Shard

folder = Path(sys.argv[1])
rng = np.random.default_rng(5)
vectors = rng.normal(size=(3000, 64)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
shard = Shard("C", "m@0", 64, IndexSettings())
shard.apply(1, ids=[f"a{n}" for n in range(2000)], vectors=vectors[:2000], attributes=[{}] * 2000)
shard.save(folder, 7)
shard.apply(2, ids=[f"b{n}" for n in range(1000)], vectors=vectors[2000:], attributes=[{}] * 1000)
# A disk with room for the labels but not the index: writes past 256 KB fail with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    shard.save(folder, 7)
except Exception as error:
    print("refused:", type(error).__name__, error)
else:
    print("saved")
"""


def test_an_index_cut_short_by_a_full_disk_is_refused_and_the_last_snapshot_kept(tmp_path: Path) -> None:
    """hnswlib wrote its index through a stream whose failures it never checked: on a full disk the save went on,
    CURRENT named a truncated index and the last good snapshot was deleted; the next start failed to load it and
    rebuilt the shard from the store."""
    import subprocess
    import sys

    from lookalike.searcher.shard import IndexSettings, Shard

    folder = tmp_path / "snapshot"
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(folder)], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.startswith("refused:"), done.stdout + done.stderr
    loaded = Shard.load(folder, IndexSettings())
    assert loaded is not None and len(loaded) == 2000 and loaded.applied_seq == 1


def test_a_snapshot_changed_on_disk_is_rebuilt_from_the_store(tmp_path: Path) -> None:
    """A flipped byte in a snapshot's index (a vector, a graph link) loaded silently and answered wrong for good."""
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.shard import CURRENT
    from lookalike.searcher.store import ItemWrite

    config = SearcherConfig(data_dir=tmp_path / "data", snapshot_interval=0, probe_threads=1, exact_below=0)
    rng = np.random.default_rng(6)
    vectors = {f"i{n}": random_vector(rng) for n in range(300)}
    catalogue = Catalogue(config)
    try:
        catalogue.upsert([ItemWrite(item_id, "C", vector, {}, MODEL) for item_id, vector in vectors.items()])
    finally:
        catalogue.close()  # writes the snapshot
    folder = next((tmp_path / "data").rglob(CURRENT)).parent
    index = folder / json.loads((folder / CURRENT).read_text())["index"]
    data = bytearray(index.read_bytes())
    stored = vectors["i7"]
    at = data.find(stored.tobytes()) + 4 * int(np.argmax(np.abs(stored))) + 3
    data[at] ^= 0x80  # the sign bit of the vector's largest component
    index.write_bytes(bytes(data))
    catalogue = Catalogue(config)
    try:
        shard = catalogue.shards[("C", 0, 1)]
        assert len(shard) == 300
        for item_id, vector in vectors.items():
            found = shard.search(vector, 1, 64).hits
            assert found[0][0] == item_id and found[0][1] > 0.9999, item_id
    finally:
        catalogue.close()
