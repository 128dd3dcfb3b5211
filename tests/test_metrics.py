"""Retrieval metrics against hand-computed cases."""
from __future__ import annotations

import pytest

from lookalike.quality.retrieval_metrics import average_precision, average_precision_over_hits, hit_at, precision_at, recall_at


def test_standard_average_precision() -> None:
    # Relevant at ranks 1, 3 and 6; 4 relevant items exist; k = 5 counts ranks 1 and 3 only.
    ranked = [True, False, True, False, False, True]
    assert average_precision(ranked, 5, total_relevant=4) == pytest.approx((1 / 1 + 2 / 3) / 4)
    assert average_precision(ranked, 10, total_relevant=4) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    # Fewer relevant items than k: divide by what exists, so a perfect ranking scores 1.
    assert average_precision([True, True, False], 10, total_relevant=2) == pytest.approx(1.0)
    assert average_precision([False, False], 10, total_relevant=0) == 0.0


def test_over_hits_average_precision_divides_by_hits_retrieved() -> None:
    assert average_precision_over_hits([True] + [False] * 9, 10) == 1.0
    assert average_precision([True] + [False] * 9, 10, total_relevant=50) == pytest.approx(0.1)
    assert average_precision_over_hits([False, True, True], 10) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision_over_hits([False] * 5, 10) == 0.0


def test_precision_recall_and_hit() -> None:
    ranked = [False, True, True, False]
    assert precision_at(ranked, 4) == 0.5
    assert precision_at(ranked, 10) == pytest.approx(0.2), "missing ranks count as misses"
    assert recall_at(ranked, 2, total_relevant=4) == 0.25
    assert hit_at(ranked, 1) == 0.0 and hit_at(ranked, 2) == 1.0


def test_expected_calibration_error() -> None:
    import numpy as np

    from lookalike.quality.retrieval_metrics import expected_calibration_error

    # Two confident right answers (0.9) and two hesitant ones (0.6), one of them wrong.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    truth = np.array([0, 0, 0, 0])
    # Bin (0.8, 0.87]: none; 0.9 bin: accuracy 1 vs confidence 0.9 -> 0.1 * 2/4; 0.6 bin: accuracy 0.5 vs 0.6 -> 0.1 * 2/4.
    assert expected_calibration_error(probabilities, truth, bins=10) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def test_top_k_accuracy() -> None:
    import numpy as np

    from lookalike.quality.retrieval_metrics import top_k_accuracy

    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    truth = np.array([1, 2, 1])  # ranks 2, 1 and 3
    assert [top_k_accuracy(probabilities, truth, k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert top_k_accuracy(np.zeros((0, 3)), np.array([], dtype=int), 2) == 0.0


def test_routing_curve_follows_the_searchers_rule() -> None:
    from lookalike.tools.evaluate import routing_curve

    queries = [[("a", 0.6), ("b", 0.3), ("c", 0.1)], [("c", 0.97), ("a", 0.02), ("b", 0.01)]]
    curve = {point["threshold"]: point for point in routing_curve(queries, ["b", "c"], ["a", "b", "c"], 0)}
    assert (curve[0.5]["routing_recall"], curve[0.5]["shards_probed"]) == (0.5, 1.0)  # a | c
    assert (curve[0.8]["routing_recall"], curve[0.8]["shards_probed"]) == (1.0, 1.5)  # a, b | c
    assert (curve[0.98]["routing_recall"], curve[0.98]["shards_probed"]) == (1.0, 2.5)  # a, b, c | c, a
    capped = {point["threshold"]: point for point in routing_curve(queries, ["b", "c"], ["a", "b", "c"], 1)}
    assert capped[0.98]["shards_probed"] == 1.0 and capped[0.98]["routing_recall"] == 0.5
