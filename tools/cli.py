"""The `lookalike` command line: export, serve, embed, index, search, shards, eval, demo, web and bench.

Heavy imports (torch, onnxruntime, hnswlib) happen inside the commands that need them, so the client
alone (`pip install lookalike[client]`) can run `embed` against remote servers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from lookalike.client.connection import ChannelSettings, LookalikeError
from lookalike.serving.tracing import LOG_FORMAT
from lookalike.tools.processes import ServiceStartError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.exporter.__main__ import main as export_main

    return export_main(rest)


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    if args.service == "embedder":
        from lookalike.embedder.__main__ import main as embedder_main

        return embedder_main(rest)
    from lookalike.searcher.__main__ import main as searcher_main

    return searcher_main(rest)


def _embed(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.client.connection import ChannelSettings
    from lookalike.client.embedder_client import EmbedderClient

    with EmbedderClient(ChannelSettings(args.embedder, timeout=args.timeout)) as client:
        results = client.embed([Path(p) for p in args.images], ids=args.images, top_categories=args.top)
    failed = 0
    for result in results:
        failed += not result.ok
        if args.json:
            print(json.dumps({"image": result.id, "ok": result.ok, "error": result.error or None,
                              "categories": [{"category": c, "probability": round(p, 6)} for c, p in result.categories],
                              "vector": result.vector.tolist() if (result.ok and args.vectors) else None}))
        elif result.ok:
            top = ", ".join(f"{c} {p:.3f}" for c, p in result.categories)
            print(f"{result.id}: {top}  (norm {float((result.vector ** 2).sum()) ** 0.5:.4f}, {result.vector.size}-d)")
        else:
            print(f"{result.id}: ERROR {result.error_code.name}: {result.error}")
    return EXIT_FAILED if failed else EXIT_OK


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum` (nor larger than `maximum`; argparse names the
    flag when it is not)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above {maximum}")
        return value
    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


def embedder_target(text: str) -> str:
    """An argparse type: an address the client can reach (argparse names the flag when it is not)."""
    try:
        ChannelSettings(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _index(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.quality.labelled_images import read_labelled_images
    from lookalike.client.indexing import index_catalogue
    from lookalike.client.facade import Lookalike, searcher_target

    images = read_labelled_images(args.catalog)
    with Lookalike(args.embedder, searcher_target(args.searcher), shard_map=args.shard_map) as lookalike:
        summary = index_catalogue(lookalike, images, journal=args.journal, use_labels=not args.predict_categories,
                                  batch_size=args.batch_size, concurrency=args.concurrency,
                                  progress=None if args.json else sys.stderr)
    if args.json:
        print(json.dumps({"indexed": summary.indexed, "skipped": summary.skipped, "seconds": round(summary.seconds, 2),
                          "failed": [{"id": i, "reason": r} for i, r in summary.failed]}))
    else:
        print(summary.describe())
    return EXIT_FAILED if summary.failed else EXIT_OK


def _search(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.client.facade import Lookalike, searcher_target

    routing = (args.routing if args.routing in ("adaptive", "top1", "all")
               else [category.strip() for category in args.routing.split(",") if category.strip()])
    with Lookalike(args.embedder, searcher_target(args.searcher), prior_weight=args.prior_weight,
                   shard_map=args.shard_map) as lookalike:
        # A filter that does not parse, or a photo that cannot be read, is the library's InvalidArgumentError.
        result = lookalike.search(Path(args.image), k=args.k, routing=routing, filter=args.filter,
                                  distinct_products=args.distinct_products)
    # Named categories the searcher has no shard for (a typo, or --routing adaptiv taken as a category).
    if result.unknown_categories:
        print("no shard for: " + ", ".join(result.unknown_categories), file=sys.stderr)
    nothing_searched = isinstance(routing, list) and set(routing) <= set(result.unknown_categories)
    if args.json:
        print(json.dumps({
            "categories": [{"category": c, "probability": round(p, 6)} for c, p in result.categories[:5]],
            "probes": [{"category": p.category, "probability": round(p.probability, 6), "items": p.items,
                        "ms": round(p.seconds * 1000, 3)} for p in result.probes],
            "missing_shards": result.missing_shards, "unknown_categories": result.unknown_categories,
            "matches": [{"id": m.id, "score": round(m.score, 6), "category": m.category, "attributes": m.attributes,
                         "product": m.product, "product_matches": m.product_matches} for m in result.matches],
            "embed_ms": round(result.embed_seconds * 1000, 2), "search_ms": round(result.search_seconds * 1000, 2)}))
        return EXIT_FAILED if nothing_searched else EXIT_OK
    print("predicted: " + ", ".join(f"{c} {p:.3f}" for c, p in result.categories[:3]))
    print("probed: " + ", ".join(f"{p.category} ({p.items} items" + (f", {p.filter_matches} pass the filter"
                                                                      if args.filter else "") + ")"
                                 for p in result.probes))
    if result.missing_shards:
        print("NOT searched (their searchers are down): " + ", ".join(result.missing_shards))
    for rank, match in enumerate(result.matches, start=1):
        product = f"  product {match.product} ({match.product_matches} photos)" if args.distinct_products else ""
        print(f"{rank:>3}. {match.id}  {match.score:.4f}  {match.category}{product}")
    return EXIT_FAILED if nothing_searched else EXIT_OK


def _shards(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.client.shard_map import ShardMapClient

    with ShardMapClient(args.searcher) as client:
        if args.move:
            category, group = args.move
            moved = client.move(category, group).placement
            print(f"{category}: in group {moved.group}" + (f", moving to {moved.moving_to}" if moved.moving_to else ""))
            return EXIT_OK
        shard_map = client.shard_map()
    if args.json:
        print(json.dumps({"group": shard_map.group, "sequence": shard_map.sequence,
                          "groups": [{"name": g.name, "target": g.target, "live_replicas": g.live_replicas}
                                     for g in shard_map.groups],
                          "placements": [{"category": p.category, "part": p.part, "parts": p.parts,
                                          "building": p.building, "group": p.group, "moving_to": p.moving_to,
                                          "model_id": p.model_id, "dimension": p.dimension}
                                         for p in shard_map.placements]}))
        return EXIT_OK
    for group in shard_map.groups:
        print(f"group {group.name}: {group.live_replicas} live replicas at {group.target or '(this address)'}")
    for placement in shard_map.placements:
        # A split category: each part on its line, and whether the split is still being built.
        part = f" part {placement.part + 1} of {placement.parts}" if placement.parts > 1 else ""
        building = " (being built)" if placement.building else ""
        moving = f"  -> moving to {placement.moving_to}" if placement.moving_to else ""
        print(f"  {placement.category}{part}: {placement.group}{building}{moving}")
    return EXIT_OK


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.codec import read_manifest
    from lookalike.quality.labelled_images import in_one_category, read_labelled_images
    from lookalike.tools.evaluate import run_eval

    read_manifest(args.model)  # a wrong --model fails here, not after the services were started
    catalogue, queries = read_labelled_images(args.catalog), read_labelled_images(args.queries)
    if args.one_category:
        catalogue, queries = in_one_category(catalogue, args.one_category), in_one_category(queries, args.one_category)
    return run_eval(args.model, catalogue, queries, args.prior_weight, args.json, args.output, args.threshold,
                    args.max_shards, args.fit_prior_on_queries)


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.tools.demo import run_demo

    return run_demo(Path(args.workdir), catalog=args.catalog, queries=args.queries,
                    catalog_size=60_000 if args.full else args.catalog_size, query_count=args.query_count,
                    head_per_category=args.head_per_category, as_json=args.json)


def _web(args: argparse.Namespace, rest: list[str]) -> int:
    from lookalike.tools.web import run_web

    return run_web(Path(args.workdir), embedder=args.embedder, searcher=args.searcher, samples=args.samples,
                   image_roots=args.images_root,
                   port=args.port, address=args.address, catalog_size=args.catalog_size)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.service == "replicas":
        from lookalike.tools.bench_replicas import run_replicas_bench

        return run_replicas_bench(items=args.items, dimension=args.dimension, store=args.store, seconds=args.seconds,
                                  startup_items=args.startup_items, as_json=args.json)
    if args.service == "soak":
        from lookalike.quality.labelled_images import read_labelled_images
        from lookalike.tools.bench_embedder import benchmark_model
        from lookalike.tools.bench_soak import run_soak_bench
        from lookalike.tools.benchmarking import default_photos

        model_dir = args.model[0] if args.model else benchmark_model(Path(args.workdir))[0]
        photos = [image.read_bytes() for image in read_labelled_images(args.images or default_photos(Path(args.workdir)))]
        return run_soak_bench(model_dir, photos[:512], seconds=args.seconds, sample_seconds=args.sample_seconds,
                              clients=args.clients, catalogue_items=args.soak_items, as_json=args.json)
    if args.service == "faces":
        from lookalike.tools.bench_faces import run_faces_bench

        if args.images is None:
            raise SystemExit("bench faces: --images is required (photos with faces, e.g. a pasted set built by "
                             "python -m lookalike.quality.faces)")
        return run_faces_bench(args.images, seconds=args.seconds, as_json=args.json)
    if args.service == "peers":
        from lookalike.tools.bench_peers import PEERS, run_peers_bench

        return run_peers_bench(items=args.items, dimension=args.dimension, seconds=args.seconds,
                               venv_dir=Path(args.peers_venv), peer_timeout=args.peer_timeout,
                               peers=tuple(args.peer or PEERS), as_json=args.json)
    if args.service == "decoding":
        from lookalike.tools.bench_decoding import run_decoding_bench

        return run_decoding_bench(as_json=args.json)
    if args.service == "servers":
        from lookalike.tools.bench_servers import run_servers_bench

        return run_servers_bench(items=args.items, dimension=args.dimension, seconds=args.seconds, as_json=args.json)
    if args.service == "filters":
        from lookalike.tools.bench_filters import run_filters_bench

        return run_filters_bench(items=args.items, dimension=args.dimension, seconds=args.seconds, ef=args.ef,
                                 as_json=args.json)
    if args.service == "gpu":
        from lookalike.tools.bench_gpu import run_gpu_bench

        if not args.model or not args.images:
            raise SystemExit("bench gpu: --model (an fp32 model folder; its fp16 twin is written beside it) and "
                             "--images (real photos, at least 33) are required")
        return run_gpu_bench(args.model[0], args.images, providers=args.providers.split(","),
                             batch_sizes=[int(size) for size in args.batch_sizes.split(",")], seconds=args.seconds,
                             clients=args.gpu_clients, as_json=args.json)
    if args.service == "photo":
        from lookalike.tools.bench_photo import run_photo_bench

        return run_photo_bench(Path(args.workdir), seconds=args.seconds, catalogue_size=args.items, as_json=args.json,
                               models=args.model, queries=args.images)
    if args.service == "searcher":
        from lookalike.tools.bench_searcher import run_searcher_bench

        return run_searcher_bench(count=args.items, dimension=args.dimension, seconds=args.seconds, as_json=args.json)
    from lookalike.tools.bench_embedder import run_embedder_bench

    return run_embedder_bench(Path(args.workdir), seconds=args.seconds, images_dir=args.images, as_json=args.json,
                              models=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description="Visual product search: a shopper's photo in, "
                                     "the catalogue items that look most like it out.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", add_help=False,
                                 help="build a model: EfficientNet-Lite0 + category head -> ONNX + manifest "
                                      "(options: lookalike export --help)")
    export.set_defaults(run=_export)

    # Its --help goes to the service (lookalike serve embedder --help lists the embedder's flags).
    serve = commands.add_parser("serve", add_help=False,
                                help="run a service in the foreground (options: lookalike serve embedder --help)")
    serve.add_argument("service", choices=["embedder", "searcher"], help="which service")
    serve.set_defaults(run=_serve)

    embed = commands.add_parser("embed", help="embed image files with a running embedder and print their categories")
    embed.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    embed.add_argument("--embedder", type=embedder_target, default="localhost:50051",
                       help="embedder address host:port")
    embed.add_argument("--top", type=at_least(0), default=3, help="categories to show per image (0: all)")
    embed.add_argument("--timeout", type=positive_seconds, default=30.0, help="seconds per call")
    embed.add_argument("--vectors", action="store_true", help="include vectors in --json output")
    embed.add_argument("--json", action="store_true", help="one JSON object per image")
    embed.set_defaults(run=_embed)

    index = commands.add_parser("index", help="embed a labelled image folder (or list file) and store it in the "
                                              "searcher; resumable")
    index.add_argument("catalog", type=Path, help="ROOT/<category>/*.jpg, or a list file like grocery's train.txt")
    index.add_argument("--embedder", type=embedder_target, default="localhost:50051",
                       help="embedder address host:port")
    index.add_argument("--searcher", default="localhost:50052",
                       help="searcher address host:port; replicas as ipv4:a:1,b:2 or dns:///name:port; or "
                            "comma-separated pod addresses (sharded)")
    index.add_argument("--shard-map", action="store_true",
                       help="--searcher is any searcher of replica groups sharing PostgreSQL: find the groups "
                            "through their shard map")
    index.add_argument("--journal", type=Path, help="file recording stored ids, so a rerun skips them")
    index.add_argument("--predict-categories", action="store_true",
                       help="store each image in its predicted category instead of its folder's")
    index.add_argument("--batch-size", type=at_least(1), default=32, help="images per request")
    index.add_argument("--concurrency", type=at_least(1), default=2, help="requests in flight")
    index.add_argument("--json", action="store_true", help="print the summary as JSON")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="find the catalogue items that look most like a photo")
    search.add_argument("image", help="the query photo")
    search.add_argument("--embedder", type=embedder_target, default="localhost:50051",
                        help="embedder address host:port")
    search.add_argument("--searcher", default="localhost:50052",
                        help="searcher address host:port; replicas as ipv4:a:1,b:2 or dns:///name:port; or "
                            "comma-separated pod addresses (sharded)")
    search.add_argument("--shard-map", action="store_true",
                        help="--searcher is any searcher of replica groups sharing PostgreSQL: find the groups "
                             "through their shard map")
    search.add_argument("-k", type=at_least(1), default=10, help="how many matches")
    search.add_argument("--routing", default="adaptive",
                        help="adaptive (by predicted probabilities), top1, all, or comma-separated categories")
    search.add_argument("--prior-weight", type=float,
                        help="merge by cosine + w * ln p(category) (default: the model's fitted weight, else 0)")
    search.add_argument("--filter", default="", help='only items passing it, e.g. \'in_stock = "true" AND brand IN '
                                                     '("a", "b") AND price <= 50\' (numeric attributes: the '
                                                     "searcher's --numeric-attributes)")
    search.add_argument("--distinct-products", action="store_true",
                        help="one match per product (items' product key), with how many of its photos matched")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.set_defaults(run=_search)

    shards = commands.add_parser("shards", help="the searchers' shard map: replica groups and where each category "
                                                "lives; --move CATEGORY GROUP moves one")
    shards.add_argument("--searcher", default="localhost:50052", help="any searcher's address (or target)")
    shards.add_argument("--move", nargs=2, metavar=("CATEGORY", "GROUP"), help="move a category to another group")
    shards.add_argument("--json", action="store_true", help="print the map as JSON")
    shards.set_defaults(run=_shards)

    evaluate = commands.add_parser("eval", help="retrieval quality (mAP@k, recall, routing, latency) of a model "
                                                "through the real services, for every routing mode")
    evaluate.add_argument("--model", type=Path, required=True, help="model folder to serve")
    evaluate.add_argument("--catalog", type=Path, required=True,
                          help="labelled catalogue: folder, list file (grocery train.txt) or grocery classes.csv (iconic)")
    evaluate.add_argument("--queries", type=Path, required=True, help="labelled query photos (a validation split)")
    evaluate.add_argument("--prior-weight", type=float,
                          help="λ in cosine + λ·ln p for the prior-weighted mode (default: the model manifest's, "
                               "fitted on validation at export; else 0)")
    evaluate.add_argument("--threshold", type=float,
                          help="probability the adaptive modes cover before they stop (default: the model manifest's; "
                               "else the searcher's, 0.9)")
    evaluate.add_argument("--max-shards", type=at_least(1),
                          help="most shards the adaptive modes probe (default: the model manifest's; else the "
                               "searcher's, 4)")
    evaluate.add_argument("--fit-prior-on-queries", action="store_true",
                          help="diagnostic only: also fit λ on the scored queries themselves and report that mode, "
                               "labelled as such (its figures are optimistic by construction)")
    evaluate.add_argument("--one-category", metavar="NAME",
                          help="put every image in one category NAME, folder names as relevance labels (as the "
                               "exporter's flag: identity retrieval over faces)")
    evaluate.add_argument("--output", type=Path, help="also write the JSON report here")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="end to end on a real labelled catalogue: build the model, start both "
                                            "services, index, search with held-out photos, report")
    demo.add_argument("--workdir", default="var/demo", help="where models, index and data are kept between runs")
    demo.add_argument("--catalog", type=Path, help="labelled catalogue images (default: Fashion-MNIST train)")
    demo.add_argument("--queries", type=Path, help="labelled query images (default: Fashion-MNIST test)")
    demo.add_argument("--catalog-size", type=at_least(1), default=10_000, help="catalogue images to index")
    demo.add_argument("--full", action="store_true", help="index the whole Fashion-MNIST train set (60,000)")
    demo.add_argument("--query-count", type=at_least(1), default=200, help="query photos to search with")
    demo.add_argument("--head-per-category", type=at_least(1), default=200,
                      help="catalogue images per category the category head is fitted on")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(run=_demo)

    web = commands.add_parser("web", help="the web demo: a page to search by photo; with no addresses it starts the "
                                          "demo's services (model and index built as `lookalike demo` does)")
    web.add_argument("--embedder", type=embedder_target,
                     help="a running embedder's address host:port (with --searcher)")
    web.add_argument("--searcher", help="a running searcher's address or target (with --embedder)")
    web.add_argument("--samples", type=Path, help="labelled photos (folder or list file) to offer as sample "
                                                  "queries (default with the demo's services: its held-out photos)")
    web.add_argument("--images-root", type=Path, action="append", default=[],
                     help="a folder the page may show catalogue photos from (repeatable; with --embedder and "
                          "--searcher, none unless given: an item's path attribute names a file on this machine)")
    web.add_argument("--port", type=at_least(0, 65_535), default=8501, help="the page's port (0: a free one)")
    web.add_argument("--address", default="127.0.0.1", help="the address the page listens on (0.0.0.0: all)")
    web.add_argument("--workdir", default="var/demo", help="the demo's models, index and data (built if missing)")
    web.add_argument("--catalog-size", type=at_least(1), default=10_000, help="catalogue images the demo indexes")
    web.set_defaults(run=_web)

    bench = commands.add_parser("bench", help="throughput and latency through gRPC against the in-process library: "
                                              "embedder (ONNX Runtime, fp32 and int8) or searcher (hnswlib); "
                                              "or a soak: a long mixed load watching memory")
    bench.add_argument("service", choices=["embedder", "searcher", "replicas", "filters", "soak", "faces", "servers",
                                            "peers", "photo", "gpu", "decoding"],
                       help="which service to measure (replicas: searchers over PostgreSQL against SQLite; filters: "
                            "filtered search against post-filtering and exact, and batch search; soak: both "
                            "services under mixed load with auth on, for --seconds, e.g. 1800; faces: the face "
                            "crop's cost per image against plain decoding, on --images; servers: one Search's cost in the "
                            "thread-pool gRPC server against grpc.aio; peers: the searcher against Chroma and Milvus "
                            "Lite on the same vectors, installed on first use into --peers-venv; photo: one photo to ranked "
                            "results through both services, 1 client, against each call alone, with each process's "
                            "CPU per call; gpu: the embedder on --providers (CUDA), fp32 against its fp16 twin: parity, "
                            "in-process by batch size, host decode and gRPC from JPEG bytes, with the GPU's utilisation; "
                            "decoding: the embedder's decode threads on a burst of large photos, memory and time "
                            "with and without the pixel budget)")
    bench.add_argument("--peers-venv", default="var/peers-venv",
                       help="peers: the virtual environment holding Chroma and Milvus Lite (created when missing)")
    bench.add_argument("--peer", action="append", choices=["chroma", "milvus-lite"],
                       help="peers: which peer to run, repeatable (default: both)")
    bench.add_argument("--peer-timeout", type=positive_seconds, default=1800.0,
                       help="peers: seconds one peer may take (ingest, ef search and rows); past it, reported unfinished")
    bench.add_argument("--ef", type=at_least(0), default=0,
                       help="filters: the searcher's ef (default: the smallest with unfiltered recall@10 >= 0.95)")
    bench.add_argument("--model", type=Path, action="append",
                       help="embedder, photo: a model folder to measure, repeatable (default: the benchmarks' model and its "
                            "int8 twin); soak: the model folder (default: the benchmarks' model); gpu: the fp32 model folder (required)")
    bench.add_argument("--clients", type=at_least(1), default=4, help="soak: concurrent client threads")
    bench.add_argument("--providers", default="cuda,cpu", help="gpu: the embedder's execution providers, in order")
    bench.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256",
                       help="gpu: in-process batch sizes to measure, comma-separated")
    bench.add_argument("--gpu-clients", type=at_least(0), default=0,
                       help="gpu: concurrent gRPC clients for the many-photo rows (0: two per CPU core)")
    bench.add_argument("--soak-items", type=at_least(1), default=1000,
                       help="soak: catalogue items, filled first, then re-indexed and deleted over the run")
    bench.add_argument("--sample-seconds", type=positive_seconds, default=10.0, help="soak: seconds between samples")
    bench.add_argument("--startup-items", type=at_least(0), default=0,
                       help="replicas: measure replica start-up at this many items (rows written straight into "
                            "the store)")
    bench.add_argument("--store", default="", help="replicas: a PostgreSQL DSN to measure against (default: a "
                                                   "throwaway local server)")
    bench.add_argument("--items", type=at_least(1), default=100_000, help="searcher, filters, servers, peers: catalogue size; photo: most catalogue photos")
    bench.add_argument("--dimension", type=at_least(1), default=256, help="searcher, filters: vector dimension")
    bench.add_argument("--workdir", default="var/demo", help="where the demo's models are (built if missing)")
    bench.add_argument("--images", type=Path, help="folder or list file of real photos (default: grocery val, "
                                                   "else Fashion-MNIST test); photo: the query photos")
    bench.add_argument("--seconds", type=positive_seconds, default=6.0, help="duration of each measurement")
    bench.add_argument("--json", action="store_true", help="print results as JSON")
    bench.set_defaults(run=_bench)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("export", "serve"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=LOG_FORMAT)
    # A SIGTERM (a service manager, `kill`) unwinds like Ctrl-C, so the services and the page a command started
    # (demo, web, eval) are stopped with it instead of left running on the data folder's lock.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.run(args, rest)
    except KeyboardInterrupt:
        print(f"lookalike {args.command}: interrupted (a rerun resumes where the journal stops)"
              if args.command in ("index", "demo") else f"lookalike {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LookalikeError as error:
        print(f"lookalike {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as error:  # a missing or unreadable file, a folder given for a file, a bad value
        print(f"lookalike {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceStartError as error:  # a service or the web app it started exited or never became ready
        print(f"lookalike {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
