"""Retrieval metrics: AP@k (standard, and over the hits retrieved), precision@k, recall@k; calibration error.

`relevant` flags are the ranked hits' relevance (True where the hit matches the query's label);
`total_relevant` is how many relevant items the catalogue holds for that query.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def average_precision(relevant: Sequence[bool], k: int, total_relevant: int) -> float:
    """Standard AP@k: the sum of precision@i at each relevant rank i <= k, over min(k, total_relevant)."""
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant[:k], start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    denominator = min(k, total_relevant)
    return total / denominator if denominator else 0.0


def average_precision_over_hits(relevant: Sequence[bool], k: int) -> float:
    """AP@k over the hits retrieved: the same sum divided by the relevant hits in the top k (seed paper 001's formula).

    One relevant hit at rank 1 and nothing else scores 1.0, so it reads higher than standard AP.
    """
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant[:k], start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def precision_at(relevant: Sequence[bool], k: int) -> float:
    """Relevant hits in the top k, over k."""
    return sum(bool(r) for r in relevant[:k]) / k


def recall_at(relevant: Sequence[bool], k: int, total_relevant: int) -> float:
    """Relevant hits in the top k, over all relevant items in the catalogue."""
    return sum(bool(r) for r in relevant[:k]) / total_relevant if total_relevant else 0.0


def hit_at(relevant: Sequence[bool], k: int) -> float:
    """1.0 when a relevant item is in the top k (the R@1 / top-k accuracy of the papers)."""
    return 1.0 if any(relevant[:k]) else 0.0


def top_k_accuracy(probabilities: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable: routing recall with exactly k shards."""
    if len(truth) == 0:
        return 0.0
    top = np.argsort(-np.asarray(probabilities), axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for label, row in zip(truth, top)]))


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 probability: mean |accuracy - confidence| over equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def negative_log_likelihood(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean -ln p(true class), with p floored at 1e-12 so a confident mistake costs a finite amount."""
    chosen = np.asarray(probabilities)[np.arange(len(truth)), np.asarray(truth)]
    return float(-np.mean(np.log(np.maximum(chosen, 1e-12)))) if len(truth) else 0.0
