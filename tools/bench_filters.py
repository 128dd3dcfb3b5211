"""`lookalike bench filters`: filtered search through gRPC against post-filtering and exact filtered search.

One shard of synthetic clustered vectors (lookalike.tools.bench_searcher.synthetic), each item with a
numeric `rank` drawn uniformly, so `rank < s * items` passes exactly the share s of the items. The
searcher's ef is the smallest that gives unfiltered recall@10 >= 0.95 in-process on these vectors. The same
catalogue is served three ways, restarted from its snapshot between them: the default (a filter with at
most filter_exact_factor * sqrt(ef * items) matches is searched exactly, others through the graph
skipping the rest), graph only (filter_exact_factor 0), and exact only (every filter searched exactly).
Against them: post-filtering, i.e. an unfiltered search for k / s hits (at most max_k) filtered
afterwards. Recall@10 is against exact filtered search in numpy. A sweep of match counts shows where
exact search overtakes the graph, which sets the default. Last, SearchBatch of 32 queries per call against
the same queries one by one.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lookalike.client.searcher_client import CatalogueItem, SearcherClient, search_request
from lookalike.tools.bench_searcher import MODEL, smallest_ef_for_recall, synthetic
from lookalike.tools.benchmarking import measure, p50_p99_ms
from lookalike.tools.processes import running_service

K = 10
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
SWEEP = (0.005, 0.02, 0.05, 0.2, 0.3)
BATCH = 32


@dataclass
class FilterRow:
    method: str
    selectivity: float
    matches: int
    queries_per_second: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float


def run_filters_bench(items: int = 100_000, dimension: int = 256, queries: int = 200, seconds: float = 4.0,
                      ef: int = 0, as_json: bool = False) -> int:
    """`ef` 0: the smallest ef with unfiltered recall@10 >= 0.95 on these vectors."""
    vectors, _, _ = synthetic(items + queries, dimension, 20, offset=0.35, spread=1.1, seed=1)
    catalogue, query_vectors = vectors[:items], vectors[items:]
    ranks = np.random.default_rng(2).permutation(items)
    similarities = query_vectors @ catalogue.T
    ef = ef or _ef_for_recall(catalogue, query_vectors, similarities, target=0.95)
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "items": items, "dimension": dimension, "queries": queries, "ef": ef, "rows": [], "sweep": []}
    data_dir = Path(tempfile.mkdtemp(prefix="lookalike-bench-filters-"))
    base = ["--data", str(data_dir), "--snapshot-interval", "0", "--exact-below", "0", "--numeric-attributes", "rank",
            "--ef", str(ef)]

    def truth(limit: int) -> list[set[int]]:
        passing = np.flatnonzero(ranks < limit)
        best = np.argsort(-similarities[:, passing], axis=1)[:, :K]
        return [set(passing[row].tolist()) for row in best]

    def recall(found: list[list[int]], expected: list[set[int]]) -> float:
        return round(float(np.mean([len(set(f) & e) / max(len(e), 1) for f, e in zip(found, expected)])), 4)

    def timed(client: SearcherClient, method: str, selectivity: float, limit: int, fetch: int = K,
              post_filter: bool = False) -> FilterRow:
        text = "" if post_filter else f"rank < {limit}"
        cycle = iter(range(1 << 62))

        def one() -> int:
            client.search(query_vectors[next(cycle) % queries], MODEL, fetch, filter=text)
            return 1

        def answer(i: int) -> list[int]:
            hits = client.search(query_vectors[i], MODEL, fetch, filter=text).hits
            ids = [int(hit.id) for hit in hits]
            return [i for i in ids if ranks[i] < limit][:K] if post_filter else ids

        quality = recall([answer(i) for i in range(queries)], truth(limit))
        rate, latencies = measure(one, seconds, 1)
        return FilterRow(method, selectivity, int((ranks < limit).sum()), round(rate, 1), *p50_p99_ms(latencies),
                         quality)

    try:
        with running_service("lookalike.searcher", base) as (_, port), SearcherClient(f"127.0.0.1:{port}") as client:
            for start in range(0, items, 1000):
                client.upsert([CatalogueItem(str(i), "all", catalogue[i], MODEL, {"rank": str(ranks[i])})
                               for i in range(start, min(start + 1000, items))], timeout=120)
            for selectivity in SELECTIVITIES:
                limit = int(selectivity * items)
                report["rows"].append(timed(client, "filtered (default threshold)", selectivity, limit))
                report["rows"].append(timed(client, "post-filter (unfiltered k/s, then filter)", selectivity, limit,
                                            fetch=min(1000, math.ceil(K / selectivity)), post_filter=True))
            report["batch"] = _batch_rows(client, query_vectors, items, seconds)
        for method, factor in (("graph only (filter_exact_factor 0)", 0.0),
                               ("exact filtered (every filter)", float(items))):
            with running_service("lookalike.searcher", [*base, "--filter-exact-factor", str(factor)]) as (_, port), \
                    SearcherClient(f"127.0.0.1:{port}") as client:
                for selectivity in SELECTIVITIES:
                    report["rows"].append(timed(client, method, selectivity, int(selectivity * items)))
                # Where exact search over the matches overtakes the graph: the default's threshold.
                for share in SWEEP:
                    report["sweep"].append(timed(client, method, share, int(share * items)))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    report["rows"] = [asdict(row) for row in report["rows"]]
    report["sweep"] = [asdict(row) for row in report["sweep"]]
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"filters benchmark on {report['machine']}: {items} items x {dimension}-d in one shard, {queries} queries, "
          f"k={K}, ef={ef}, 1 client")
    print(f"{'method':<46} {'share':>6} {'matches':>7} {'q/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9}")
    for row in sorted(report["rows"], key=lambda r: (-r["selectivity"], r["method"])) + report["sweep"]:
        print(f"{row['method']:<46} {row['selectivity']:>6.3%} {row['matches']:>7} {row['queries_per_second']:>8} "
              f"{row['p50_ms']:>7} {row['p99_ms']:>7} {row['recall_at_10']:>9}")
    for row in report["batch"]:
        print(f"{row['method']:<46} {row['queries_per_second']:>8} q/s  ratio to one by one {row['ratio']}")
    return 0


def _batch_rows(client: SearcherClient, query_vectors: np.ndarray, items: int, seconds: float) -> list[dict]:
    """SearchBatch of BATCH queries per call against the same queries one by one (unfiltered, and 10%)."""
    rows = []
    for text in ("", f"rank < {items // 10}"):
        requests = [search_request(vector, MODEL, K, None, 0, text) for vector in query_vectors]
        cycle = iter(range(1 << 62))

        def single() -> int:
            client.stub.Search(requests[next(cycle) % len(requests)], timeout=30)
            return 1

        def batched() -> int:
            start = next(cycle) * BATCH % (len(requests) - BATCH)
            client.search_batch(requests[start:start + BATCH])
            return BATCH

        one_by_one = measure(single, seconds, 1)[0]
        together = measure(batched, seconds, 1)[0]
        label = "filter rank < 10%" if text else "no filter"
        rows += [{"method": f"one by one, {label}", "queries_per_second": round(one_by_one, 1), "ratio": 1.0},
                 {"method": f"SearchBatch x{BATCH}, {label}", "queries_per_second": round(together, 1),
                  "ratio": round(together / one_by_one, 2)}]
    return rows


def _ef_for_recall(catalogue: np.ndarray, queries: np.ndarray, similarities: np.ndarray, target: float) -> int:
    """The smallest ef at which in-process hnswlib, built with the searcher's defaults, reaches `target`
    unfiltered recall@10 on these vectors (one shard)."""
    import hnswlib

    from lookalike.searcher.config import SearcherConfig

    config = SearcherConfig(data_dir=Path("."))
    index = hnswlib.Index(space="ip", dim=catalogue.shape[1])
    index.init_index(max_elements=len(catalogue), ef_construction=config.ef_construction, M=config.m)
    index.add_items(catalogue, np.arange(len(catalogue)), num_threads=-1)
    ef, reached = smallest_ef_for_recall([index], np.zeros(len(catalogue), dtype=np.int64), queries, similarities,
                                         np.zeros(len(queries), dtype=np.int64), target)
    if reached < target:
        print(f"no ef up to 1024 reaches unfiltered recall@10 {target}: ef 1024 reaches {reached}", file=sys.stderr)
    return ef
