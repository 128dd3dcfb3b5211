"""Shard planning: the probed set is exactly what the routing rule says."""
from __future__ import annotations

from lookalike.routing import Probe, plan_all, plan_explicit, plan_probability_routing

SHARDS = {"apple", "pear", "milk", "juice"}


def test_probes_in_order_until_the_threshold_is_covered() -> None:
    probes = plan_probability_routing([("pear", 0.25), ("apple", 0.6), ("milk", 0.1), ("juice", 0.05)], SHARDS,
                                      threshold=0.8, max_shards=4, k=10, ef=64)
    assert [p.category for p in probes] == ["apple", "pear"]
    assert probes == [Probe("apple", 0.6, 64), Probe("pear", 0.25, 64)]


def test_shard_cap_stops_probing() -> None:
    probes = plan_probability_routing([("apple", 0.3), ("pear", 0.3), ("milk", 0.2), ("juice", 0.2)], SHARDS,
                                      threshold=0.99, max_shards=2, k=10, ef=64)
    assert [p.category for p in probes] == ["apple", "pear"]


def test_confident_query_probes_one_shard() -> None:
    probes = plan_probability_routing([("milk", 0.97), ("juice", 0.03)], SHARDS, threshold=0.9, max_shards=4, k=5,
                                      ef=64)
    assert [p.category for p in probes] == ["milk"]


def test_ef_is_never_below_k() -> None:
    probes = plan_probability_routing([("apple", 0.5), ("pear", 0.45), ("milk", 0.01)], SHARDS, threshold=1.0,
                                      max_shards=4, k=80, ef=64)
    assert [p.ef for p in probes] == [80, 80, 80]


def test_categories_without_shards_count_as_covered_but_are_not_probed() -> None:
    probes = plan_probability_routing([("bread", 0.5), ("apple", 0.45), ("pear", 0.05)], SHARDS, threshold=0.9,
                                      max_shards=4, k=10, ef=64)
    assert [p.category for p in probes] == ["apple"]


def test_explicit_and_all() -> None:
    probes, unknown = plan_explicit(["milk", "bread", "milk", "apple"], SHARDS, 40)
    assert [p.category for p in probes] == ["milk", "apple"] and unknown == ["bread"]
    assert all(p.ef == 40 for p in probes)
    assert [p.category for p in plan_all(SHARDS, 64)] == ["apple", "juice", "milk", "pear"]
