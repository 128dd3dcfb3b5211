"""`lookalike bench peers`: the searcher side by side with the systems a user would pick instead.

Same synthetic vectors for every system (those of `bench searcher`: 100k x 256-d in 20 categories whose
neighbourhoods overlap), the same 500 queries, each system through its own client API, on the same cores:

- Lookalike: the searcher process, through SearcherClient (category-scoped: explicit routing to the
  query's category; global: all shards);
- Chroma: its own server (`chroma run`), through chromadb.HttpClient (`where` on category);
- Milvus Lite: in the measuring process, through pymilvus' MilvusClient (category as partition key).

Each system, each mode, searches at the smallest ef of 16, 24, 32, 48, ... that reaches recall@10 >= 0.95 against
exact search over the same scope; then queries/s and p50/p99 at 1 and 8 client threads, ingest rate
(batches of 1000 through the client) and the server's memory per item (resident set growth), over all the
items and over the second half of them (without each system's fixed costs).

The peers are not project dependencies: they are installed on first use into their own virtual
environment (`--peers-venv`, default var/peers-venv) at the versions below, and driven by
tools/peers_driver.py running there.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import venv
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for
from lookalike.tools.bench_searcher import synthetic
from lookalike.tools.peers_driver import EFS, K, TARGET, measure_system
from lookalike.tools.processes import running_service

PEER_PACKAGES = ("chromadb==1.5.9", "milvus-lite==3.2.2", "pymilvus==3.0.2")
# The driver's numpy at this venv's version (requirements.lock's), not whatever is newest.
PEER_NUMPY = f"numpy=={np.__version__}"
PEERS = ("chroma", "milvus-lite")
MODEL = "synthetic@bench"
DRIVER = Path(__file__).with_name("peers_driver.py")


def peers_python(venv_dir: Path) -> Path:
    """The peers' interpreter, creating their virtual environment and installing them when missing."""
    python = venv_dir / "bin" / "python"
    check = [str(python), "-c", "import chromadb, pymilvus, milvus_lite"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {', '.join(PEER_PACKAGES)} into {venv_dir} (once)", file=sys.stderr, flush=True)
    venv.create(venv_dir, with_pip=True, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES, PEER_NUMPY], check=True)
    subprocess.run(check, check=True)
    return python


def exact_neighbours(vectors: np.ndarray, categories: np.ndarray, queries: np.ndarray,
                     query_categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's exact top K over everything, and within its own category."""
    similarities = queries @ vectors.T
    global_top = np.argsort(-similarities, axis=1)[:, :K]
    similarities[categories[None, :] != query_categories[:, None]] = -np.inf
    return global_top, np.argsort(-similarities, axis=1)[:, :K]


def run_peers_bench(items: int = 100_000, dimension: int = 256, categories: int = 20, queries: int = 500,
                    seconds: float = 5.0, venv_dir: Path = Path("var/peers-venv"), peer_timeout: float = 1800.0,
                    peers: tuple[str, ...] = PEERS, as_json: bool = False) -> int:
    python = peers_python(venv_dir)
    vectors, labels, _ = synthetic(items + queries, dimension, categories, offset=0.35, spread=1.1, seed=0)
    query_vectors, query_labels = vectors[items:], labels[items:]
    vectors, labels = vectors[:items], labels[:items]
    exact_global, exact_scoped = exact_neighbours(vectors, labels, query_vectors, query_labels)
    data = Path(tempfile.mkdtemp(prefix="lookalike-bench-peers-"))
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "items": items, "dimension": dimension, "categories": categories, "queries": queries,
        "peers": list(PEER_PACKAGES), "systems": [], "unfinished": []}
    # What peers_driver.load reads back in the peers' environment.
    arrays = {"vectors": vectors, "categories": labels, "queries": query_vectors, "query_categories": query_labels,
              "exact_global": exact_global, "exact_scoped": exact_scoped}
    try:
        for name, array in arrays.items():
            np.save(data / f"{name}.npy", array)
        searcher = LookalikeSearcher(data / "lookalike")
        try:
            report["systems"].append(measure_system("lookalike", searcher, arrays, seconds))
        finally:
            searcher.close()
        print(f"lookalike: {json.dumps(report['systems'][-1])}", file=sys.stderr, flush=True)
        for peer in peers:
            try:
                result = subprocess.run([str(python), str(DRIVER), peer, str(data), str(seconds)],
                                        capture_output=True, text=True, timeout=peer_timeout)
            except subprocess.TimeoutExpired as stopped:
                measured = (stopped.stderr or b"").decode(errors="replace").strip().splitlines()[-6:]
                report["unfinished"].append(f"{peer}: not done within {peer_timeout:.0f} s; measured so far: "
                                            + " | ".join(measured))
                continue
            if result.returncode != 0:
                raise RuntimeError(f"{peer} failed:\n{result.stderr[-3000:]}")
            report["systems"].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"{peer}: {json.dumps(report['systems'][-1])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    ours = {(row["mode"], row["clients"]): row["queries_per_second"] for row in report["systems"][0]["rows"]}
    for system in report["systems"]:
        for row in system["rows"]:
            row["lookalike_over_this"] = round(ours[(row["mode"], row["clients"])] / row["queries_per_second"], 2)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{items} x {dimension}-d in {categories} categories, {queries} queries, on {report['machine']}; each "
          f"system at its smallest ef reaching recall@10 >= {TARGET}; peers: {', '.join(PEER_PACKAGES)}")
    for system in report["systems"]:
        print(f"{system['system']:<12} ingest {system['ingest_items_per_second']:>9} items/s   server memory "
              f"{system['server_memory_bytes_per_item']:>8} bytes/item, "
              f"{system['server_memory_bytes_per_further_item']:>8} per item of the second half")
    print(f"{'system':<12} {'mode':<16} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9} "
          f"{'ef':>5} {'lookalike/this':>14}")
    for system in report["systems"]:
        for row in system["rows"]:
            print(f"{system['system']:<12} {row['mode']:<16} {row['clients']:>7} {row['queries_per_second']:>8} "
                  f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['recall_at_10']:>9} {row['ef']:>5} "
                  f"{row['lookalike_over_this']:>14}")
    for line in report["unfinished"]:
        print(f"unfinished: {line}")
    return 0


class LookalikeSearcher:
    """The searcher process through SearcherClient: explicit routing to a category, or all shards."""

    def __init__(self, workdir: Path) -> None:
        self._stack = ExitStack()
        # The server default ef at the smallest tried, so that each request's ef decides.
        args = ["--data", str(workdir), "--snapshot-interval", "0", "--ef", str(EFS[0])]
        process, port = self._stack.enter_context(running_service("lookalike.searcher", args))
        self.client = self._stack.enter_context(SearcherClient(f"127.0.0.1:{port}"))
        self.server_pid = process.pid
        self.ef = EFS[0]

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: list[str]) -> None:
        self.client.upsert([CatalogueItem(str(i), category, vector, MODEL)
                            for i, vector, category in zip(ids, vectors, categories)], timeout=120)

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def search(self, vector: np.ndarray, category: str | None) -> list[int]:
        routing = routing_for(categories=[category]) if category else routing_for()
        return [int(hit.id) for hit in self.client.search(vector, MODEL, K, routing, ef=self.ef).hits]

    def close(self) -> None:
        self._stack.close()
