"""Arbitrary requests against a real searcher (hypothesis): never INTERNAL, never a crash, data intact.

Also the limits that bound memory per request: attributes per item, and RPCs in progress at once.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lookalike.codec import pack_vector
from lookalike.v1 import common_pb2, searcher_pb2 as pb, searcher_pb2_grpc
from tests.conftest import start_searcher

DIM = 8
MODEL = "model@1"
# Statuses a refused request may get; INTERNAL (or UNKNOWN) would mean the server did not understand what
# went wrong, which is the bug these tests look for.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[searcher_pb2_grpc.SearcherStub]:
    started, channel = start_searcher(tmp_path_factory.mktemp("arbitrary"), snapshot_interval=0, max_batch=50,
                                      max_attributes=8, max_attribute_bytes=512, max_message_bytes=1 << 20)
    stub = searcher_pb2_grpc.SearcherStub(channel)
    # A known item that every test checks is still there, unchanged.
    stub.Upsert(pb.UpsertRequest(items=[pb.Item(id="anchor", category="hats", model_id=MODEL,
                                                 vector=pack_vector(np.eye(DIM, dtype=np.float32)[0]))]), timeout=10)
    yield stub
    channel.close()
    started.stop(None)


def anchor_intact(stub: searcher_pb2_grpc.SearcherStub) -> bool:
    response = stub.Search(pb.SearchRequest(vector=pack_vector(np.eye(DIM, dtype=np.float32)[0]), model_id=MODEL,
                                            k=1, routing=pb.Routing(explicit=pb.ExplicitRouting(categories=["hats"]))),
                           timeout=10)
    return [(h.id, round(h.similarity, 4)) for h in response.hits] == [("anchor", 1.0)]


texts = st.text(max_size=300)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
vectors = st.builds(lambda values, dimension, raw: common_pb2.Vector(
    values=raw if raw is not None else np.asarray(values, dtype="<f4").tobytes(), dimension=dimension),
    st.lists(floats, max_size=20), st.integers(0, 2**32 - 1), st.none() | st.binary(max_size=64))
items = st.builds(lambda i, c, v, m, a: pb.Item(id=i, category=c, vector=v, model_id=m, attributes=a),
                  st.sampled_from(["anchor", "sku-1", ""]) | texts, st.sampled_from(["hats", "coats"]) | texts,
                  vectors, st.sampled_from([MODEL, "other@2"]) | texts,
                  st.dictionaries(texts, texts, max_size=12))
routings = st.one_of(st.none(), st.builds(lambda c: pb.Routing(explicit=pb.ExplicitRouting(categories=c)),
                                          st.lists(texts, max_size=5)),
                     st.builds(lambda c, t, m, w: pb.Routing(probabilities=pb.ProbabilityRouting(
                         categories=[common_pb2.CategoryProbability(category=n, probability=p) for n, p in c],
                         threshold=t, max_shards=m, prior_weight=w)),
                         st.lists(st.tuples(texts, floats), max_size=5), floats, st.integers(0, 2**32 - 1), floats))


def call(method, request) -> None:
    try:
        method(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(items, max_size=6))
def test_arbitrary_upserts(searcher: searcher_pb2_grpc.SearcherStub, batch: list[pb.Item]) -> None:
    try:
        response = searcher.Upsert(pb.UpsertRequest(items=[i for i in batch if i.id != "anchor"]), timeout=10)
        assert len(response.statuses) == len([i for i in batch if i.id != "anchor"])
        assert all(s.code != grpc.StatusCode.INTERNAL.value[0] for s in response.statuses)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
    assert anchor_intact(searcher)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vectors, st.sampled_from([MODEL]) | texts, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), routings)
def test_arbitrary_searches(searcher: searcher_pb2_grpc.SearcherStub, vector: common_pb2.Vector, model_id: str, k: int,
                            ef: int, routing: pb.Routing | None) -> None:
    call(searcher.Search, pb.SearchRequest(vector=vector, model_id=model_id, k=k, ef=ef, routing=routing))
    assert anchor_intact(searcher)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["sku-1", ""]) | texts, max_size=60))
def test_arbitrary_deletes(searcher: searcher_pb2_grpc.SearcherStub, ids: list[str]) -> None:
    call(searcher.Delete, pb.DeleteRequest(ids=[i for i in ids if i != "anchor"]))
    assert anchor_intact(searcher)


def test_attribute_limits_refuse_the_item_not_the_request(searcher: searcher_pb2_grpc.SearcherStub) -> None:
    vector = pack_vector(np.eye(DIM, dtype=np.float32)[1])
    response = searcher.Upsert(pb.UpsertRequest(items=[
        pb.Item(id="many", category="hats", model_id=MODEL, vector=vector, attributes={str(n): "x" for n in range(9)}),
        pb.Item(id="large", category="hats", model_id=MODEL, vector=vector, attributes={"text": "x" * 600}),
        pb.Item(id="fine", category="hats", model_id=MODEL, vector=vector, attributes={"brand": "a"})]), timeout=10)
    codes = [s.code for s in response.statuses]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2 + [0]
    assert response.statuses[0].message == "items[0].attributes has 9 entries, limit is 8"
    assert response.statuses[1].message == "items[1].attributes holds 604 bytes of keys and values, limit is 512"


def test_rpcs_past_the_concurrency_limit_get_resource_exhausted(tmp_path: Path) -> None:
    """One slot: while an upsert of 1,000 4096-d items (about a second of graph inserts at this build
    breadth) holds it, other calls are refused with RESOURCE_EXHAUSTED (or, when a probe got there
    first, the upsert is); afterwards the server serves again."""
    started, channel = start_searcher(tmp_path, snapshot_interval=0, max_concurrent_rpcs=1, ef_construction=2000,
                                      m=64, initial_capacity=1000)
    stub = searcher_pb2_grpc.SearcherStub(channel)
    big = np.random.default_rng(0).normal(size=(1000, 4096)).astype(np.float32)
    slow = pb.UpsertRequest(items=[pb.Item(id=f"i{n}", category="c", model_id=MODEL, vector=pack_vector(v))
                                   for n, v in enumerate(big)])
    refused: list[grpc.StatusCode] = []

    def upsert() -> None:
        try:
            stub.Upsert(slow, timeout=120)
        except grpc.RpcError as error:
            refused.append(error.code())

    writer = threading.Thread(target=upsert)
    writer.start()
    while writer.is_alive():
        try:
            stub.GetStats(pb.GetStatsRequest(), timeout=10)
        except grpc.RpcError as error:
            refused.append(error.code())
        time.sleep(0.01)
    writer.join()
    assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    stub.Upsert(slow, timeout=120)  # the server keeps serving: the upsert goes through when alone
    assert stub.GetStats(pb.GetStatsRequest(), timeout=10).items == 1000
    channel.close()
    started.stop(None)
