"""The `lookalike` command line: export, serve, embed, demo and bench.

Heavy imports (torch, onnxruntime, hnswlib) happen inside the commands that need them, so the client
alone (`pip install lookalike[client]`) can run `embed` against remote servers.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from clients.connection import LookalikeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from exporter.__main__ import main as export_main

    return export_main(rest)


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    if args.service == "embedder":
        from embedder.__main__ import main as embedder_main

        return embedder_main(rest)
    raise AssertionError(args.service)


def _embed(args: argparse.Namespace, rest: list[str]) -> int:
    from clients.connection import ChannelSettings
    from clients.embedder_client import EmbedderClient

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


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from clients.demo import run_demo

    return run_demo(Path(args.workdir), catalog=args.catalog, queries=args.queries, per_category=args.per_category,
                    query_count=args.query_count, as_json=args.json)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from clients.bench import run_embedder_bench

    return run_embedder_bench(Path(args.workdir), seconds=args.seconds, images_dir=args.images, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description="Visual product search: a shopper's photo in, "
                                     "the catalogue items that look most like it out.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", add_help=False,
                                 help="build a model: EfficientNet-Lite0 + category head -> ONNX + manifest "
                                      "(options: lookalike export --help)")
    export.set_defaults(run=_export)

    serve = commands.add_parser("serve", help="run a service in the foreground (options: lookalike serve embedder --help)")
    serve.add_argument("service", choices=["embedder"], help="which service")
    serve.set_defaults(run=_serve)

    embed = commands.add_parser("embed", help="embed image files with a running embedder and print their categories")
    embed.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    embed.add_argument("--embedder", default="localhost:50051", help="embedder address host:port")
    embed.add_argument("--top", type=int, default=3, help="categories to show per image (0: all)")
    embed.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    embed.add_argument("--vectors", action="store_true", help="include vectors in --json output")
    embed.add_argument("--json", action="store_true", help="one JSON object per image")
    embed.set_defaults(run=_embed)

    demo = commands.add_parser("demo", help="end to end on a real labelled catalogue: build the model, start the "
                                            "embedder, embed held-out photos, report")
    demo.add_argument("--workdir", default="var/demo", help="where models and data are kept between runs")
    demo.add_argument("--catalog", type=Path, help="labelled training images (default: Fashion-MNIST train)")
    demo.add_argument("--queries", type=Path, help="labelled query images (default: Fashion-MNIST test)")
    demo.add_argument("--per-category", type=int, default=200, help="catalogue images per category for the head")
    demo.add_argument("--query-count", type=int, default=200, help="query images to embed")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="embedder throughput and latency through gRPC against in-process "
                                              "ONNX Runtime, fp32 and int8")
    bench.add_argument("--workdir", default="var/demo", help="where the demo's models are (built if missing)")
    bench.add_argument("--images", type=Path, help="folder or list file of real photos (default: grocery val, "
                                                   "else Fashion-MNIST test)")
    bench.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    bench.add_argument("--json", action="store_true", help="print results as JSON")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("export", "serve"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args, rest)
    except LookalikeError as error:
        print(f"lookalike {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, ValueError) as error:
        print(f"lookalike {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
