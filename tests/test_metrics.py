"""Retrieval metrics against hand-computed cases."""
from __future__ import annotations

import numpy as np
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

    from lookalike.quality.retrieval_metrics import expected_calibration_error

    # Two confident right answers (0.9) and two hesitant ones (0.6), one of them wrong.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    truth = np.array([0, 0, 0, 0])
    # Ten bins of 0.1: (0.8, 0.9] holds both 0.9s, accuracy 1 vs confidence 0.9 -> 0.1 * 2/4; (0.5, 0.6] holds both
    # 0.6s, accuracy 0.5 vs 0.6 -> 0.1 * 2/4; the other bins are empty.
    assert expected_calibration_error(probabilities, truth, bins=10) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def test_top_k_accuracy() -> None:

    from lookalike.quality.retrieval_metrics import top_k_accuracy

    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    truth = np.array([1, 2, 1])  # ranks 2, 1 and 3
    assert [top_k_accuracy(probabilities, truth, k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert top_k_accuracy(np.zeros((0, 3)), np.array([], dtype=int), 2) == 0.0


def test_routing_curve_follows_the_searchers_rule() -> None:
    from lookalike.quality.routing_fit import routing_curve

    queries = [[("a", 0.6), ("b", 0.3), ("c", 0.1)], [("c", 0.97), ("a", 0.02), ("b", 0.01)]]
    curve = {point["threshold"]: point for point in routing_curve(queries, ["b", "c"], ["a", "b", "c"], 0)}
    assert (curve[0.5]["routing_recall"], curve[0.5]["shards_probed"]) == (0.5, 1.0)  # a | c
    assert (curve[0.8]["routing_recall"], curve[0.8]["shards_probed"]) == (1.0, 1.5)  # a, b | c
    assert (curve[0.98]["routing_recall"], curve[0.98]["shards_probed"]) == (1.0, 2.5)  # a, b, c | c, a
    capped = {point["threshold"]: point for point in routing_curve(queries, ["b", "c"], ["a", "b", "c"], 1)}
    assert capped[0.98]["shards_probed"] == 1.0 and capped[0.98]["routing_recall"] == 0.5



def test_routing_defaults_fit_the_threshold_then_the_prior_weight() -> None:
    """Hand-computed: shards x and y, items A (x, red), B (y, blue), C (y, green).

    Query 1 is red (truth x; p = 0.9 x, 0.1 y) and nearer B (cosine 1) than A (0.8). Query 2 is green
    (truth y, but p = 0.92 x, 0.08 y) and is C itself. Thresholds 0.5-0.9 probe x alone and miss query 2's
    shard (routing recall 0.5); 0.95 probes both for both queries (recall 1, 2 shards). There, score =
    cosine + w ln p: query 1 ranks A first once 0.2 > w (ln 0.9 - ln 0.1) = 2.197 w, so from w = 0.1;
    query 2 keeps C first while 1 > w (ln 0.92 - ln 0.08) = 2.442 w, so up to w = 0.2. Only 0.1 and 0.2 rank
    both right (mAP@10 1; 0.75 elsewhere): the smaller, 0.1, is chosen."""
    from lookalike.quality.routing_fit import PRIOR_WEIGHTS, fit_routing_defaults

    catalogue = np.array([[0.8, 0.6, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    categories, labels = ["x", "y", "y"], ["red", "blue", "green"]
    queries = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    probabilities = [[("x", 0.9), ("y", 0.1)], [("x", 0.92), ("y", 0.08)]]

    def fit(**options: float) -> object:
        return fit_routing_defaults(catalogue, categories, labels, queries, probabilities, ["x", "y"],
                                    ["red", "green"], **options)

    fitted = fit(max_shards=2)
    # float fields: the manifest stores them as float32.
    assert (fitted.threshold, fitted.routing_recall, fitted.expected_shards, fitted.queries) == pytest.approx(
        (0.95, 1.0, 2.0, 2))
    scores = {round(score.prior_weight, 6): round(score.map_at_10, 6) for score in fitted.prior_weight_scores}
    assert list(scores) == [round(w, 6) for w in PRIOR_WEIGHTS]
    assert scores == {0.0: 0.75, 0.02: 0.75, 0.05: 0.75, 0.1: 1.0, 0.2: 1.0, 0.5: 0.75, 1.0: 0.75, 2.0: 0.75}
    assert fitted.prior_weight == pytest.approx(0.1)

    # A lower target is met by the first threshold: x alone for both queries (query 2 misses: mAP 0.5 at
    # every weight, so the smallest weight, 0).
    fitted = fit(max_shards=2, target_recall=0.5)
    assert (fitted.threshold, fitted.routing_recall, fitted.expected_shards, fitted.prior_weight) == pytest.approx(
        (0.5, 0.5, 1.0, 0.0))
    # One shard at most: no threshold reaches 0.99, so the best recall with the fewest shards is kept.
    fitted = fit(max_shards=1)
    assert (fitted.threshold, fitted.routing_recall, fitted.max_shards) == pytest.approx((0.5, 0.5, 1))


def test_fashion_mnist_validation_split_never_shares_an_image_with_train(tmp_path) -> None:
    """The validation split is the training file's last images of each class: disjoint from "train"."""
    from lookalike.quality.fashion_mnist import DEBIAN_DIR, materialize

    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (make setup installs it)")
    train = materialize(tmp_path, "train", 20)
    validation = materialize(tmp_path, "validation", 5)
    names = {path.relative_to(train): path for path in train.rglob("*.png")}
    held_out = {path.relative_to(validation): path for path in validation.rglob("*.png")}
    assert len(names) == 200 and len(held_out) == 50 and not set(names) & set(held_out)
    assert {p.parent for p in held_out} == {p.parent for p in names}  # every class in both
    # Named by their index in the training file: the last images of it.
    assert min(int(p.stem.split("-")[1]) for p in held_out) > 59_000
