"""`lookalike bench servers`: what a Search costs in the server's gRPC layer, thread-pool server against grpc.aio.

One shard of synthetic unit vectors in a searcher data folder; the same queries, one per call, against:

- the servicer called in process (request decoded, searched, response encoded: no gRPC at all);
- the searcher as shipped (grpc.server on a thread pool, with its interceptors);
- the same servicer behind a grpc.aio server, its handler calling the servicer on the event loop ("inline"),
  or handing it to a thread pool ("executor"); no interceptors, so that server gets every advantage.

Each server is its own process and clients are threads of this one, on the same cores, as in `bench
searcher`. Besides queries/s and latency, the CPU seconds each side spent per query (the server process's
from /proc, this process's from getrusage) say where the time goes.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any, Sequence

from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request
from lookalike.tools.bench_searcher import synthetic
from lookalike.tools.benchmarking import measure, own_cpu_seconds, p50_p99_ms, process_cpu_seconds
from lookalike.tools.processes import running_service

MODEL = "synthetic@bench"
CATEGORY = "all"
K = 10


def run_servers_bench(items: int = 20_000, dimension: int = 256, queries: int = 500, seconds: float = 5.0,
                      as_json: bool = False) -> int:
    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.servicer import SearcherServicer
    from lookalike.v1 import searcher_pb2

    vectors, _, _ = synthetic(items + queries, dimension, 1, offset=0.35, spread=1.1, seed=0)
    query_vectors = vectors[items:]
    requests = [search_request(vector, MODEL, K, routing_for(categories=[CATEGORY]), 0) for vector in query_vectors]
    data_dir = Path(tempfile.mkdtemp(prefix="lookalike-bench-servers-"))
    rows: list[dict[str, Any]] = []
    try:
        with running_service("lookalike.searcher", ["--data", str(data_dir)]) as (_, port), \
                SearcherClient(f"127.0.0.1:{port}") as client:
            for start in range(0, items, 1000):
                client.upsert([CatalogueItem(f"item-{i}", CATEGORY, vectors[i], MODEL)
                               for i in range(start, min(start + 1000, items))], timeout=120)

        config = SearcherConfig(data_dir=data_dir)
        servicer = SearcherServicer(config)
        catalogue = Catalogue(config)
        servicer.attach(catalogue)
        encoded = [request.SerializeToString() for request in requests]
        for clients in (1, 8):
            counter = iter(range(1 << 62))

            def in_process() -> int:
                request = searcher_pb2.SearchRequest.FromString(encoded[next(counter) % queries])
                servicer.Search(request, None).SerializeToString()
                return 1

            cpu = own_cpu_seconds()
            rate, latencies = measure(in_process, seconds, clients)
            rows.append(_row("servicer in process (decode, search, encode)", clients, rate, latencies, seconds,
                             None, own_cpu_seconds() - cpu))
        catalogue.close()

        for label, module, args in (
                ("grpc.server, thread pool (the searcher)", "lookalike.searcher", ["--data", str(data_dir)]),
                ("grpc.aio server, servicer on the event loop", "lookalike.tools.bench_servers", [str(data_dir), "inline"]),
                ("grpc.aio server, servicer on a thread pool", "lookalike.tools.bench_servers", [str(data_dir), "executor"])):
            with running_service(module, args) as (process, port), SearcherClient(f"127.0.0.1:{port}") as client:
                client.search(query_vectors[0], MODEL, K, routing_for(categories=[CATEGORY]))
                for clients in (1, 8):
                    counter = iter(range(1 << 62))
                    server_cpu, client_cpu = process_cpu_seconds(process.pid), own_cpu_seconds()
                    rate, latencies = measure(lambda: (client.stub.Search(requests[next(counter) % queries]), 1)[1],
                                              seconds, clients)
                    rows.append(_row(label, clients, rate, latencies, seconds,
                                     process_cpu_seconds(process.pid) - server_cpu, own_cpu_seconds() - client_cpu))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    for row in rows:
        baseline = next(r for r in rows if r["clients"] == row["clients"])
        row["ratio"] = round(row["queries_per_second"] / baseline["queries_per_second"], 3)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "items": items, "dimension": dimension, "rows": rows}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"one shard of {items} x {dimension}-d on {report['machine']}, {seconds:.0f} s per row; ratio = q/s over "
          "the in-process servicer's at the same client count; CPU ms per query of each process")
    print(f"{'path':<48} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'server cpu':>10} {'client cpu':>10} "
          f"{'ratio':>6}")
    for row in rows:
        server = "" if row["server_cpu_ms"] is None else row["server_cpu_ms"]
        print(f"{row['path']:<48} {row['clients']:>7} {row['queries_per_second']:>8} {row['p50_ms']:>8} "
              f"{row['p99_ms']:>8} {server:>10} {row['client_cpu_ms']:>10} {row['ratio']:>6}")
    return 0


def _row(path: str, clients: int, rate: float, latencies: list[float], seconds: float, server_cpu: float | None,
         client_cpu: float) -> dict[str, Any]:
    done = len(latencies)  # the calls made (rate x seconds undercounts: the run overshoots its seconds)
    return {"path": path, "clients": clients, "queries_per_second": round(rate, 1), **dict(zip(
        ("p50_ms", "p99_ms"), p50_p99_ms(latencies))),
        "server_cpu_ms": None if server_cpu is None else round(1000 * server_cpu / done, 3),
        "client_cpu_ms": round(1000 * client_cpu / done, 3)}


async def _serve_asyncio(data_dir: Path, mode: str, address: str) -> None:
    """The searcher's servicer behind grpc.aio: Search only, no interceptors (the benchmark's other server)."""
    import grpc

    from lookalike.searcher.catalogue import Catalogue
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.servicer import SearcherServicer
    from lookalike.v1 import searcher_pb2_grpc

    config = SearcherConfig(data_dir=data_dir)
    servicer = SearcherServicer(config)
    servicer.attach(Catalogue(config))
    pool = futures.ThreadPoolExecutor(config.grpc_workers)
    loop = asyncio.get_running_loop()

    class AsyncioSearcher(searcher_pb2_grpc.SearcherServicer):
        async def Search(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
            if mode == "inline":
                return servicer.Search(request, context)
            return await loop.run_in_executor(pool, servicer.Search, request, context)

    server = grpc.aio.server()
    searcher_pb2_grpc.add_SearcherServicer_to_server(AsyncioSearcher(), server)
    port = server.add_insecure_port(address)
    await server.start()
    print(f"listening on port {port}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str]) -> None:
    """`python -m lookalike.tools.bench_servers DATA_DIR inline|executor --address HOST:PORT`."""
    data_dir, mode, _, address = argv
    asyncio.run(_serve_asyncio(Path(data_dir), mode, address))


if __name__ == "__main__":
    main(sys.argv[1:])
