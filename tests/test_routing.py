"""The routing rule: the probed set is exactly what it says, the merge keeps the best k once each."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from lookalike.routing import Mode, PlannedProbe, Routing, merge_hits, plan

SHARDS = {"apple", "pear", "milk", "juice"}


def test_probes_in_order_until_the_threshold_is_covered() -> None:
    routed = plan(Routing.by_probability([("pear", 0.25), ("apple", 0.6), ("milk", 0.1), ("juice", 0.05)],
                                         threshold=0.8), SHARDS)
    assert routed.probes == (PlannedProbe("apple", 0.6), PlannedProbe("pear", 0.25))
    assert routed.mode is Mode.PROBABILITIES


def test_shard_cap_stops_probing() -> None:
    routed = plan(Routing.by_probability([("apple", 0.3), ("pear", 0.3), ("milk", 0.2), ("juice", 0.2)],
                                         threshold=0.99, max_shards=2), SHARDS)
    assert routed.categories == ["apple", "pear"]


def test_defaults_apply_when_the_routing_leaves_them_at_zero() -> None:
    probabilities = [("apple", 0.3), ("pear", 0.3), ("milk", 0.25), ("juice", 0.15)]
    assert plan(Routing.by_probability(probabilities), SHARDS, threshold=0.5).categories == ["apple", "pear"]
    assert plan(Routing.by_probability(probabilities), SHARDS, threshold=1.0, max_shards=3).categories == [
        "apple", "pear", "milk"]


def test_confident_query_probes_one_shard() -> None:
    assert plan(Routing.by_probability([("milk", 0.97), ("juice", 0.03)]), SHARDS).categories == ["milk"]


def test_categories_without_shards_count_as_covered_but_are_not_probed() -> None:
    routed = plan(Routing.by_probability([("bread", 0.5), ("apple", 0.45), ("pear", 0.05)]), SHARDS)
    assert routed.categories == ["apple"]


def test_no_likely_category_with_a_shard_searches_every_shard() -> None:
    routed = plan(Routing.by_probability([("bread", 0.95), ("apple", 0.05)]), SHARDS)
    assert routed.categories == sorted(SHARDS) and routed.mode is Mode.ALL
    assert all(probe.prior == 0.0 for probe in routed.probes)


def test_prior_is_weight_times_log_probability() -> None:
    routed = plan(Routing.by_probability([("apple", 0.6), ("pear", 0.3), ("milk", 0.0)], threshold=1.0,
                                         prior_weight=0.5), SHARDS)
    assert [probe.prior for probe in routed.probes] == pytest.approx([0.5 * math.log(0.6), 0.5 * math.log(0.3),
                                                                      0.5 * math.log(1e-9)])


def test_unset_prior_weight_takes_the_default_and_an_explicit_zero_stays_zero() -> None:
    """proto3 `optional`: a searcher started with a model's fitted weight applies it only where a request
    leaves the weight unset; a request that says 0 gets plain cosine."""
    probabilities = [("apple", 0.6), ("pear", 0.4)]
    unset = Routing.from_message(Routing.by_probability(probabilities, threshold=1.0).to_message())
    zero = Routing.from_message(Routing.by_probability(probabilities, threshold=1.0, prior_weight=0.0).to_message())
    assert unset.prior_weight is None and zero.prior_weight == 0.0
    assert [p.prior for p in plan(unset, SHARDS, prior_weight=0.2).probes] == pytest.approx(
        [0.2 * math.log(0.6), 0.2 * math.log(0.4)])
    assert [p.prior for p in plan(zero, SHARDS, prior_weight=0.2).probes] == [0.0, 0.0]
    assert plan(unset, SHARDS).prior_weight == 0.0


def test_explicit_and_all() -> None:
    routed = plan(Routing.explicit(["milk", "bread", "milk", "apple"]), SHARDS)
    assert routed.categories == ["milk", "apple"] and routed.unknown_categories == ("bread",)
    assert plan(Routing.all_shards(), SHARDS).categories == ["apple", "juice", "milk", "pear"]


def test_message_round_trip() -> None:
    for routing in (Routing.all_shards(), Routing.explicit(["a", "b"]),
                    Routing.by_probability([("a", 0.75), ("b", 0.25)], 0.5, 3, 0.25)):
        assert Routing.from_message(routing.to_message()) == routing
    assert Routing.from_message(None) == Routing.all_shards()


def test_a_part_of_a_plan_re_plans_to_exactly_those_probes() -> None:
    """What the sharded client sends each pod: that pod's planned shards, with the same priors."""
    probabilities = [("apple", 0.4), ("pear", 0.3), ("milk", 0.2), ("juice", 0.1)]
    routed = plan(Routing.by_probability(probabilities, threshold=0.95, prior_weight=0.1), SHARDS)
    assert routed.categories == ["apple", "pear", "milk", "juice"]
    for part in ({"apple", "juice"}, {"pear", "milk"}, {"juice"}):
        replanned = plan(routed.routing_for(part), part, threshold=0.01, max_shards=1)
        assert set(replanned.probes) == {p for p in routed.probes if p.category in part}
    explicit = plan(Routing.explicit(["milk", "pear"]), SHARDS)
    assert explicit.routing_for({"pear"}) == Routing.explicit(["pear"])


@dataclass(frozen=True)
class _Hit:
    id: str
    score: float


def test_merge_keeps_the_best_k_each_id_once() -> None:
    hits = [_Hit("a", 0.5), _Hit("b", 0.9), _Hit("a", 0.7), _Hit("c", 0.6), _Hit("d", 0.1)]
    assert merge_hits(hits, 3) == [_Hit("b", 0.9), _Hit("a", 0.7), _Hit("c", 0.6)]
    assert merge_hits(hits, 10) == [_Hit("b", 0.9), _Hit("a", 0.7), _Hit("c", 0.6), _Hit("d", 0.1)]
