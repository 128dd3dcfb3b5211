"""Scale-out: three real searcher processes behind the sharded client answer exactly like one searcher."""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lookalike.tools.processes import running_service
from lookalike.client.connection import UnavailableError
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request
from lookalike.client.shard_map import ShardMapClient
from lookalike.client.sharded import ShardedSearcherClient, owner_of, statefulset_targets
from tests.conftest import start_searcher

EXHAUSTIVE_EF = 400  # above every grocery shard's size: both sides search exactly, so answers must match


def test_rendezvous_hashing_is_stable_and_moves_little() -> None:
    categories = [f"category-{i}" for i in range(400)]
    three = [owner_of(c, 3) for c in categories]
    assert three == [owner_of(c, 3) for c in categories]
    assert set(three) == {0, 1, 2} and min(three.count(i) for i in range(3)) > 100
    four = [owner_of(c, 4) for c in categories]
    moved = [c for c, a, b in zip(categories, three, four) if a != b]
    assert all(owner_of(c, 4) == 3 for c in moved), "growing only moves categories to the new pod"
    assert 60 < len(moved) < 140
    assert statefulset_targets("searcher", 2, namespace="shop") == [
        "searcher-0.searcher.shop.svc:50052", "searcher-1.searcher.shop.svc:50052"]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory, grocery_embeddings: dict):
    data = grocery_embeddings
    items = [CatalogueItem(image.item_id, image.category, vector, data["model_id"], {"label": image.label})
             for image, vector in zip(data["catalogue"], data["catalogue_vectors"])]
    with ExitStack() as stack:
        ports = [stack.enter_context(running_service("lookalike.searcher", ["--data", str(tmp_path_factory.mktemp(f"pod{i}"))]))[1]
                 for i in range(3)]
        single_server, channel = start_searcher(tmp_path_factory.mktemp("single"), snapshot_interval=0)
        stack.callback(single_server.stop, None)
        stack.callback(channel.close)
        single = stack.enter_context(SearcherClient(f"127.0.0.1:{single_server.port}"))
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{port}" for port in ports]))
        for start in range(0, len(items), 500):
            assert all(s.code == 0 for s in single.upsert(items[start:start + 500]).statuses)
            assert all(s.code == 0 for s in sharded.upsert(items[start:start + 500]).statuses)
        yield single, sharded


def test_each_pod_holds_only_the_categories_it_owns(clusters) -> None:
    single, sharded = clusters
    for ordinal, pod in enumerate(sharded.pods):
        assert all(owner_of(shard.category, 3) == ordinal for shard in pod.stats().shards)
    assert sharded.stats().items == single.stats().items == 2640
    # Shards left empty by another test of this module (a category created, then its item deleted) do not count.
    assert [s.category for s in sharded.stats().shards if s.items] == [s.category for s in single.stats().shards]


def answer(client, vector: np.ndarray, model_id: str, routing) -> tuple:
    response = client.search(vector, model_id, k=15, routing=routing, ef=EXHAUSTIVE_EF)
    return ([(h.id, round(h.score, 4), h.category) for h in response.hits], [p.category for p in response.probes],
            list(response.unknown_categories))


def test_sharded_answers_equal_a_single_searcher(clusters, grocery_embeddings: dict) -> None:
    single, sharded = clusters
    data = grocery_embeddings
    for row in range(20):
        vector = data["query_vectors"][row]
        pairs = list(zip(data["labels"], map(float, data["query_probabilities"][row])))
        routings = [routing_for(), routing_for(categories=["Apple", "Milk", "Juice", "Nope"]),
                    routing_for(probabilities=pairs), routing_for(probabilities=pairs, threshold=0.99, max_shards=6),
                    routing_for(probabilities=pairs, prior_weight=0.05)]
        for routing in routings:
            expected = answer(single, vector, data["model_id"], routing)
            assert answer(sharded, vector, data["model_id"], routing) == expected
            assert expected[0], "every routing finds something"


def test_moving_an_item_to_a_category_on_another_pod_and_deleting_it(clusters, grocery_embeddings: dict) -> None:
    _, sharded = clusters
    data = grocery_embeddings
    image, vector = data["catalogue"][0], data["catalogue_vectors"][0]
    target = next(c for c in sorted({i.category for i in data["catalogue"]})
                  if owner_of(c, 3) != owner_of(image.category, 3))
    sharded.upsert([CatalogueItem(image.item_id, target, vector, data["model_id"])])
    everywhere = sharded.search(vector, data["model_id"], k=3, ef=EXHAUSTIVE_EF)
    assert everywhere.hits[0].id == image.item_id and everywhere.hits[0].category == target
    assert [h.id for h in everywhere.hits].count(image.item_id) == 1, "the old copy was removed"
    deleted = sharded.delete([image.item_id, "never-stored"])
    assert deleted.deleted == 1 and list(deleted.missing) == ["never-stored"]
    assert image.item_id not in {h.id for h in sharded.search(vector, data["model_id"], k=5).hits}
    assert list(sharded.upsert([]).statuses) == []  # nothing to send: no pod is asked
    # Put back as it was, so the module's other tests see the catalogue the fixture built, in any order.
    sharded.upsert([CatalogueItem(image.item_id, image.category, vector, data["model_id"], {"label": image.label})])


def test_a_category_another_client_creates_is_searched_once_the_cache_ages(clusters, grocery_embeddings: dict) -> None:
    """The category list is cached; a category created through another client (another process indexing) was
    never searched by this one, nor known to explicit routing. Now the list is read again after refresh_seconds."""
    _, sharded = clusters
    data = grocery_embeddings
    vector, model_id = data["catalogue_vectors"][1], data["model_id"]
    assert "Brand new" not in sharded.categories()
    with ShardedSearcherClient([pod.settings.target for pod in sharded.pods]) as other:
        assert other.upsert([CatalogueItem("fresh-1", "Brand new", vector, model_id)]).statuses[0].code == 0
    sharded.refresh_seconds = 0.2
    try:
        time.sleep(0.3)
        found = sharded.search(vector, model_id, k=3, routing=routing_for(categories=["Brand new"]))
        assert [h.id for h in found.hits] == ["fresh-1"] and not found.unknown_categories
        assert "fresh-1" in {h.id for h in sharded.search(vector, model_id, k=3, ef=EXHAUSTIVE_EF).hits}
    finally:
        sharded.refresh_seconds = 10.0
        sharded.delete(["fresh-1"])


def test_plans_over_several_pods_use_the_pods_routing_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A probability routing that leaves threshold, max_shards and prior_weight unset gets the searcher's own
    settings; the pod-list and shard-map clients planned with built-in ones instead and sent them explicitly,
    so their answers differed from one searcher's started with other settings. Searchers report theirs in
    GetStats and GetShardMap."""
    settings = ["--routing-threshold", "0.99", "--routing-max-shards", "6", "--routing-prior-weight", "1.0"]
    rng = np.random.default_rng(4)
    categories = [f"c{n}" for n in range(8)]
    items = [CatalogueItem(f"{category}-{n}", category, rng.normal(size=8).astype(np.float32), "m")
             for category in categories for n in range(15)]
    with ExitStack() as stack:
        ports = [stack.enter_context(running_service(
            "lookalike.searcher", ["--data", str(tmp_path_factory.mktemp(f"tuned{i}")), *settings]))[1] for i in range(2)]
        # A single searcher advertises no group target: the shard-map client reaches its group through the seed.
        _, single_port = stack.enter_context(running_service(
            "lookalike.searcher", ["--data", str(tmp_path_factory.mktemp("tuned-single")), *settings]))
        target = f"127.0.0.1:{single_port}"
        single = stack.enter_context(SearcherClient(target))
        through_map = stack.enter_context(ShardMapClient(target))
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{port}" for port in ports]))
        assert all(s.code == 0 for s in single.upsert(items).statuses)
        assert all(s.code == 0 for s in sharded.upsert(items).statuses)
        stats = single.stats().routing_defaults
        assert (round(stats.threshold, 4), stats.max_shards, stats.prior_weight) == (0.99, 6, 1.0)
        probabilities = [(category, p) for category, p in zip(categories, [0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01])]
        for _ in range(5):
            vector = rng.normal(size=8).astype(np.float32)
            expected = answer(single, vector, "m", routing_for(probabilities=probabilities))
            assert len(expected[1]) == 6, "the searchers' own threshold and cap: six shards probed"
            assert answer(sharded, vector, "m", routing_for(probabilities=probabilities)) == expected
            assert answer(through_map, vector, "m", routing_for(probabilities=probabilities)) == expected


def start_pod(stack: ExitStack, data: Path, address: str = "127.0.0.1:0") -> Any:
    """A searcher pod in this process over `data`, stopped when `stack` closes."""
    server, channel = start_searcher(data, address)
    stack.callback(server.stop, None)
    channel.close()
    return server


def one_category_per_pod(pods: int) -> list[str]:
    """A category owned by each pod, in ordinal order."""
    owned: dict[int, str] = {}
    for category in (f"category-{n}" for n in range(100)):
        owned.setdefault(owner_of(category, pods), category)
    return [owned[pod] for pod in range(pods)]


def test_a_pod_that_is_down_fails_only_what_it_holds(tmp_path: Path) -> None:
    """Once the category cache aged, every search asked the down pod for its stats again (past the caller's
    timeout) and failed, and every write failed deleting its ids from the down pod. Now the live pod is
    searched and written, a search of the down pod's category still fails, and an item moved off the down
    pod loses its old copy there at a write after the pod is back."""
    here, down = one_category_per_pod(2)
    rng = np.random.default_rng(5)
    vectors = [rng.normal(size=8).astype(np.float32) for _ in range(3)]
    with ExitStack() as stack:
        pods = [start_pod(stack, tmp_path / f"pod{ordinal}") for ordinal in range(2)]
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{pod.port}" for pod in pods],
                                                            refresh_seconds=0.0))
        stored = sharded.upsert([CatalogueItem("stays", here, vectors[0], "m"),
                                 CatalogueItem("moves", down, vectors[1], "m")])
        assert [s.code for s in stored.statuses] == [0, 0] and sharded.categories() == {here, down}
        pods[1].stop(None)
        started = time.monotonic()
        found = sharded.search(vectors[0], "m", k=3, routing=routing_for(categories=[here]), timeout=2)
        assert [h.id for h in found.hits] == ["stays"] and time.monotonic() - started < 4
        batch = [search_request(vectors[0], "m", 3, routing_for(categories=[here]), 0)]
        assert [h.id for h in sharded.search_batch(batch, timeout=2)[0].hits] == ["stays"]
        with pytest.raises(UnavailableError, match=f"Searcher.Search failed with UNAVAILABLE: searcher pod 1 at "
                                                   f"127.0.0.1:{pods[1].port}: "):  # which of the pods failed
            sharded.search(vectors[1], "m", k=3, routing=routing_for(categories=[down]), timeout=1)
        moved = sharded.upsert([CatalogueItem("moves", here, vectors[1], "m")], timeout=2)
        assert [s.code for s in moved.statuses] == [0]
        found = sharded.search(vectors[1], "m", k=3, routing=routing_for(categories=[here]), timeout=2)
        assert {h.id for h in found.hits} == {"stays", "moves"}
        restarted = stack.enter_context(SearcherClient(
            f"127.0.0.1:{start_pod(stack, tmp_path / 'pod1', f'127.0.0.1:{pods[1].port}').port}"))
        assert restarted.stats().items == 1, "the old copy is still on the pod that was down"
        sharded.upsert([CatalogueItem("later", here, vectors[2], "m")], timeout=10)
        assert restarted.stats().items == 0, "a later write deleted it"
        assert {h.id for h in sharded.search(vectors[1], "m", k=5, timeout=10).hits} == {"stays", "moves", "later"}


def test_a_search_s_timeout_covers_reading_the_categories_and_the_pods(tmp_path: Path) -> None:
    """A pod-list search read the pods' categories with the whole timeout, then searched them with the whole
    timeout again. Now the search gets what the read left, and nothing left fails it."""
    import grpc
    from lookalike.client.connection import DeadlineExceededError
    from lookalike.v1 import searcher_pb2_grpc
    from tests.conftest import SlowNetwork

    categories = one_category_per_pod(2)
    vector = np.ones(8, np.float32)
    with ExitStack() as stack:
        pods = [start_pod(stack, tmp_path / f"pod{ordinal}") for ordinal in range(2)]
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{pod.port}" for pod in pods],
                                                            refresh_seconds=0.0))
        sharded.upsert([CatalogueItem(f"item-{n}", category, vector, "m") for n, category in enumerate(categories)])
        slow = SlowNetwork(1.0)
        for pod in sharded.pods:
            pod.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(pod.channel, slow))
        with pytest.raises(DeadlineExceededError, match="Searcher.Search failed with DEADLINE_EXCEEDED: the operation's "
                                                        "timeout passed before this call"):
            sharded.search(vector, "m", k=2, timeout=0.9)
        assert slow.calls == 2, "each pod's stats, then no time was left to search them"
        assert len(sharded.search(vector, "m", k=2, timeout=30).hits) == 2


def test_pod_calls_queued_behind_other_operations_get_only_what_is_left_of_the_timeout(tmp_path: Path) -> None:
    """The client's pods share one thread per pod across every operation. Stats, limits, categories and deletes
    gave each pod call the whole timeout when it started, however long it had waited for a thread behind
    another operation's calls: an operation ended well past its timeout, and succeeded."""
    import grpc
    from lookalike.client.connection import DeadlineExceededError
    from lookalike.v1 import searcher_pb2_grpc
    from tests.conftest import SlowNetwork

    with ExitStack() as stack:
        pods = [start_pod(stack, tmp_path / f"pod{ordinal}") for ordinal in range(2)]
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{pod.port}" for pod in pods]))
        slow = SlowNetwork(1.0)
        for pod in sharded.pods:
            pod.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(pod.channel, slow))
        operations = {"stats": lambda timeout: sharded.stats(timeout),
                      "limits": lambda timeout: sharded.limits(timeout),
                      "categories": lambda timeout: sharded.categories(refresh=True, timeout=timeout),
                      "delete": lambda timeout: sharded.delete(["nothing"], timeout)}
        for name, operation in operations.items():
            ahead = threading.Thread(target=sharded.stats, args=(30,))  # holds both pods' threads for 1 s
            ahead.start()
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                operation(0.5)
            assert time.monotonic() - started < 1.2, name
            ahead.join()


def test_a_write_that_used_its_time_leaves_its_stray_deletes_to_the_next_write(tmp_path: Path) -> None:
    """A write whose time ran out before it deleted a moved id's old copy marked the pod as failing, and the
    next writes left it alone for refresh_seconds. Now the next write deletes the old copy."""
    import grpc
    from lookalike.v1 import searcher_pb2_grpc
    from tests.conftest import SlowNetwork

    first, second = one_category_per_pod(2)
    vector = np.ones(8, np.float32)
    with ExitStack() as stack:
        pods = [start_pod(stack, tmp_path / f"pod{ordinal}") for ordinal in range(2)]
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{pod.port}" for pod in pods]))
        sharded.upsert([CatalogueItem("moves", first, vector, "m")])
        slow = SlowNetwork(1.0)
        for pod in sharded.pods:
            pod.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(pod.channel, slow))
        moved = sharded.upsert([CatalogueItem("moves", second, vector, "m")], timeout=0.9)
        assert [s.code for s in moved.statuses] == [0] and slow.calls == 1, "stored, then no time was left"
        for pod in sharded.pods:
            pod.stub = searcher_pb2_grpc.SearcherStub(pod.channel)
        old = stack.enter_context(SearcherClient(f"127.0.0.1:{pods[0].port}"))
        assert old.stats().items == 1, "the old copy is still on the first pod"
        sharded.upsert([CatalogueItem("later", second, vector, "m")], timeout=10)
        assert old.stats().items == 0, "the next write deleted it"


def test_a_map_read_leaves_time_for_the_next_searcher_when_one_hangs(tmp_path: Path) -> None:
    """Re-reading the shard map gave the first searcher asked all of the timeout: one that takes connections and
    never answers used it up, no other was asked, and the old map was kept. Now each gets its share of it."""
    import socket

    import grpc
    from lookalike.v1 import searcher_pb2_grpc

    vector = np.ones(8, np.float32)
    with ExitStack() as stack:
        pod = start_pod(stack, tmp_path / "searcher")
        hanging = stack.enter_context(socket.create_server(("127.0.0.1", 0)))  # accepts, never speaks HTTP/2
        client = stack.enter_context(ShardMapClient(f"127.0.0.1:{pod.port}"))
        client.upsert([CatalogueItem("first", "old", vector, "m")])
        assert {p.category for p in client.shard_map(refresh=True).placements} == {"old"}
        with SearcherClient(f"127.0.0.1:{pod.port}") as other:  # another client places a new category
            other.upsert([CatalogueItem("second", "new", vector, "m")])
        hung = grpc.insecure_channel(f"127.0.0.1:{hanging.getsockname()[1]}")
        stack.callback(hung.close)
        client.seed.stub = searcher_pb2_grpc.SearcherStub(hung)  # the seed now hangs; the group still answers
        refreshed = client.shard_map(refresh=True, timeout=3)
        assert {p.category for p in refreshed.placements} == {"old", "new"}, "the group was asked in time"


def test_a_search_waits_for_another_thread_s_map_read_at_most_half_its_timeout(tmp_path: Path) -> None:
    """A search whose cached map had aged waited on the map's lock as long as another thread's read took (with
    no timeout, 30 s a searcher that does not answer). Now it waits half its timeout, then searches with the
    last map."""
    import threading

    vector = np.ones(8, np.float32)
    with ExitStack() as stack:
        pod = start_pod(stack, tmp_path / "searcher")
        client = stack.enter_context(ShardMapClient(f"127.0.0.1:{pod.port}", refresh_seconds=0.0))
        client.upsert([CatalogueItem("x", "a", vector, "m")])
        client.shard_map(refresh=True)
        found: list = []
        client._lock.acquire()  # another thread's read of the map, taking long
        try:
            searching = threading.Thread(target=lambda: found.append(client.search(vector, "m", k=1, timeout=2)))
            searching.start()
            searching.join(timeout=6)
            assert not searching.is_alive(), "the search waited for the other read to end"
        finally:
            client._lock.release()
            searching.join()
        assert [hit.id for hit in found[0].hits] == ["x"]


def test_an_id_given_twice_in_one_write_ends_as_its_last_copy(tmp_path: Path) -> None:
    """Two copies of an id in one request, in categories of different pods, were each stored on their pod,
    then each deleted as the other's stray: stored nowhere, both acknowledged. One searcher keeps the last."""
    first, second = one_category_per_pod(2)
    rng = np.random.default_rng(6)
    vectors = [rng.normal(size=8).astype(np.float32) for _ in range(3)]
    items = [CatalogueItem("once", first, vectors[0], "m"), CatalogueItem("twice", second, vectors[1], "m"),
             CatalogueItem("twice", first, vectors[2], "m", {"copy": "last"})]
    with ExitStack() as stack:
        pods = [start_pod(stack, tmp_path / f"pod{ordinal}") for ordinal in range(2)]
        sharded = stack.enter_context(ShardedSearcherClient([f"127.0.0.1:{pod.port}" for pod in pods]))
        single = stack.enter_context(SearcherClient(f"127.0.0.1:{start_pod(stack, tmp_path / 'single').port}"))
        for client in (single, sharded):
            assert [s.code for s in client.upsert(items).statuses] == [0, 0, 0]
            assert client.stats().items == 2
            found = client.search(vectors[2], "m", k=5)
            assert [(h.id, h.category, dict(h.attributes)) for h in found.hits] == [
                ("twice", first, {"copy": "last"}), ("once", first, {})]
