"""Runs one peer system's half of `lookalike bench peers`, inside the peers' own virtual environment.

Not part of the lookalike package's imports: it needs chromadb or pymilvus, which the project does not
depend on, and only numpy and this folder's benchmarking.py and processes.py (loaded by path) besides.

`PEERS_PYTHON peers_driver.py chroma|milvus-lite DATA_DIR SECONDS` reads DATA_DIR/{vectors,categories,
queries,query_categories,exact_global,exact_scoped}.npy, ingests, finds the smallest search ef reaching
recall@10 >= 0.95 for each mode, measures each mode at 1 and 8 client threads, and prints one JSON object.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np


def _beside(name: str) -> ModuleType:
    """A stdlib-and-numpy module of this folder, loaded by path: the peers' environment has no lookalike package."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmarking = _beside("benchmarking")
processes = _beside("processes")

K = 10
# Steps of 1.5x and 2x in turn: with doublings alone a system can stop well above the target (the searcher's
# global search reached 0.972 at 256 and less than 0.95 at 128), paying for recall the comparison does not ask.
EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
TARGET = 0.95
BATCH = 1000
M, EF_CONSTRUCTION = 16, 200


class Chroma:
    """Chroma's own server (`chroma run`), searched through chromadb.HttpClient; `where` on category."""

    def __init__(self, workdir: Path, dimension: int) -> None:
        self.path = workdir / "chroma"
        self.port = processes.free_port()
        self._start()
        self.collection = self.client.create_collection("items", configuration={"hnsw": {
            "space": "ip", "max_neighbors": M, "ef_construction": EF_CONSTRUCTION, "ef_search": EFS[0]}})
        self.ef = EFS[0]

    def _start(self) -> None:
        import chromadb

        self.process = subprocess.Popen([str(Path(sys.executable).with_name("chroma")), "run", "--path",
                                         str(self.path), "--host", "127.0.0.1", "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.server_pid = self.process.pid
        deadline = time.time() + 120
        while True:
            try:
                self.client = chromadb.HttpClient(host="127.0.0.1", port=self.port)
                self.client.heartbeat()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: list[str]) -> None:
        self.collection.add(ids=[str(i) for i in ids], embeddings=vectors,
                            metadatas=[{"category": category} for category in categories])

    def set_ef(self, ef: int) -> None:
        # Chroma 1.5 records a modified ef_search but the open index keeps searching with the old one
        # (measured: recall unchanged until the collection is opened again), so the server restarts.
        if ef != self.ef:
            self.collection.modify(configuration={"hnsw": {"ef_search": ef}})
            self.close()
            self._start()
            self.collection = self.client.get_collection("items")
            self.ef = ef

    def search(self, vector: np.ndarray, category: str | None) -> list[int]:
        found = self.collection.query(query_embeddings=vector[None], n_results=K,
                                      where={"category": category} if category else None, include=[])
        return [int(i) for i in found["ids"][0]]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class MilvusLite:
    """Milvus Lite (in this process) through pymilvus' MilvusClient; category as the partition key."""

    def __init__(self, workdir: Path, dimension: int) -> None:
        from pymilvus import DataType, MilvusClient

        self.client = MilvusClient(str(workdir / "milvus.db"))
        self.server_pid = os.getpid()
        schema = MilvusClient.create_schema(auto_id=False, partition_key_field="category")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("category", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                        params={"M": M, "efConstruction": EF_CONSTRUCTION})
        self.client.create_collection("items", schema=schema, index_params=index)
        self.ef = 64
        self.loaded = False

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: list[str]) -> None:
        self.client.insert("items", [{"id": int(i), "category": category, "vector": vector.tolist()}
                                     for i, vector, category in zip(ids, vectors, categories)])

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def search(self, vector: np.ndarray, category: str | None) -> list[int]:
        if not self.loaded:  # Milvus searches a loaded collection; loading builds its index
            self.client.load_collection("items")
            self.loaded = True
        found = self.client.search("items", data=[vector.tolist()], limit=K, search_params={"params": {"ef": self.ef}},
                                   filter=f'category == "{category}"' if category else "")
        return [int(hit["id"]) for hit in found[0]]

    def close(self) -> None:
        self.client.close()


def _progress(line: str) -> None:
    """What is measured so far, for a run stopped before the end."""
    print(line, file=sys.stderr, flush=True)


def load(data: Path) -> dict[str, np.ndarray]:
    """The benchmark's arrays, written by `lookalike bench peers`."""
    return {name: np.load(data / f"{name}.npy") for name in (
        "vectors", "categories", "queries", "query_categories", "exact_global", "exact_scoped")}


def measure_system(name: str, peer: Any, arrays: dict[str, np.ndarray], seconds: float) -> dict[str, Any]:
    """Ingest into `peer` (add, set_ef, search(vector, category or None) -> ids, server_pid), then each mode at
    its smallest ef reaching the recall target, at 1 and 8 client threads. The same for every system."""
    vectors, categories, queries = arrays["vectors"], arrays["categories"], arrays["queries"]
    exact = {"global": arrays["exact_global"], "category-scoped": arrays["exact_scoped"]}
    names = category_names(categories)
    report: dict[str, Any] = {"system": name, "rows": []}
    idle = benchmarking.resident_bytes(peer.server_pid)
    # (A catalogue of one batch has no half to stop at: its further items are all of them.)
    half = len(vectors) // 2 // BATCH * BATCH
    at_half = idle
    started, pause = time.perf_counter(), 0.0
    for start in range(0, len(vectors), BATCH):
        if start == half and half:
            # Memory at half the items (any index built on first use built), so that the growth over the second
            # half, per item, shows what each further item costs apart from a system's fixed costs (the searcher
            # pays a fixed cost per shard). Not counted in the ingest time.
            paused = time.perf_counter()
            peer.search(queries[0], None)
            at_half = benchmarking.resident_bytes(peer.server_pid)
            pause = time.perf_counter() - paused
        chosen = np.arange(start, min(start + BATCH, len(vectors)))
        peer.add(chosen, vectors[chosen], [names[c] for c in categories[chosen]])
    peer.search(queries[0], None)  # an index built on first use is part of ingest
    report["ingest_items_per_second"] = round(len(vectors) / (time.perf_counter() - started - pause), 1)
    resident = benchmarking.resident_bytes(peer.server_pid)
    report["server_memory_bytes_per_item"] = round((resident - idle) / len(vectors), 1)
    report["server_memory_bytes_per_further_item"] = round((resident - at_half) / (len(vectors) - half), 1)
    _progress(f"{name}: ingest {report['ingest_items_per_second']} items/s, server memory "
              f"{report['server_memory_bytes_per_item']} bytes/item, "
              f"{report['server_memory_bytes_per_further_item']} per item of the second half")
    for mode in ("category-scoped", "global"):
        scope: Callable[[int], str | None] = ((lambda i: names[arrays["query_categories"][i]])
                                               if mode == "category-scoped" else (lambda i: None))
        recall = 0.0
        for ef in EFS:
            peer.set_ef(ef)
            trial = time.perf_counter()
            recall = float(np.mean([len(set(peer.search(queries[i], scope(i))) & set(exact[mode][i].tolist())) / K
                                    for i in range(len(queries))]))
            _progress(f"{name}: {mode} ef {ef}: recall@10 {recall:.4f} over {len(queries)} queries in "
                      f"{time.perf_counter() - trial:.1f} s")
            if recall >= TARGET:
                break
        for clients in (1, 8):
            counter = iter(range(1 << 62))

            def one() -> int:
                i = next(counter) % len(queries)
                peer.search(queries[i], scope(i))
                return 1

            rate, latencies = benchmarking.measure(one, seconds, clients)
            report["rows"].append({"mode": mode, "clients": clients, "queries_per_second": round(rate, 1),
                                   **dict(zip(("p50_ms", "p99_ms"), benchmarking.p50_p99_ms(latencies))),
                                   "recall_at_10": round(recall, 4), "ef": ef})
            _progress(f"{name}: {json.dumps(report['rows'][-1])}")
    return report


def category_names(categories: np.ndarray) -> list[str]:
    return [f"category-{c:02d}" for c in range(int(categories.max()) + 1)]


def run(system: str, data: Path, seconds: float) -> dict[str, Any]:
    arrays = load(data)
    workdir = Path(tempfile.mkdtemp(prefix=f"peer-{system}-", dir=data))
    peer = (Chroma if system == "chroma" else MilvusLite)(workdir, arrays["vectors"].shape[1])
    try:
        return measure_system(system, peer, arrays, seconds)
    finally:
        peer.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))))
