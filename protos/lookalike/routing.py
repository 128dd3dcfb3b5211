"""The routing rule in one place: which shards a search probes, and how their hits merge.

Shared by the searcher (one process holding every shard) and the sharded client (shards spread over
pods), so both answer a query the same way. Probability routing probes categories in order of the
classifier's probability until the probed mass reaches the threshold or the shard cap. Every probed
shard returns its own top k, and the merge keeps the best k by score, so a shard's share of the answer
follows its scores (plus its prior, ln p times prior_weight, when that is set). Each shard gets the full
ef, except in a query probing many shards (the searcher's screen_from_shards): there every shard is
first screened at a fraction of ef, and only those holding any of the merged best k are searched again
at full ef. Scaling ef down by relative probability instead was measured to cost recall@10 0.954 -> 0.894
(30k synthetic items, 20 shards) for no gain in throughput through gRPC, so it is not done. Categories
without a shard hold no items: their probability counts as covered. When no likely category has a shard
(a model trained on other labels, say), every shard is searched rather than none.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Protocol, Sequence, TypeVar

from lookalike.v1 import common_pb2, manifest_pb2, searcher_pb2

# The searcher's defaults when a request leaves threshold / max_shards at 0 (its config can change them).
DEFAULT_THRESHOLD = 0.9
DEFAULT_MAX_SHARDS = 4
# Floor inside ln(p) for the prior, so a category the classifier gave 0 still gets a finite score.
MIN_PROBABILITY = 1e-9
# The largest prior weight a searcher accepts: exporters fit 0 to 2; far above, scores are all prior (and at
# float32's limits they overflow to -inf).
MAX_PRIOR_WEIGHT = 100.0


def part_of(item_id: str, parts: int) -> int:
    """The part of a split category an item belongs to: a hash of its id, so every writer and every
    client agrees with no coordination (a category of 1 part is whole)."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % parts if parts > 1 else 0


# A pod ordinal (the sharded client) or a replica group's name (the searcher's store).
Owner = TypeVar("Owner", int, str)


def rendezvous_owner(key: str, owners: Iterable[Owner]) -> Owner:
    """The owner of `key` by highest-random-weight hashing: stable, and adding an owner moves ~1/n keys.
    Sorted first so that which owner wins does not depend on the order the caller listed them in."""
    return max(sorted(owners), key=lambda owner: hashlib.sha256(f"{key}\0{owner}".encode()).digest())


class Mode(enum.Enum):
    ALL = "all"
    EXPLICIT = "explicit"
    PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Routing:
    """How one search picks its shards: the typed form of the Routing message."""

    mode: Mode = Mode.ALL
    # Mode.EXPLICIT: the categories to search.
    categories: tuple[str, ...] = ()
    # Mode.PROBABILITIES: (category, probability) as the embedder returned them, any order.
    probabilities: tuple[tuple[str, float], ...] = ()
    # 0 and 0 take the searcher's defaults.
    threshold: float = 0.0
    max_shards: int = 0
    # Score = cosine + prior_weight * ln p(category); 0 merges by cosine alone, None takes the default.
    prior_weight: float | None = None

    @classmethod
    def all_shards(cls) -> "Routing":
        return cls()

    @classmethod
    def explicit(cls, categories: Sequence[str]) -> "Routing":
        return cls(Mode.EXPLICIT, categories=tuple(categories))

    @classmethod
    def by_probability(cls, probabilities: Sequence[tuple[str, float]], threshold: float = 0.0,
                       max_shards: int = 0, prior_weight: float | None = None) -> "Routing":
        return cls(Mode.PROBABILITIES, probabilities=tuple((c, float(p)) for c, p in probabilities),
                   threshold=threshold, max_shards=max_shards,
                   prior_weight=None if prior_weight is None else float(prior_weight))

    @classmethod
    def from_message(cls, message: searcher_pb2.Routing | None) -> "Routing":
        """The request's routing (unset: all shards). Values are not validated here: the servicer does."""
        which = message.WhichOneof("mode") if message is not None else None
        if which == "explicit":
            return cls.explicit(list(message.explicit.categories))
        if which == "probabilities":
            spec = message.probabilities
            return cls.by_probability([(c.category, c.probability) for c in spec.categories], spec.threshold,
                                      spec.max_shards, spec.prior_weight if spec.HasField("prior_weight") else None)
        return cls.all_shards()

    def to_message(self) -> searcher_pb2.Routing:
        if self.mode is Mode.EXPLICIT:
            return searcher_pb2.Routing(explicit=searcher_pb2.ExplicitRouting(categories=list(self.categories)))
        if self.mode is Mode.PROBABILITIES:
            return searcher_pb2.Routing(probabilities=searcher_pb2.ProbabilityRouting(
                categories=[common_pb2.CategoryProbability(category=c, probability=p) for c, p in self.probabilities],
                threshold=self.threshold, max_shards=self.max_shards, prior_weight=self.prior_weight))
        return searcher_pb2.Routing(all=searcher_pb2.AllShards())


@dataclass(frozen=True)
class RoutingDefaults:
    """What a probability routing that leaves threshold, max_shards or prior_weight unset gets."""

    threshold: float = DEFAULT_THRESHOLD
    max_shards: int = DEFAULT_MAX_SHARDS
    prior_weight: float = 0.0

    @classmethod
    def from_message(cls, message: searcher_pb2.RoutingSettings) -> "RoutingDefaults":
        """A searcher's defaults as GetStats or GetShardMap report them; a searcher too old to report them
        leaves the message empty, read as the built-in defaults."""
        return cls(message.threshold or DEFAULT_THRESHOLD, message.max_shards or DEFAULT_MAX_SHARDS,
                   message.prior_weight)

    def overridden(self, threshold: float | None, max_shards: int | None) -> tuple[float, int, float]:
        """(threshold, max_shards, prior_weight): these defaults, with the values given in place of theirs."""
        return (self.threshold if threshold is None else threshold,
                self.max_shards if max_shards is None else max_shards, self.prior_weight)

    def to_message(self) -> searcher_pb2.RoutingSettings:
        return searcher_pb2.RoutingSettings(threshold=self.threshold, max_shards=self.max_shards,
                                            prior_weight=self.prior_weight)

    @classmethod
    def of_model(cls, manifest: manifest_pb2.ModelManifest) -> "RoutingDefaults | None":
        """The values fitted on validation at export (manifest.routing), or None for a model without them."""
        if not manifest.HasField("routing"):
            return None
        fitted = manifest.routing
        return cls(float(fitted.threshold), int(fitted.max_shards), float(fitted.prior_weight))


def model_routing(manifest: manifest_pb2.ModelManifest, threshold: float | None = None, max_shards: int | None = None,
                  prior_weight: float | None = None) -> tuple[float, int, float | None]:
    """(threshold, max_shards, prior_weight) for probability routing with this model: each value given, else
    the model's fitted one, else 0, 0 and None, which a searcher reads as its own defaults."""
    fitted = RoutingDefaults.of_model(manifest)
    if fitted is None:
        return threshold or 0.0, max_shards or 0, prior_weight
    return (fitted.threshold if threshold is None else threshold, fitted.max_shards if max_shards is None else max_shards,
            fitted.prior_weight if prior_weight is None else prior_weight)


@dataclass(frozen=True)
class PlannedProbe:
    """One shard a search will probe."""

    category: str
    # What routed the query here: the classifier's probability, 1 for explicit routing, 0 for all shards.
    probability: float
    # Added to every similarity from this shard: prior_weight * ln p under probability routing, else 0.
    prior: float = 0.0


@dataclass(frozen=True)
class RoutingPlan:
    probes: tuple[PlannedProbe, ...]
    # Explicitly named categories that have no shard.
    unknown_categories: tuple[str, ...] = ()
    # PROBABILITIES only when the probes came from the probabilities (not the all-shards fallback).
    mode: Mode = Mode.ALL
    prior_weight: float = 0.0

    @property
    def categories(self) -> list[str]:
        return [probe.category for probe in self.probes]

    def routing_for(self, categories: Collection[str]) -> Routing:
        """A routing that makes a searcher probe exactly these planned shards with the same priors.

        The sharded client plans once over every pod's shards, then sends each pod its part.
        """
        part = [probe for probe in self.probes if probe.category in categories]
        if self.mode is Mode.PROBABILITIES:
            # Threshold 1 and a cap of their number: the pod re-plans exactly these probes (their
            # probabilities sum to less than 1 before the last one, as they did in this plan).
            return Routing.by_probability([(p.category, p.probability) for p in part], threshold=1.0,
                                          max_shards=len(part), prior_weight=self.prior_weight)
        return Routing.explicit([probe.category for probe in part])


def plan(routing: Routing, existing: Collection[str], threshold: float = DEFAULT_THRESHOLD,
         max_shards: int = DEFAULT_MAX_SHARDS, prior_weight: float = 0.0) -> RoutingPlan:
    """The shards one search probes, given the categories that have a shard.

    `threshold` and `max_shards` are the defaults for a routing that leaves them at 0, `prior_weight`
    for one that leaves it unset.
    """
    if routing.mode is Mode.EXPLICIT:
        unique = list(dict.fromkeys(routing.categories))
        return RoutingPlan(tuple(PlannedProbe(c, 1.0) for c in unique if c in existing),
                           tuple(c for c in unique if c not in existing), Mode.EXPLICIT)
    if routing.mode is Mode.PROBABILITIES:
        weight = prior_weight if routing.prior_weight is None else routing.prior_weight
        probes = _by_probability(routing.probabilities, existing, routing.threshold or threshold,
                                 routing.max_shards or max_shards, weight)
        if probes:
            return RoutingPlan(tuple(probes), mode=Mode.PROBABILITIES, prior_weight=weight)
    return RoutingPlan(tuple(PlannedProbe(c, 0.0) for c in sorted(existing)))


def _by_probability(probabilities: Sequence[tuple[str, float]], existing: Collection[str], threshold: float,
                    max_shards: int, prior_weight: float) -> list[PlannedProbe]:
    ranked = sorted(probabilities, key=lambda pair: (-pair[1], pair[0]))
    probes: list[PlannedProbe] = []
    covered = 0.0
    for category, probability in ranked:
        if covered >= threshold or len(probes) >= max_shards:
            break
        covered += probability
        if category in existing:
            prior = prior_weight * math.log(max(probability, MIN_PROBABILITY)) if prior_weight else 0.0
            probes.append(PlannedProbe(category, probability, prior))
    return probes


class Scored(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def score(self) -> float: ...


class ProductScored(Scored, Protocol):
    @property
    def product(self) -> str: ...


Hit = TypeVar("Hit", bound=Scored)
ProductHit = TypeVar("ProductHit", bound=ProductScored)


def merge_hits(hits: Iterable[Hit], k: int) -> list[Hit]:
    """The best k hits by score, each id once (an id moving between shards can briefly be in two)."""
    merged: list[Hit] = []
    seen: set[str] = set()
    for hit in sorted(hits, key=lambda hit: -hit.score):
        if hit.id not in seen:
            seen.add(hit.id)
            merged.append(hit)
            if len(merged) == k:
                break
    return merged


def merge_products(hits: Iterable[ProductHit], k: int,
                   photos: Callable[[ProductHit], int] = lambda hit: 1) -> list[tuple[ProductHit, int]]:
    """The best k distinct products, each as (its best hit by score, how many of its photos are among
    `hits`). An empty product key makes the item a product of its own. `photos` says how many photos a
    hit stands for: 1 for a shard's hits, a group's product_matches when merging several groups' answers."""
    best: dict[tuple[bool, str], ProductHit] = {}
    counts: dict[tuple[bool, str], int] = {}
    seen: set[str] = set()
    for hit in sorted(hits, key=lambda hit: -hit.score):
        if hit.id in seen:
            continue
        seen.add(hit.id)
        key = (True, hit.product) if hit.product else (False, hit.id)
        best.setdefault(key, hit)
        counts[key] = counts.get(key, 0) + photos(hit)
    ranked = sorted(best, key=lambda key: -best[key].score)[:k]
    return [(best[key], counts[key]) for key in ranked]
