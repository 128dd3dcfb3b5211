"""`lookalike eval`: retrieval quality through the real services, for each routing mode side by side.

The catalogue is embedded and stored in a fresh searcher (category = its partition label); each query
photo is embedded once and searched with every routing mode. Relevance is the query's `label` (the
fine class for grocery, where the partition is the coarse class). Reported per mode, overall and per
query category: mAP@10 and mAP@100 (standard, and over the hits retrieved as seed paper 001 computed it), P@10,
R@1 and R@10 (a relevant item among the first 1 or 10), coverage@10 (the share of the query's relevant catalogue
items among the first 10), NN-recall@10
against exact global search, the share of catalogue vectors scanned, routing recall, shards probed and
latency; plus top-1 category accuracy, a confusion matrix, the calibration error of the probabilities, and
the routing curve: routing recall and mean shards probed at each probability threshold, planned from the
query probabilities by the searcher's own routing rule (lookalike.routing).

The adaptive modes use the routing the model's manifest holds (threshold, shard cap and prior weight
fitted on validation photos at export, lookalike.quality.routing_fit) unless told otherwise, so nothing
is tuned on the queries being scored. Fitting the prior weight on the queries themselves exists only as
a diagnostic (`fit_on_queries`), reported under its own, labelled mode.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike.quality.labelled_images import LabelledImage, refuse_shared_photos
from lookalike.quality.routing_fit import PRIOR_WEIGHTS, routing_curve
from lookalike.client.embedder_client import EmbeddedImage, EmbedderClient
from lookalike.quality.retrieval_metrics import (average_precision, average_precision_over_hits, expected_calibration_error, hit_at,
                             precision_at, recall_at, top_k_accuracy)
from lookalike.tools.processes import running_service
from lookalike.client.facade import RoutingMode, routing_request, upsert_batches
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
from lookalike.routing import DEFAULT_MAX_SHARDS, model_routing

K_VALUES = (10, 100)
DIAGNOSTIC = "fitted on these queries: diagnostic only"


def _embed(client: EmbedderClient, images: Sequence[LabelledImage]) -> tuple[np.ndarray, list[EmbeddedImage]]:
    """The images' vectors stacked, and each image's result (with every category's probability)."""
    embedded = []
    for start in range(0, len(images), 64):
        for result in client.embed([i.path for i in images[start:start + 64]], top_categories=0):
            if not result.ok:
                raise ValueError(f"{result.id}: {result.error}")
            embedded.append(result)
    return np.stack([result.vector for result in embedded]), embedded


def _mode_metrics(rows: list[dict]) -> dict:
    def mean(key: str) -> float:
        return round(float(np.mean([row[key] for row in rows])), 4)

    keys = [key for key in rows[0] if key not in ("category", "latency")]
    latencies = [row["latency"] for row in rows]
    return {**{key: mean(key) for key in keys}, "queries": len(rows),
            "latency_mean_ms": round(float(np.mean(latencies)) * 1000, 3),
            "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3)}


def routing_source(given: dict[str, float | int | None], manifest_has_routing: bool) -> str:
    """Where the routing values of a report came from: the ones given (not None), the rest from the model's
    manifest, or from the searcher's defaults for a model without fitted routing."""
    rest = "model manifest (fitted on validation at export)" if manifest_has_routing else "searcher defaults"
    named = [name for name, value in given.items() if value is not None]
    if len(named) == len(given):
        return "given"
    return f"{', '.join(named)} given, the rest from the {rest}" if named else rest


def evaluate(embedder: str, searcher: str, catalogue: Sequence[LabelledImage], queries: Sequence[LabelledImage],
             prior_weight: float | None = None, threshold: float | None = None, max_shards: int | None = None,
             fit_on_queries: bool = False) -> dict:
    """The full report (see the module docstring). Routing values left None come from the model's manifest
    (else the searcher's defaults and prior weight 0); `fit_on_queries` adds the diagnostic mode."""
    with EmbedderClient(embedder) as embedder_client, SearcherClient(searcher) as searcher_client:
        info = embedder_client.model_info()
        model_id = info.model_id
        fitted = info.manifest.routing if info.manifest.HasField("routing") else None
        source = routing_source({"threshold": threshold, "max shards": max_shards, "prior weight": prior_weight},
                                fitted is not None)
        threshold, max_shards, given_weight = model_routing(info.manifest, threshold, max_shards, prior_weight)
        prior_weight = round(given_weight or 0.0, 6)  # the manifest's float32, as written
        catalogue_vectors, _ = _embed(embedder_client, catalogue)
        items = [CatalogueItem(image.item_id, image.category, vector, model_id, {"label": image.label})
                 for image, vector in zip(catalogue, catalogue_vectors)]
        for batch, _ in upsert_batches(items, replace=False):
            response = searcher_client.upsert(batch)
            failed = [s.message for s in response.statuses if s.code]
            if failed:
                raise ValueError(f"upsert refused: {failed[:3]}")
        embed_started = time.perf_counter()
        query_vectors, query_embedded = _embed(embedder_client, queries)
        query_categories = [result.categories for result in query_embedded]
        embed_seconds = (time.perf_counter() - embed_started) / len(queries)

        shard_sizes = Counter(image.category for image in catalogue)
        relevant_total = Counter(image.label for image in catalogue)
        exact = np.argsort(-(query_vectors @ catalogue_vectors.T), axis=1)[:, :10]
        ids = [image.item_id for image in catalogue]

        def run(mode: RoutingMode, weight: float = 0.0) -> list[dict]:
            rows = []
            for query, vector, embedded, exact_row in zip(queries, query_vectors, query_embedded, exact):
                if not relevant_total[query.label]:
                    continue  # nothing in the catalogue to find: no retrieval figure can score it (counted below)
                routing = routing_request(mode, embedded, threshold, max_shards, weight)
                started = time.perf_counter()
                response = searcher_client.search(vector, model_id, k=max(K_VALUES), routing=routing)
                latency = time.perf_counter() - started
                relevant = [hit.attributes["label"] == query.label for hit in response.hits]
                probed = {p.category for p in response.probes}
                row = {"category": query.category, "latency": latency}
                for k in K_VALUES:
                    row[f"mAP@{k}"] = average_precision(relevant, k, relevant_total[query.label])
                    row[f"mAP@{k} (over hits)"] = average_precision_over_hits(relevant, k)
                row["P@10"] = precision_at(relevant, 10)
                # R@k as the papers count it: a relevant item among the first k (a hit rate); coverage@10 is the
                # share of all the query's relevant catalogue items found in the first 10.
                row["R@1"] = hit_at(relevant, 1)
                row["R@10"] = hit_at(relevant, 10)
                row["coverage@10"] = recall_at(relevant, 10, relevant_total[query.label])
                row["NN-recall@10"] = len({hit.id for hit in response.hits[:10]} & {ids[i] for i in exact_row}) / 10
                row["scanned_share"] = sum(shard_sizes[c] for c in probed) / len(catalogue)
                row["routing_recall"] = float(query.category in probed)
                row["shards_probed"] = float(len(probed))
                rows.append(row)
            return rows

        results = {"global": run("all"), "top-1 shard": run("top1"), "adaptive": run("adaptive"),
                   f"adaptive + prior {prior_weight:g}": run("adaptive", prior_weight)}
        diagnostic = None
        if fit_on_queries:
            scores = {w: _mode_metrics(run("adaptive", w))["mAP@10"] for w in PRIOR_WEIGHTS}
            best = max(scores, key=lambda w: (scores[w], -w))
            diagnostic = {"prior_weight": best, "mAP@10_by_prior_weight": {str(w): v for w, v in scores.items()}}
            results[f"adaptive + prior {best:g} ({DIAGNOSTIC})"] = run("adaptive", best)

    labels = sorted({image.category for image in catalogue} | {image.category for image in queries})
    index = {label: i for i, label in enumerate(labels)}
    predicted = [categories[0][0] for categories in query_categories]
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for query, guess in zip(queries, predicted):
        if guess in index:
            confusion[index[query.category], index[guess]] += 1
    probability_matrix = np.array([[dict(categories).get(label, 0.0) for label in labels]
                                   for categories in query_categories])
    truth = np.array([index[query.category] for query in queries])
    report = {
        "model_id": model_id, "catalogue_items": len(catalogue), "queries": len(queries),
        "queries_without_relevant_items": sum(not relevant_total[query.label] for query in queries),
        "category_top1_accuracy": round(float(np.mean([g == q.category for g, q in zip(predicted, queries)])), 4),
        "category_top_k_accuracy": {str(k): round(top_k_accuracy(probability_matrix, truth, k), 4) for k in (2, 3)},
        "expected_calibration_error": round(expected_calibration_error(probability_matrix, truth), 4),
        "embed_ms_per_query": round(embed_seconds * 1000, 2),
        "routing_source": source, "prior_weight": prior_weight,
        "prior_weight_fitted_on_queries_diagnostic": diagnostic,
        "modes": {mode: _mode_metrics(rows) for mode, rows in results.items()},
        "per_category": {mode: {category: _mode_metrics(members) for category, members in sorted(
            _group(rows).items())} for mode, rows in results.items()},
        "confusion": {"labels": labels, "matrix": confusion.tolist()},
        "routing_threshold": round(threshold, 6) or None, "routing_max_shards": max_shards or None,
        "manifest_calibration": None if not info.manifest.HasField("calibration") else {
            "method": info.manifest.calibration.method or "temperature",
            "temperature": round(info.manifest.calibration.temperature, 4),
            "validation_images": info.manifest.calibration.images,
            "validation_ece": [round(info.manifest.calibration.ece_before, 4),
                               round(info.manifest.calibration.ece_after, 4)],
            "validation_nll": [round(info.manifest.calibration.nll_before, 4),
                               round(info.manifest.calibration.nll_after, 4)]},
        "manifest_routing": None if fitted is None else {
            "threshold": round(fitted.threshold, 6), "max_shards": fitted.max_shards,
            "prior_weight": round(fitted.prior_weight, 6), "validation_queries": fitted.queries,
            "validation_routing_recall": round(fitted.routing_recall, 4),
            "validation_shards": round(fitted.expected_shards, 3)},
        # Without the model's cap, the one the searcher applies to routings that leave it unset.
        "routing_curve": routing_curve(query_categories, [query.category for query in queries], sorted(shard_sizes),
                                       max_shards or DEFAULT_MAX_SHARDS),
    }
    return report


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["category"]].append(row)
    return groups


def run_eval(model_dir: Path, catalogue: Sequence[LabelledImage], queries: Sequence[LabelledImage],
             prior_weight: float | None, as_json: bool, output: Path | None = None, threshold: float | None = None,
             max_shards: int | None = None, fit_on_queries: bool = False) -> int:
    """Starts an embedder on `model_dir` and an empty searcher, evaluates, prints the report."""
    refuse_shared_photos(catalogue, queries, "queries also in the catalogue (each would find itself)")
    if output is not None and not output.parent.is_dir():  # found out after minutes of evaluation, it lost them
        raise ValueError(f"--output {output}: its folder {output.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as data, \
            running_service("lookalike.embedder", ["--model", str(model_dir)]) as (_, embedder_port), \
            running_service("lookalike.searcher", ["--data", data, "--snapshot-interval", "0"]) as (_, searcher_port):
        report = evaluate(f"127.0.0.1:{embedder_port}", f"127.0.0.1:{searcher_port}", catalogue, queries, prior_weight,
                          threshold, max_shards, fit_on_queries)
    if output is not None:
        output.write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model_id']}: {report['catalogue_items']} catalogue items, {report['queries']} queries")
    if report["queries_without_relevant_items"]:
        print(f"{report['queries_without_relevant_items']} queries have no item of their label in the catalogue: left "
              "out of the retrieval figures (category accuracy and routing still count them)")
    top_k = report["category_top_k_accuracy"]
    print(f"category top-1 accuracy {report['category_top1_accuracy']} (top-2 {top_k['2']}, top-3 {top_k['3']}), "
          f"expected calibration error {report['expected_calibration_error']}")
    calibration = report["manifest_calibration"]
    if calibration:
        print(f"calibration (fitted at export on {calibration['validation_images']} validation photos): "
              f"{calibration['method']}, temperature {calibration['temperature']:g}; validation ECE "
              f"{calibration['validation_ece'][0]} -> {calibration['validation_ece'][1]}, NLL "
              f"{calibration['validation_nll'][0]} -> {calibration['validation_nll'][1]}")
    print(f"routing: threshold {report['routing_threshold'] or 'server default'}, at most "
          f"{report['routing_max_shards'] or 'server default'} shards, prior weight {report['prior_weight']:g} "
          f"({report['routing_source']})")
    if report["prior_weight_fitted_on_queries_diagnostic"]:
        scores = report["prior_weight_fitted_on_queries_diagnostic"]["mAP@10_by_prior_weight"]
        print(f"prior weight {DIAGNOSTIC}, mAP@10 by weight: " + ", ".join(f"{w} {v}" for w, v in scores.items()))
    columns = ["mAP@10", "mAP@10 (over hits)", "mAP@100", "P@10", "R@1", "R@10", "coverage@10", "NN-recall@10",
               "scanned_share",
               "routing_recall", "shards_probed", "latency_mean_ms", "latency_p99_ms"]
    print(f"\n{'routing':<24}" + "".join(f"{c:>19}" for c in columns))
    for mode, metrics in report["modes"].items():
        print(f"{mode:<24}" + "".join(f"{metrics[c]:>19}" for c in columns))
    cap = report["routing_curve"][0]["max_shards"]
    print(f"\nrouting curve (the searcher's rule on these queries' probabilities, at most {cap} shards; adaptive "
          f"above used threshold {report['routing_threshold'] or 'server default'})")
    for point in report["routing_curve"]:
        print(f"  threshold {point['threshold']:<6} routing recall {point['routing_recall']:.4f}  "
              f"shards probed {point['shards_probed']:.3f}")
    labels, matrix = report["confusion"]["labels"], report["confusion"]["matrix"]
    print("\nconfusion (rows: true category, columns: predicted; only categories with queries)")
    for label, row in zip(labels, matrix):
        if sum(row):
            top = sorted(((count, labels[j]) for j, count in enumerate(row) if count), reverse=True)[:4]
            print(f"  {label:<18} " + ", ".join(f"{name} {count}" for count, name in top))
    return 0
