"""Attribute filters, products with several photos, and batch search: real servers, real grocery embeddings.

Grocery is the test bed: each fine class is a product (its photos are "photos of one product") and its
product information (lookalike.quality.grocery_products) gives the attributes to filter on. A `rank`
attribute drawn uniformly from 0..9999 sets a filter's selectivity exactly.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import pytest

from lookalike.client.connection import FailedPreconditionError, InvalidArgumentError
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request
from lookalike.filter_text import parse_filter
from lookalike.quality.grocery_products import product_attributes
from lookalike.v1 import searcher_pb2 as pb
from tests.conftest import GROCERY, start_searcher, store_in

CATEGORY = "grocery"
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)


def catalogue(data: dict) -> list[CatalogueItem]:
    """Every grocery train photo in one shard, with its product's attributes and a uniform rank."""
    products = product_attributes(GROCERY / "classes.csv")
    ranks = random.Random(7).sample(range(10_000), len(data["catalogue"]))
    return [CatalogueItem(image.item_id, CATEGORY, vector, data["model_id"],
                          {**products[image.label], "rank": str(rank), "label": image.label}, product=image.label)
            for image, vector, rank in zip(data["catalogue"], data["catalogue_vectors"], ranks)]


def passes(attributes: dict[str, str], text: str) -> bool:
    """Brute force: whether attributes pass a filter (the reference the searcher is checked against)."""
    for condition in parse_filter(text).all:
        value = attributes.get(condition.attribute)
        kind = condition.WhichOneof("test")
        if value is None:
            result = False
        elif kind == "equals":
            result = value == condition.equals
        elif kind == "one_of":
            result = value in condition.one_of.values
        else:
            bounds, number = condition.range, float(value)
            result = ((not bounds.HasField("gte") or number >= bounds.gte) and (not bounds.HasField("gt") or number > bounds.gt)
                      and (not bounds.HasField("lte") or number <= bounds.lte) and (not bounds.HasField("lt") or number < bounds.lt))
        if result == condition.negate:
            return False
    return True


def exact_top(items: list[CatalogueItem], query: np.ndarray, k: int, keep: Callable[[CatalogueItem], bool]) -> list[str]:
    kept = [item for item in items if keep(item)]
    similarities = np.array([float(item.vector @ query) for item in kept])
    return [kept[i].id for i in np.argsort(-similarities, kind="stable")[:k]]


@pytest.fixture(scope="module")
def grocery_items(grocery_embeddings: dict) -> list[CatalogueItem]:
    return catalogue(grocery_embeddings)


@pytest.fixture(scope="module", params=["graph", "auto"])
def filtered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             grocery_items: list[CatalogueItem]) -> Iterator[tuple[str, SearcherClient]]:
    """The catalogue in one HNSW shard; "graph" always searches through the graph, skipping items that fail
    the filter; "auto" searches a filter's matches exactly when they are few (the default, here up to
    4 * sqrt(64 * 2640) = 1644 matches)."""
    exact = {"graph": 0.0, "auto": 4.0}[request.param]
    started, channel = start_searcher(tmp_path_factory.mktemp("filters"), snapshot_interval=0, exact_below=0,
                                      numeric_attributes="rank,grams", filter_exact_factor=exact)
    channel.close()
    with SearcherClient(f"127.0.0.1:{started.port}") as client:
        store_in(grocery_items, client)
        yield request.param, client
    started.stop(None)


@pytest.mark.parametrize("selectivity", SELECTIVITIES)
def test_filtered_search_never_returns_a_failing_item_and_keeps_recall(
        filtered: tuple[str, SearcherClient], grocery_embeddings: dict, grocery_items: list[CatalogueItem],
        selectivity: float) -> None:
    mode, client = filtered
    text = f"rank < {int(selectivity * 10_000)}"
    matching = sum(passes(item.attributes, text) for item in grocery_items)
    recalls = []
    for query in grocery_embeddings["query_vectors"]:
        response = client.search(query, grocery_embeddings["model_id"], k=10, filter=text)
        assert all(passes(dict(hit.attributes), text) for hit in response.hits), "a hit fails the filter"
        (probe,) = response.probes
        assert probe.filter_matches == matching
        # Exact when the matches are few (auto), and always when there are no more of them than k.
        assert probe.filter_exact == (matching <= max(1644 if mode == "auto" else 0, 10))
        truth = exact_top(grocery_items, query, 10, lambda item: passes(item.attributes, text))
        recalls.append(len({hit.id for hit in response.hits} & set(truth)) / len(truth))
    recall = float(np.mean(recalls))
    # Through the graph alone a very selective filter misses items (what the exact fallback is for).
    if mode == "auto" or selectivity >= 0.1:
        assert recall >= 0.95, f"recall@10 {recall:.3f} at selectivity {selectivity} ({mode})"


def test_attribute_filters_on_grocery_products(filtered: tuple[str, SearcherClient], grocery_embeddings: dict,
                                               grocery_items: list[CatalogueItem]) -> None:
    _, client = filtered
    for text in ['country = "Spain" AND section IN ("Fruit", "Vegetables") AND grams <= 500',
                 'section = "Packages" AND brand NOT IN ("ARLA KO", "ALPRO")',
                 'NOT country = "Sweden" AND grams > 150',
                 'coarse != "Apple" AND rank >= 5000']:
        found = 0
        for query in grocery_embeddings["query_vectors"][:10]:
            response = client.search(query, grocery_embeddings["model_id"], k=10, filter=text)
            hits = [hit.id for hit in response.hits]
            truth = exact_top(grocery_items, query, 10, lambda item: passes(item.attributes, text))
            assert all(passes(dict(hit.attributes), text) for hit in response.hits), text
            if response.probes[0].filter_exact:
                assert hits == truth, text
            found += len(set(hits) & set(truth))
        assert found >= 0.95 * 10 * 10, f"{text}: recall@10 {found / 100:.2f}"


@pytest.fixture()
def small(tmp_path: Path) -> Iterator[tuple[SearcherClient, list[CatalogueItem]]]:
    """A small catalogue with products of several photos each, over a searcher that checks prices."""
    started, channel = start_searcher(tmp_path, snapshot_interval=0, numeric_attributes="price")
    channel.close()
    rng = np.random.default_rng(5)
    base = rng.normal(size=8)
    items = []
    # Product "a": 3 photos closest to the query; "b": 1 photo; "c": 2 photos; "d": a product of its own.
    for item_id, product, distance in [("a1", "a", 0.1), ("a2", "a", 0.2), ("a3", "a", 0.3), ("b1", "b", 0.4),
                                       ("c1", "c", 0.5), ("c2", "c", 0.6), ("d1", "", 0.7)]:
        vector = (base + distance * rng.normal(size=8)).astype(np.float32)
        items.append(CatalogueItem(item_id, "shoes", vector / np.linalg.norm(vector), "m",
                                   {"price": str(10 * len(items))}, product=product))
    with SearcherClient(f"127.0.0.1:{started.port}") as client:
        assert all(s.code == 0 for s in client.upsert(items).statuses)
        yield client, items
    started.stop(None)


def test_distinct_products_hand_computed(small: tuple[SearcherClient, list[CatalogueItem]]) -> None:
    client, items = small
    query = items[0].vector
    ranked = exact_top(items, query, 7, lambda item: True)
    best: dict[str, tuple[str, int]] = {}
    for item_id in ranked:
        product = next(i.product for i in items if i.id == item_id) or item_id
        first, count = best.get(product, (item_id, 0))
        best[product] = (first, count + 1)
    expected = [(first, count) for first, count in sorted(best.values(), key=lambda pair: ranked.index(pair[0]))]
    hits = client.search(query, "m", k=3, distinct_products=True).hits
    assert [(hit.id, hit.product_matches) for hit in hits] == expected[:3]
    assert len({hit.product or hit.id for hit in hits}) == 3
    # Without grouping: the best photos, whichever product they show.
    assert [hit.id for hit in client.search(query, "m", k=3).hits] == ranked[:3]
    # Grouping and filtering together: products whose best photo under 35 passes.
    hits = client.search(query, "m", k=4, distinct_products=True, filter="price < 35").hits
    assert {hit.id for hit in hits} <= {"a1", "a2", "a3", "b1"} and len({hit.product for hit in hits}) == 2


def test_products_are_replaced_and_deleted_whole(small: tuple[SearcherClient, list[CatalogueItem]],
                                                 tmp_path: Path) -> None:
    client, items = small
    new_photo = CatalogueItem("a4", "shoes", items[0].vector, "m", {"price": "5"}, product="a")
    kept = items[1]
    response = client.upsert([new_photo, kept], replace_products=["a"])
    assert all(s.code == 0 for s in response.statuses)
    photos = {hit.id for hit in client.search(items[0].vector, "m", k=20).hits if hit.product == "a"}
    assert photos == {"a4", "a2"}, "a1 and a3 were replaced away"
    deleted = client.delete(products=["a", "c", "nothing-here"], ids=["d1"])
    assert deleted.deleted == 5 and list(deleted.missing) == ["nothing-here"]
    assert [hit.id for hit in client.search(items[0].vector, "m", k=20).hits] == ["b1"]


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_products_survive_a_restart(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store_location = request.getfixturevalue("fresh_database") if store_kind == "postgresql" else ""
    vectors = np.eye(6, dtype=np.float32)
    items = [CatalogueItem(f"p{n}", "bags", v, "m", {"price": str(n)}, product=f"product-{n // 2}")
             for n, v in enumerate(vectors)]
    started, channel = start_searcher(tmp_path, snapshot_interval=0, store=store_location, numeric_attributes="price")
    channel.close()
    with SearcherClient(f"127.0.0.1:{started.port}") as client:
        client.upsert(items)
        client.upsert([items[0]], replace_products=["product-0"])  # p1 goes
    started.stop(None)  # snapshots on the way out: products are in the snapshot
    for round_trip in ("from the snapshot", "from the log"):
        started, channel = start_searcher(tmp_path, snapshot_interval=0, store=store_location,
                                          numeric_attributes="price")
        channel.close()
        with SearcherClient(f"127.0.0.1:{started.port}") as client:
            hits = client.search(vectors[0] + vectors[2] * 0.5, "m", k=3, distinct_products=True).hits
            assert [(h.id, h.product, h.product_matches) for h in hits][:2] == [("p0", "product-0", 1),
                                                                             ("p2", "product-1", 2)], round_trip
            assert [h.id for h in client.search(vectors[4], "m", k=1, filter="price >= 5").hits] == ["p5"]
        started.stop(None)
        for snapshot in (tmp_path / "snapshots").rglob("CURRENT"):
            snapshot.unlink()  # the next start replays the store's log


def test_values_stored_before_an_attribute_was_numeric_count_as_numbers_only_when_finite(tmp_path: Path) -> None:
    """Declared numeric later (--numeric-attributes), an attribute's old values that Upsert would now refuse
    ("n/a", and "inf" or "1e999", which are not finite) count as missing: they pass no range, and NOT of a
    range passes them. "inf" used to pass `price > 100` as an infinite price."""
    vectors = np.eye(4, dtype=np.float32)
    items = [CatalogueItem(name, "bags", v, "m", {"price": price})
             for (name, price), v in zip([("inf-item", "inf"), ("big", "1e999"), ("text", "n/a"), ("ok", "150")],
                                         vectors)]
    started, channel = start_searcher(tmp_path, snapshot_interval=0)
    channel.close()
    with SearcherClient(f"127.0.0.1:{started.port}") as client:
        assert all(s.code == 0 for s in client.upsert(items).statuses)
    started.stop(None)
    started, channel = start_searcher(tmp_path, snapshot_interval=0, numeric_attributes="price")
    channel.close()
    try:
        with SearcherClient(f"127.0.0.1:{started.port}") as client:
            def ids(text: str) -> list[str]:
                return sorted(h.id for h in client.search(vectors.sum(0), "m", k=4, filter=text).hits)

            assert ids("price > 100") == ["ok"]
            assert ids("price <= 1000000") == ["ok"]
            assert ids("NOT price <= 1000000") == ["big", "inf-item", "text"]
    finally:
        started.stop(None)


def test_bad_filters_and_product_requests_are_refused(small: tuple[SearcherClient, list[CatalogueItem]]) -> None:
    client, items = small
    before = [hit.id for hit in client.search(items[0].vector, "m", k=7).hits]
    unknown_test = pb.Filter(all=[pb.Condition(attribute="price")])
    bad = {
        "filter.all[0] has no test": unknown_test,
        "filter.all[0].range: attribute 'colour' is not numeric": parse_filter("colour < 3"),
        "filter.all[1].one_of is empty": pb.Filter(all=[pb.Condition(attribute="price", equals="1"),
                                                        pb.Condition(attribute="brand", one_of=pb.StringList())]),
        "filter.all[0].attribute is empty": pb.Filter(all=[pb.Condition(equals="x")]),
        "filter.all[0].range has a NaN bound": pb.Filter(all=[pb.Condition(attribute="price",
                                                                           range=pb.NumericRange(lt=math.nan))]),
        "filter.all[0].range has no bounds": pb.Filter(all=[pb.Condition(attribute="price", range=pb.NumericRange())]),
        "filter.all[0].one_of has 1025 values, limit is 1024": pb.Filter(all=[pb.Condition(
            attribute="brand", one_of=pb.StringList(values=[f"b{n}" for n in range(1025)]))]),
    }
    for message, flt in bad.items():
        with pytest.raises(InvalidArgumentError) as refused:
            client.search(items[0].vector, "m", k=3, filter=flt)
        assert message in refused.value.details, refused.value.details
    priced = CatalogueItem("x", "shoes", items[0].vector, "m", {"price": "cheap"})
    status = client.upsert([priced]).statuses[0]
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "items[0].attributes['price']" in status.message
    with pytest.raises(InvalidArgumentError, match="replace_products\\[0\\] is empty"):
        client.upsert([items[0]], replace_products=[""])
    with pytest.raises(InvalidArgumentError, match="ids and products are both empty"):
        client.delete()
    assert [hit.id for hit in client.search(items[0].vector, "m", k=7).hits] == before, "stored data changed"


def test_batch_search_equals_one_by_one(filtered: tuple[str, SearcherClient], grocery_embeddings: dict) -> None:
    _, client = filtered
    model_id = grocery_embeddings["model_id"]
    requests, singles = [], []
    for n, query in enumerate(grocery_embeddings["query_vectors"][:24]):
        options = {"k": 1 + n % 12, "filter": ["", "rank < 3000", 'section = "Fruit"'][n % 3],
                   "distinct_products": n % 2 == 0,
                   "routing": routing_for(categories=[CATEGORY]) if n % 4 else routing_for()}
        requests.append(search_request(query, model_id, options["k"], options["routing"], 0, options["filter"],
                                       options["distinct_products"]))
        singles.append(client.search(query, model_id, **options))
    # One query the server refuses before searching, one the search itself refuses (another model's vector):
    # each gets its own error in its place, the others their answers, whichever lane searched them.
    bad = search_request(grocery_embeddings["query_vectors"][0], model_id, 0, None, 0)
    other_model = search_request(grocery_embeddings["query_vectors"][0], "another-model", 5, None, 0)
    answers = client.search_batch(requests[:12] + [bad] + requests[12:17] + [other_model] + requests[17:])
    assert isinstance(answers[12], InvalidArgumentError) and "queries[12].k is 0" in answers[12].details
    assert isinstance(answers[18], FailedPreconditionError) and "another-model" in answers[18].details
    for single, answer in zip(singles, answers[:12] + answers[13:18] + answers[19:]):
        assert [(h.id, h.product_matches) for h in answer.hits] == [(h.id, h.product_matches) for h in single.hits]
    with pytest.raises(grpc.RpcError) as refused:
        client.stub.SearchBatch(pb.SearchBatchRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "queries has 0 entries" in refused.value.details()


def test_distinct_products_on_grocery(filtered: tuple[str, SearcherClient], grocery_embeddings: dict,
                                      grocery_items: list[CatalogueItem]) -> None:
    """Ten distinct products per query (a product = a fine class, 20 to 50 photos each), close to the exact
    ranking of products by their best photo."""
    _, client = filtered
    vectors = np.stack([item.vector for item in grocery_items])
    labels = np.array([item.product for item in grocery_items])
    overlap = []
    for query in grocery_embeddings["query_vectors"][:20]:
        hits = client.search(query, grocery_embeddings["model_id"], k=10, distinct_products=True).hits
        assert len({hit.product for hit in hits}) == 10 and all(hit.product_matches >= 1 for hit in hits)
        similarities = vectors @ query
        best = {label: float(similarities[labels == label].max()) for label in set(labels)}
        truth = sorted(best, key=lambda label: -best[label])[:10]
        overlap.append(len({hit.product for hit in hits} & set(truth)) / 10)
    assert float(np.mean(overlap)) >= 0.95


def test_facade_batch_search_equals_one_by_one(model_dir: Path, grocery_val: list, tmp_path: Path) -> None:
    from lookalike.client.facade import Lookalike
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    embedder, embedder_port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0"))
    searcher, channel = start_searcher(tmp_path, snapshot_interval=0)
    channel.close()
    photos = [image.path for image in grocery_val[:40]]
    try:
        with Lookalike(f"127.0.0.1:{embedder_port}", f"127.0.0.1:{searcher.port}") as lookalike:
            result = lookalike.index(photos, [image.item_id for image in grocery_val[:40]],
                                     products=[image.label for image in grocery_val[:40]], replace_products=True)
            assert not result.failed
            queries = [photos[3], photos[17], b"not a photo", photos[30]]
            batch = lookalike.search_batch(queries, k=5, distinct_products=True, filter='label != "nothing"')
            assert isinstance(batch[2], InvalidArgumentError)
            for query, answer in zip(queries[:2] + queries[3:], batch[:2] + batch[3:]):
                single = lookalike.search(query, k=5, distinct_products=True, filter='label != "nothing"')
                assert [(m.id, m.product, m.product_matches) for m in answer.matches] == \
                       [(m.id, m.product, m.product_matches) for m in single.matches]
    finally:
        embedder.stop(None)
        searcher.stop(None)


def test_a_database_from_before_products_opens_and_keeps_its_items(tmp_path: Path) -> None:
    import sqlite3

    from lookalike.searcher.store import SqliteStore

    path = tmp_path / "catalogue.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE items (id TEXT PRIMARY KEY, category TEXT NOT NULL, vector BLOB NOT NULL, "
                    "attributes TEXT NOT NULL, model_id TEXT NOT NULL, seq INTEGER NOT NULL)")
        old.execute("INSERT INTO items VALUES ('old-1', 'hats', ?, '{\"price\": \"3\"}', 'm', 1)",
                    (np.ones(4, "<f4").tobytes(),))
    store = SqliteStore(path)
    (item,) = store.items_after("hats", 0, 1)
    assert (item.id, item.product, item.attributes) == ("old-1", "", {"price": "3"})
    store.close()


def test_columns_kept_per_shard_are_bounded() -> None:
    """Filters naming ever new attributes keep at most MAX_COLUMNS columns per kind; a dropped column is rebuilt
    when named again and answers as before."""
    from lookalike.searcher.filters import MAX_COLUMNS, AttributeColumns, AttributeFilter, Test

    rows = {label: {"colour": "red" if label % 2 else "blue"} for label in range(10)}
    rows[0].update({f"tag-{n}": "y" for n in range(3 * MAX_COLUMNS)})  # many attribute names, one item has them
    scans = [0]

    def current() -> object:
        scans[0] += 1
        return rows.items()

    columns = AttributeColumns(frozenset(), current)
    columns.set_live(np.array(list(rows)))
    red = AttributeFilter((Test("colour", ("red",)),))
    expected = np.array([label % 2 == 1 for label in range(len(rows))])
    assert (columns.mask(red)[:len(rows)] == expected).all()
    for n in range(3 * MAX_COLUMNS):
        assert not columns.mask(AttributeFilter((Test(f"tag-{n}", ("x",)),)))[:len(rows)].any()
    assert len(columns._codes) == MAX_COLUMNS and "colour" not in columns._codes
    assert (columns.mask(red)[:len(rows)] == expected).all()
    # A name no item has builds nothing and scans nothing: it passes no test (and NOT of it passes every item).
    before = (scans[0], len(columns._codes), dict(columns._codes))
    for n in range(3 * MAX_COLUMNS):
        assert not columns.mask(AttributeFilter((Test(f"never-stored-{n}", ("x",)),)))[:len(rows)].any()
        assert columns.mask(AttributeFilter((Test(f"never-{n}", ("x",), negate=True),)))[:len(rows)].all()
    assert (scans[0], len(columns._codes)) == before[:2] and columns._codes.keys() == before[2].keys()
