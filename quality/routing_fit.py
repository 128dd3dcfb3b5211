"""Routing defaults fitted on validation photos: the threshold that reaches a routing recall, then the prior weight.

The exporter calls `fit_routing_defaults` with the validation photos as queries and the training photos
as the catalogue, and stores the result in the manifest; `lookalike eval` then scores held-out queries
with those values, so no query that is scored has tuned what scores it. Both steps follow the searcher's
own rule (lookalike.routing.plan) over exact cosine search within the probed shards, which is what HNSW
approximates.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from lookalike.quality.retrieval_metrics import average_precision
from lookalike.routing import DEFAULT_MAX_SHARDS, Routing, RoutingPlan, plan
from lookalike.v1 import manifest_pb2

ROUTING_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
PRIOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
TARGET_ROUTING_RECALL = 0.99

Probabilities = Sequence[tuple[str, float]]


def routing_at(query_probabilities: Sequence[Probabilities], truths: Sequence[str], shards: Sequence[str],
               threshold: float, max_shards: int) -> tuple[float, float]:
    """(routing recall, mean shards probed) at one threshold and cap, by the searcher's rule."""
    probed = [set(plan(Routing.by_probability(probabilities, threshold, max_shards), shards).categories)
              for probabilities in query_probabilities]
    return float(np.mean([t in p for t, p in zip(truths, probed)])), float(np.mean([len(p) for p in probed]))


def routing_curve(query_probabilities: Sequence[Probabilities], truths: Sequence[str], shards: Sequence[str],
                  max_shards: int) -> list[dict]:
    """Routing recall and mean shards probed per threshold of ROUTING_THRESHOLDS, by the searcher's rule
    (no cap when max_shards is 0)."""
    cap = max_shards or len(shards)
    curve = []
    for threshold in ROUTING_THRESHOLDS:
        recall, probed = routing_at(query_probabilities, truths, shards, threshold, cap)
        curve.append({"threshold": threshold, "max_shards": cap, "routing_recall": round(recall, 4),
                      "shards_probed": round(probed, 3)})
    return curve


def routed_map_at_10(similarities: np.ndarray, catalogue_categories: Sequence[str], catalogue_labels: Sequence[str],
                     plans: Sequence[RoutingPlan], query_labels: Sequence[str]) -> float:
    """Mean standard AP@10 of routed exact search: each query ranks the catalogue items of its planned shards
    by cosine plus their shard's prior (similarities: [queries, catalogue])."""
    categories = np.asarray(catalogue_categories)
    labels = np.asarray(catalogue_labels)
    totals = Counter(catalogue_labels)
    scores = []
    for row, (routed, label) in enumerate(zip(plans, query_labels)):
        priors = {probe.category: probe.prior for probe in routed.probes}
        members = np.flatnonzero(np.isin(categories, list(priors)))
        ranked = similarities[row, members] + np.array([priors[c] for c in categories[members]], dtype=np.float32)
        top = members[np.argsort(-ranked, kind="stable")[:10]]
        scores.append(average_precision(list(labels[top] == label), 10, totals[label]))
    return float(np.mean(scores)) if scores else 0.0


def fit_routing_defaults(catalogue_vectors: np.ndarray, catalogue_categories: Sequence[str],
                         catalogue_labels: Sequence[str], query_vectors: np.ndarray,
                         query_probabilities: Sequence[Probabilities], query_categories: Sequence[str],
                         query_labels: Sequence[str], max_shards: int = DEFAULT_MAX_SHARDS,
                         target_recall: float = TARGET_ROUTING_RECALL) -> manifest_pb2.RoutingDefaults:
    """The threshold of ROUTING_THRESHOLDS (at most `max_shards` shards) that first reaches `target_recall` on
    these queries (else the one with the highest recall, then the fewest shards), then the prior weight of
    PRIOR_WEIGHTS with the best mAP@10 at that threshold (ties: the smaller weight)."""
    shards = sorted(set(catalogue_categories))
    curve = routing_curve(query_probabilities, query_categories, shards, max_shards)
    reaching = [point for point in curve if point["routing_recall"] >= target_recall]
    chosen = reaching[0] if reaching else max(curve, key=lambda p: (p["routing_recall"], -p["shards_probed"]))
    similarities = np.asarray(query_vectors, np.float32) @ np.asarray(catalogue_vectors, np.float32).T
    scores = []
    for weight in PRIOR_WEIGHTS:
        plans = [plan(Routing.by_probability(probabilities, chosen["threshold"], max_shards, weight), shards)
                 for probabilities in query_probabilities]
        scores.append(manifest_pb2.PriorWeightScore(
            prior_weight=weight, map_at_10=routed_map_at_10(similarities, catalogue_categories, catalogue_labels,
                                                            plans, query_labels)))
    best = max(scores, key=lambda score: (round(score.map_at_10, 6), -score.prior_weight))
    return manifest_pb2.RoutingDefaults(
        queries=len(query_labels), target_recall=target_recall, threshold=chosen["threshold"], max_shards=max_shards,
        routing_recall=chosen["routing_recall"], expected_shards=chosen["shards_probed"],
        prior_weight=best.prior_weight, prior_weight_scores=scores)
