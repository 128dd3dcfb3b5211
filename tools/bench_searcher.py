"""`lookalike bench searcher`: the searcher through gRPC against in-process hnswlib on the same shards.

The catalogue is synthetic (no 100k-item real catalogue exists on these machines): unit vectors drawn
around one random centre per category, so categories are real clusters whose neighbourhoods overlap.
A simulated classifier gives each query probabilities (softmax of its similarity to the centres) for
probability routing. Measured in one run: build rate, memory per item, restart time, and queries/s
with p50/p99 for one shard, adaptive routing and all shards, at 1 and 8 concurrent clients, each
against a plain in-process hnswlib loop over the same shards, with recall@10 against exact search.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np

from lookalike.searcher.catalogue import in_lanes
from lookalike.serving.cpus import available_cpus
from lookalike.tools.benchmarking import measure, p50_p99_ms, resident_bytes
from lookalike.tools.processes import running_service
from lookalike.client.connection import LookalikeError
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request

MODEL = "synthetic@bench"
K = 10


@dataclass
class QueryRow:
    routing: str
    path: str
    clients: int
    queries_per_second: float
    p50_ms: float
    p99_ms: float
    # Against exact search over the shards this query probed (the index's own accuracy) ...
    recall_probed: float
    # ... and against exact search over the whole catalogue (what routing gives up).
    recall_global: float
    mean_shards: float
    ratio: float = 0.0


def exact_top_k(similarities: np.ndarray, labels: np.ndarray, allowed: list[list[int]] | None = None) -> list[set[int]]:
    """Each query's exact top K item numbers: over the whole catalogue, or over the categories in allowed[i]."""
    if allowed is None:
        return [set(row.tolist()) for row in np.argsort(-similarities, axis=1)[:, :K]]
    exact = []
    for i, categories in enumerate(allowed):
        items = np.flatnonzero(np.isin(labels, categories))
        exact.append(set(items[np.argsort(-similarities[i, items])[:K]].tolist()))
    return exact


def recall(answers: list[set[int]], exact: list[set[int]]) -> float:
    """Mean recall@K of the answers against the exact sets."""
    return round(float(np.mean([len(answer & truth) / K for answer, truth in zip(answers, exact)])), 4)


# One lane per CPU, as the searcher's probe lanes (probe_threads 0): the in-process baseline gets the same cores.
LANES = available_cpus()


def synthetic(count: int, dimension: int, categories: int, offset: float, spread: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit vectors, category index per vector, unit category centres).

    Centres share a common direction (`offset` sets how far apart they are) and items scatter around
    them (`spread`), so nearest neighbours often cross categories, as they do in real catalogues.
    """
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dimension).astype(np.float32)
    common /= np.linalg.norm(common)
    centres = common + offset * rng.normal(size=(categories, dimension)).astype(np.float32) / np.sqrt(dimension)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, categories, size=count)
    vectors = centres[labels] + spread * rng.normal(size=(count, dimension)).astype(np.float32) / np.sqrt(dimension)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), labels, centres


def simulated_probabilities(queries: np.ndarray, centres: np.ndarray, temperature: float) -> np.ndarray:
    logits = queries @ centres.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def run_searcher_bench(count: int = 100_000, dimension: int = 256, categories: int = 20, queries: int = 1000,
                       seconds: float = 5.0, as_json: bool = False) -> int:
    from lookalike.searcher.config import SearcherConfig

    config = SearcherConfig(data_dir=Path("."))
    vectors, labels, centres = synthetic(count + queries, dimension, categories, offset=0.35, spread=1.1, seed=0)
    query_vectors, query_labels = vectors[count:], labels[count:]
    vectors, labels = vectors[:count], labels[:count]
    names = [f"category-{i:02d}" for i in range(categories)]
    probabilities = simulated_probabilities(query_vectors, centres, temperature=0.02)
    similarities = query_vectors @ vectors.T
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "items": count, "dimension": dimension, "categories": categories, "queries": queries,
                    "M": config.m, "ef_construction": config.ef_construction,
                    "classifier_top1_accuracy": round(float((probabilities.argmax(1) == query_labels).mean()), 4),
                    "exact_top10_in_true_category": round(float(
                        (labels[np.argsort(-similarities, axis=1)[:, :K]] == query_labels[:, None]).mean()), 4)}

    # In-process hnswlib on the same shards, same parameters: the baseline.
    members = [np.flatnonzero(labels == c) for c in range(categories)]
    started = time.perf_counter()
    indexes = []
    for c in range(categories):
        index = hnswlib.Index(space="ip", dim=dimension)
        index.init_index(max_elements=len(members[c]), ef_construction=config.ef_construction, M=config.m)
        index.add_items(vectors[members[c]], members[c], num_threads=-1)
        indexes.append(index)
    report["hnswlib_build_items_per_second"] = round(count / (time.perf_counter() - started), 1)
    ef, reached = smallest_ef_for_recall(indexes, labels, query_vectors, similarities, probabilities.argmax(1),
                                         target=0.95)
    for index in indexes:
        index.set_ef(ef)
    report["ef"], report["in_process_recall_at_ef"] = ef, reached
    report["hnswlib_formula_bytes_per_item"] = dimension * 4 + config.m * 2 * 4  # hnswlib README's estimate

    data_dir = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    try:
        args = ["--data", str(data_dir), "--snapshot-interval", "0", "--ef", str(ef)]
        with running_service("lookalike.searcher", args) as (process, port), SearcherClient(f"127.0.0.1:{port}") as client:
            idle_rss = resident_bytes(process.pid)
            started = time.perf_counter()
            for start in range(0, count, 1000):
                client.upsert([CatalogueItem(f"item-{i}", names[labels[i]], vectors[i], MODEL)
                               for i in range(start, min(start + 1000, count))], timeout=120)
            report["grpc_build_items_per_second"] = round(count / (time.perf_counter() - started), 1)
            stats = client.stats()
            report["searcher_estimate_bytes_per_item"] = round(sum(s.memory_bytes for s in stats.shards) / count, 1)
            report["searcher_rss_bytes_per_item"] = round((resident_bytes(process.pid) - idle_rss) / count, 1)
            report["rows"] = [asdict(row) for row in _query_rows(client, indexes, query_vectors, probabilities, names,
                                                                 labels, similarities, seconds, config, ef)]
            stop_started = time.perf_counter()
        report["shutdown_with_snapshot_seconds"] = round(time.perf_counter() - stop_started, 2)
        for label, prepare in [("restart_from_snapshots_seconds", lambda: None),
                               ("restart_rebuilding_from_sqlite_seconds",
                                lambda: shutil.rmtree(data_dir / "snapshots", ignore_errors=True))]:
            prepare()
            started = time.perf_counter()
            with running_service("lookalike.searcher", ["--data", str(data_dir), "--snapshot-interval", "0"]) as (_, port):
                report[label] = round(time.perf_counter() - started, 2)
                with SearcherClient(f"127.0.0.1:{port}") as client:
                    assert client.stats().items == count
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def smallest_ef_for_recall(indexes: list, labels: np.ndarray, queries: np.ndarray, similarities: np.ndarray,
                            top_shard: np.ndarray, target: float) -> tuple[int, float]:
    """(ef, the recall@10 it reaches): the smallest ef (64, 128, ...) at which in-process hnswlib reaches `target`
    recall@10 both over all shards and within each query's most probable shard (each against exact search over
    the same items), else 1024 and the lower recall it reached. labels[i] is the shard holding item i."""
    exact = exact_top_k(similarities, labels)
    exact_in_shard = exact_top_k(similarities, labels, [[shard] for shard in top_shard.tolist()])
    for ef in (64, 128, 256, 512, 1024):
        found = []
        for index in indexes:
            index.set_ef(ef)
            found.append(index.knn_query(queries, k=K))
        ids = np.concatenate([f[0] for f in found], axis=1)
        distances = np.concatenate([f[1] for f in found], axis=1)
        best = np.take_along_axis(ids, np.argsort(distances, axis=1)[:, :K], axis=1)
        global_recall = recall([set(row.tolist()) for row in best], exact)
        shard_recall = recall([set(found[s][0][i].tolist()) for i, s in enumerate(top_shard)], exact_in_shard)
        if min(global_recall, shard_recall) >= target or ef == 1024:
            return ef, min(global_recall, shard_recall)
    raise AssertionError("the ef ladder ends at 1024")


def _query_rows(client: SearcherClient, indexes: list, query_vectors: np.ndarray, probabilities: np.ndarray,
                names: list[str], labels: np.ndarray, similarities: np.ndarray, seconds: float, config,
                ef: int) -> list[QueryRow]:
    from lookalike.routing import Routing, plan

    count = len(query_vectors)
    exact_global = exact_top_k(similarities, labels)
    index_of = {name: i for i, name in enumerate(names)}
    plans = {
        "one shard (top-1 category)": [[names[int(p.argmax())]] for p in probabilities],
        "adaptive (threshold 0.9, at most 4 shards)": [
            plan(Routing.by_probability(list(zip(names, map(float, p)))), set(names), config.routing_threshold,
                 config.routing_max_shards).categories for p in probabilities],
        "all shards": [names for _ in range(count)],
    }
    routings = {
        "one shard (top-1 category)": [routing_for(categories=shards) for shards in plans["one shard (top-1 category)"]],
        "adaptive (threshold 0.9, at most 4 shards)": [routing_for(probabilities=list(zip(names, map(float, p))))
                                                       for p in probabilities],
        "all shards": [routing_for() for _ in range(count)],
    }
    rows = []
    lanes = ThreadPoolExecutor(LANES, thread_name_prefix="lane")
    for mode, shard_lists in plans.items():
        def local(i: int) -> list[int]:
            def search(name: str) -> list[tuple[float, int]]:
                ids, distances = indexes[index_of[name]].knn_query(query_vectors[i][None], k=K, num_threads=1)
                return list(zip(distances[0].tolist(), ids[0].tolist()))

            found = [hit for hits in in_lanes(lanes, LANES, shard_lists[i], search) for hit in hits]
            return [item for _, item in sorted(found)[:K]]

        def remote(i: int) -> list[int]:
            hits = client.search(query_vectors[i], MODEL, K, routings[mode][i]).hits
            return [int(hit.id.split("-")[1]) for hit in hits]

        exact_probed = exact_top_k(similarities, labels, [[index_of[name] for name in shards] for shards in shard_lists])
        recalls = {}
        for path, fn in (("in-process hnswlib", local), ("gRPC searcher", remote)):
            answers = [set(fn(i)) for i in range(count)]
            recalls[path] = (recall(answers, exact_probed), recall(answers, exact_global))
        mean_shards = float(np.mean([len(s) for s in shard_lists]))
        for clients in (1, 8):
            baseline = None
            for path, fn in (("in-process hnswlib", local), ("gRPC searcher", remote)):
                counter = iter(range(1 << 62))
                rate, latencies = measure(lambda: (fn(next(counter) % count), 1)[1], seconds, clients)
                row = QueryRow(mode, path, clients, round(rate, 1), *p50_p99_ms(latencies), *recalls[path],
                               round(mean_shards, 2))
                baseline = baseline or rate
                row.ratio = round(rate / baseline, 3)
                rows.append(row)
    one_shard = plans["one shard (top-1 category)"]
    exact_one_shard = exact_top_k(similarities, labels, [[index_of[shards[0]]] for shards in one_shard])
    rows += _mixed_ef_rows(client, indexes, query_vectors, one_shard, index_of, (exact_one_shard, exact_global),
                           seconds, ef)
    rows += _batch_rows(client, indexes, query_vectors, one_shard, index_of, (exact_one_shard, exact_global), seconds,
                        lanes)
    lanes.shutdown()
    return rows


def _batch_rows(client: SearcherClient, indexes: list, query_vectors: np.ndarray, shard_lists: list[list[str]],
                index_of: dict[str, int], exact: tuple[list[set[int]], list[set[int]]], seconds: float,
                lanes: ThreadPoolExecutor, batch: int = 32) -> list[QueryRow]:
    """One-shard searches 32 per call: SearchBatch through gRPC against in-process knn_query over the same
    32 queries (grouped by shard, one knn_query per shard, the shards dealt into the lanes), at 1 client.
    exact: each query's exact top K in its shard and over everything."""
    count = len(query_vectors)
    requests = [search_request(query_vectors[i], MODEL, K, routing_for(categories=shard_lists[i]), 0)
                for i in range(count)]
    shard_of = np.array([index_of[shards[0]] for shards in shard_lists])

    def local(members: np.ndarray) -> list[set[int]]:
        def search(shard: int) -> list[tuple[int, set[int]]]:
            chosen = members[shard_of[members] == shard]
            ids, _ = indexes[shard].knn_query(query_vectors[chosen], k=K, num_threads=1)
            return list(zip(chosen.tolist(), (set(row.tolist()) for row in ids)))

        answers = dict(pair for pairs in in_lanes(lanes, LANES, np.unique(shard_of[members]).tolist(), search)
                       for pair in pairs)
        return [answers[i] for i in members.tolist()]

    def remote(members: np.ndarray) -> list[set[int]]:
        answers = client.search_batch(requests[members[0]:members[-1] + 1])
        for answer in answers:
            if isinstance(answer, LookalikeError):
                raise answer  # a benchmark with a refused query measures nothing
        return [{int(hit.id.split("-")[1]) for hit in answer.hits} for answer in answers]

    rows, baseline = [], 0.0
    for path, fn in (("in-process hnswlib", local), ("gRPC searcher", remote)):
        answers = [answer for start in range(0, count, batch) for answer in fn(np.arange(start, min(start + batch, count)))]
        counter = iter(range(1 << 62))

        def one_call() -> int:
            start = next(counter) * batch % (count - batch)
            fn(np.arange(start, start + batch))
            return batch

        rate, latencies = measure(one_call, seconds, 1)
        baseline = baseline or rate
        rows.append(QueryRow(f"one shard, {batch} queries per call (SearchBatch)", path, 1, round(rate, 1),
                             *p50_p99_ms(latencies), recall(answers, exact[0]), recall(answers, exact[1]), 1.0,
                             round(rate / baseline, 3)))
    return rows


def _mixed_ef_rows(client: SearcherClient, indexes: list, query_vectors: np.ndarray, shard_lists: list[list[str]],
                   index_of: dict[str, int], exact: tuple[list[set[int]], list[set[int]]], seconds: float,
                   ef: int) -> list[QueryRow]:
    """One-shard searches whose requests mix ef, 2 ef and 4 ef, at 8 clients: they must not serialise.
    In process, the same search at a larger ef is a larger k cut back to K (hnswlib keeps max(ef, k)).
    exact: each query's exact top K in its shard and over everything."""
    count = len(query_vectors)
    efs = (ef, 2 * ef, 4 * ef)
    routings = [routing_for(categories=shards) for shards in shard_lists]

    def local(i: int) -> list[int]:
        index = indexes[index_of[shard_lists[i][0]]]
        breadth = min(efs[i % 3], index.get_current_count())
        ids, _ = index.knn_query(query_vectors[i][None], k=breadth, num_threads=1)
        return ids[0][:K].tolist()

    def remote(i: int) -> list[int]:
        hits = client.search(query_vectors[i], MODEL, K, routings[i], ef=efs[i % 3]).hits
        return [int(hit.id.split("-")[1]) for hit in hits]

    rows, baseline = [], 0.0
    for path, fn in (("in-process hnswlib", local), ("gRPC searcher", remote)):
        found = [set(fn(i)) for i in range(count)]
        counter = iter(range(1 << 62))
        rate, latencies = measure(lambda: (fn(next(counter) % count), 1)[1], seconds, 8)
        baseline = baseline or rate
        rows.append(QueryRow(f"one shard, ef {efs[0]}/{efs[1]}/{efs[2]} mixed per request", path, 8, round(rate, 1),
                             *p50_p99_ms(latencies), recall(found, exact[0]), recall(found, exact[1]), 1.0,
                             round(rate / baseline, 3)))
    return rows


def _print(report: dict) -> None:
    rows = report.pop("rows")
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"\n{'routing':<44} {'path':<20} {'clients':>7} {'q/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'R@10 probed':>11} "
          f"{'R@10 global':>11} {'shards':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['routing']:<44} {r['path']:<20} {r['clients']:>7} {r['queries_per_second']:>9} {r['p50_ms']:>8} "
              f"{r['p99_ms']:>8} {r['recall_probed']:>11} {r['recall_global']:>11} {r['mean_shards']:>6} {r['ratio']:>6}")
