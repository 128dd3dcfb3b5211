"""The embedder client and the `lookalike` CLI against a real embedder."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookalike.client.connection import ChannelSettings, DeadlineExceededError, InvalidArgumentError, UnavailableError
from lookalike.client.embedder_client import EmbedderClient, RequestLimits, embed_plan
from lookalike.tools.processes import free_port
from tests.conftest import SlowNetwork, SlowNetworkAsync, run_cli, start_searcher


def test_client_embeds_paths_and_bytes_and_reports_bad_images(embedder, grocery_val: list) -> None:
    started, _ = embedder
    with EmbedderClient(f"127.0.0.1:{started.port}") as client:
        paths = [image.path for image in grocery_val[:10]]
        results = client.embed([*paths, b"not an image"], top_categories=2)
    assert len(results) == 11, "10 images over the server's limit of 8 per request are split, not refused"
    assert all(r.ok and r.vector.shape == (1280,) and len(r.categories) == 2 for r in results[:10])
    assert results[0].top_category in {c for c, _ in results[0].categories}
    assert not results[10].ok and results[10].error_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[2] is not a readable image" in results[10].error  # index within its request
    again = EmbedderClient(f"127.0.0.1:{started.port}").embed([paths[0]])[0]
    np.testing.assert_array_equal(again.vector, results[0].vector)


def test_client_keeps_each_request_within_the_servers_message_size(embedder, grocery_val: list) -> None:
    """The fixture's server receives at most 4 MiB a message and 8 images a request: six 1.5-MiB photos (a real
    JPEG padded after its end, which decoders ignore) go in requests of two, so each is embedded; sent as one
    request of 9 MiB the server would refuse all six together. The asyncio client splits the same way."""
    from lookalike.client.aio import AsyncEmbedderClient

    started, _ = embedder
    photo = grocery_val[0].path.read_bytes()
    large = photo + bytes(3 * 512 * 1024 - len(photo))
    with EmbedderClient(f"127.0.0.1:{started.port}") as client:
        assert client.model_info().max_message_bytes == 4 * 1024 * 1024
        alone = client.embed([photo])[0]
        results = client.embed([large] * 6, ids=[f"large-{i}" for i in range(6)])

    async def embed_async() -> list:
        async with AsyncEmbedderClient(f"127.0.0.1:{started.port}") as async_client:
            return await async_client.embed([large] * 6)

    for answers in (results, asyncio.run(embed_async())):
        assert [r.error for r in answers] == [""] * 6
        for result in answers:
            np.testing.assert_allclose(result.vector, alone.vector, atol=1e-6)
    assert [r.id for r in results] == [f"large-{i}" for i in range(6)]


def test_embed_requests_split_by_count_and_by_bytes() -> None:
    limits = RequestLimits(images=3, bytes=1000)
    sizes = [len(request.images) for request in embed_plan([b"x" * 10] * 7, None, 0, limits).requests]
    assert sizes == [3, 3, 1]
    # 400-byte images, 16 bytes of framing and a one-character id each: two fit in 1,000 bytes, not three.
    sizes = [len(request.images) for request in embed_plan([b"x" * 400] * 5, None, 0, limits).requests]
    assert sizes == [2, 2, 1]
    # An image larger than a request is not sent: it is refused alone, before any call.
    plan = embed_plan([b"small", b"x" * 5000, b"small"], ["a", "b", "c"], 2, limits)
    assert [[image.id for image in request.images] for request in plan.requests] == [["a", "c"]]
    assert all(request.top_categories == 2 for request in plan.requests)
    assert [(r.id, r.error_code) for r in plan.refused if r is not None] == [("b", grpc.StatusCode.RESOURCE_EXHAUSTED)]
    assert embed_plan([], None, 0, limits).requests == []


def test_an_image_larger_than_a_message_fails_alone(embedder, grocery_val: list) -> None:
    """The fixture's server receives at most 4 MiB a message: a 5-MiB image between two photos was sent in a
    request of its own, which the server refused whole, and embed raised, losing the photos' results. It is
    now that image's RESOURCE_EXHAUSTED, through the sync and the asyncio client."""
    from lookalike.client.aio import AsyncEmbedderClient

    started, _ = embedder
    photo = grocery_val[0].path.read_bytes()
    images = [photo, photo + bytes(5 * 1024 * 1024), photo]
    with EmbedderClient(f"127.0.0.1:{started.port}") as client:
        results = client.embed(images, ids=["before", "huge", "after"])

    async def embed_async() -> list:
        async with AsyncEmbedderClient(f"127.0.0.1:{started.port}") as async_client:
            return await async_client.embed(images, ids=["before", "huge", "after"])

    for answers in (results, asyncio.run(embed_async())):
        assert [(r.id, r.ok, r.error_code) for r in answers] == [
            ("before", True, grpc.StatusCode.OK), ("huge", False, grpc.StatusCode.RESOURCE_EXHAUSTED),
            ("after", True, grpc.StatusCode.OK)]
        assert "more than the" in answers[1].error and "max_message_bytes" in answers[1].error
        np.testing.assert_array_equal(answers[2].vector, answers[0].vector)


def test_deadline_surfaces_as_timeout_error(embedder, grocery_val: list) -> None:
    started, _ = embedder
    with EmbedderClient(f"127.0.0.1:{started.port}") as client:
        client.model_info()
        with pytest.raises(DeadlineExceededError) as error:
            client.embed([image.path for image in grocery_val[:8]], timeout=0.001)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and isinstance(error.value, TimeoutError)


def test_a_timeout_bounds_every_call_of_an_operation(embedder, grocery_val: list, tmp_path: Path) -> None:
    """An operation of several calls gave each call the whole timeout: embed of 24 photos (three requests of 8)
    and search_batch of four queries one per call (a searcher allowing one) ran past it, each call in time.
    Now each call gets what is left, and the operation fails with DEADLINE_EXCEEDED once nothing is."""
    from lookalike.client.aio import AsyncSearcherClient
    from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request
    from lookalike.v1 import embedder_pb2_grpc, searcher_pb2_grpc

    started, _ = embedder
    with EmbedderClient(f"127.0.0.1:{started.port}") as client:
        slow = SlowNetwork(0.6)
        client.stub = embedder_pb2_grpc.EmbedderStub(grpc.intercept_channel(client.channel, slow))
        # The first Embed gets what GetModelInfo left (0.4 s): it ends in time, or its own deadline ends it.
        with pytest.raises(DeadlineExceededError, match="Embedder.Embed failed with DEADLINE_EXCEEDED"):
            client.embed([image.path for image in grocery_val[:24]], timeout=1.0)
        assert slow.calls == 2, "GetModelInfo and the first Embed, then no time was left"
        assert len(client.embed([image.path for image in grocery_val[:24]], timeout=30)) == 24

    server, channel = start_searcher(tmp_path, max_batch_queries=1)
    channel.close()
    vector = np.ones(8, np.float32)
    queries = [search_request(vector, "m", 1, routing_for(categories=["a"]), 0)] * 4
    try:
        with SearcherClient(f"127.0.0.1:{server.port}") as searcher:
            searcher.upsert([CatalogueItem("x", "a", vector, "m")])
            slow = SlowNetwork(0.3)
            searcher.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(searcher.channel, slow))
            with pytest.raises(DeadlineExceededError, match="Searcher.SearchBatch"):
                searcher.search_batch(queries, timeout=1.0)
            assert slow.calls < 5, "GetStats, then fewer than the four SearchBatch calls"
            assert len(searcher.search_batch(queries, timeout=30)) == 4

        async def search_async() -> int:
            async with AsyncSearcherClient(f"127.0.0.1:{server.port}") as client:
                slow = SlowNetworkAsync(0.3)
                await client.channel.close()
                client.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[slow])
                client.stub = searcher_pb2_grpc.SearcherStub(client.channel)
                with pytest.raises(DeadlineExceededError, match="Searcher.SearchBatch"):
                    await client.search_batch(queries, timeout=1.0)
                assert slow.calls < 5
                return len(await client.search_batch(queries, timeout=30))

        assert asyncio.run(search_async()) == 4
    finally:
        server.stop(None)


def test_unreachable_server_is_unavailable_after_retries() -> None:
    settings = ChannelSettings(f"127.0.0.1:{free_port()}", timeout=2, retries=2, backoff_initial=0.01)
    with EmbedderClient(settings) as client, pytest.raises(UnavailableError, match="Embedder.GetModelInfo"):
        client.model_info()


def test_cli_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("export", "serve", "embed", "index", "search", "demo", "bench"):
        assert command in result.stdout
    export_help = run_cli("export", "--help")
    assert export_help.returncode == 0 and "--catalog" in export_help.stdout and "--int8" in export_help.stdout


def test_cli_embed_prints_categories_and_exit_codes(embedder, grocery_val: list, tmp_path: Path) -> None:
    started, _ = embedder
    target = f"127.0.0.1:{started.port}"
    good = run_cli("embed", "--embedder", target, "--json", str(grocery_val[0].path))
    assert good.returncode == 0, good.stderr
    line = json.loads(good.stdout)
    assert line["ok"] and len(line["categories"]) == 3
    bad_file = tmp_path / "notes.jpg"
    bad_file.write_text("not a picture")
    bad = run_cli("embed", "--embedder", target, str(grocery_val[0].path), str(bad_file))
    assert bad.returncode == 1
    assert "ERROR INVALID_ARGUMENT" in bad.stdout and "is not a readable image" in bad.stdout
    # A file that cannot be read is that image's error; the others are still embedded.
    unreadable = run_cli("embed", "--embedder", target, str(tmp_path / "absent.jpg"), str(tmp_path),
                         str(grocery_val[0].path))
    assert unreadable.returncode == 1, unreadable.stderr
    lines = unreadable.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'absent.jpg'}: ERROR INVALID_ARGUMENT") and "No such file" in lines[0]
    assert lines[1].startswith(f"{tmp_path}: ERROR INVALID_ARGUMENT") and "Is a directory" in lines[1]
    assert lines[2].startswith(f"{grocery_val[0].path}: ") and "1280-d" in lines[2]


def test_cli_refuses_bad_values_naming_the_flag(tmp_path: Path) -> None:
    """Refused before anything is contacted, with argparse's usage exit code (2) and the flag named."""
    for args, expected in [(("search", "q.jpg", "-k", "0"), "argument -k: 0 is below 1"),
                           (("embed", "q.jpg", "--top", "-1"), "argument --top: -1 is below 0"),
                           (("index", str(tmp_path), "--batch-size", "0"), "argument --batch-size: 0 is below 1"),
                           (("index", str(tmp_path), "--concurrency", "two"),
                            "argument --concurrency: 'two' is not an integer"),
                           (("search", "q.jpg", "--searcher", ","), "lookalike search: --searcher is ','"),
                           (("demo", "--query-count", "0"), "argument --query-count: 0 is below 1"),
                           (("demo", "--catalog-size", "-5"), "argument --catalog-size: -5 is below 1"),
                           (("bench", "searcher", "--items", "0"), "argument --items: 0 is below 1"),
                           # gRPC took a port past 65535 modulo 65536 (this one reached port 45295)...
                           (("embed", "q.jpg", "--embedder", "127.0.0.1:110831"),
                            "argument --embedder: target '127.0.0.1:110831': port 110831 is out of range"),
                           # ...and an empty target as a name to resolve: each call failed UNKNOWN.
                           (("index", str(tmp_path), "--embedder", ""), "argument --embedder: target is empty"),
                           (("embed", "q.jpg", "--timeout", "0"), "argument --timeout: 0 is not a number of seconds"),
                           (("embed", "q.jpg", "--timeout", "nan"), "argument --timeout: nan is not a number of"),
                           # Streamlit's traceback, after the demo's services had started.
                           (("web", "--port", "70000"), "argument --port: 70000 is above 65535")]:
        result = run_cli(*args)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)


def test_eval_refuses_an_output_it_could_not_write_before_evaluating(model_dir: Path, tmp_path: Path) -> None:
    """The report was written after the evaluation (minutes on a real catalogue): into a folder that does not
    exist, the evaluation was lost with nothing printed. And the demo refuses queries that are catalogue
    photos, as eval does (each found itself at the top)."""
    from tests.conftest import GROCERY

    if not GROCERY.is_dir():
        pytest.skip("grocery not found (../shared/datasets is absent)")
    output = tmp_path / "absent" / "report.json"
    result = run_cli("eval", "--model", str(model_dir), "--catalog", str(GROCERY / "train.txt"), "--queries",
                     str(GROCERY / "val.txt"), "--output", str(output))
    assert result.returncode == 2 and f"--output {output}: its folder" in result.stderr, result.stderr
    shared = run_cli("demo", "--workdir", str(tmp_path), "--catalog", str(GROCERY / "val.txt"), "--queries",
                     str(GROCERY / "val.txt"), "--query-count", "10")
    assert shared.returncode == 2 and "queries also in the catalogue" in shared.stderr, shared.stderr


def test_cli_serve_embedder_starts_and_answers(model_dir: Path, grocery_val: list) -> None:
    from lookalike.tools.processes import running_service

    with running_service("lookalike.tools.cli", ["serve", "embedder", "--model", str(model_dir)]) as (_, port):
        result = run_cli("embed", "--embedder", f"127.0.0.1:{port}", str(grocery_val[1].path))
    assert result.returncode == 0 and "1280-d" in result.stdout


def test_a_folder_without_a_model_is_named_as_such(tmp_path: Path) -> None:
    """The embedder started on a folder with no manifest exits saying so (and the caller is told it exited,
    not that it was slow); eval refuses the folder before starting anything."""
    from lookalike.tools.processes import ServiceStartError, running_service

    with pytest.raises(ServiceStartError, match="lookalike.embedder exited with code 1 before serving") as failed:
        with running_service("lookalike.embedder", ["--model", str(tmp_path)]):
            pass
    assert f"model folder {tmp_path} has no manifest.json" in str(failed.value)
    evaluated = run_cli("eval", "--model", str(tmp_path), "--catalog", str(tmp_path), "--queries", str(tmp_path))
    assert evaluated.returncode == 2
    assert evaluated.stderr.startswith(f"lookalike eval: model folder {tmp_path} has no manifest.json")
    (tmp_path / "manifest.json").write_text('{"model_id": 7}')
    corrupt = run_cli("eval", "--model", str(tmp_path), "--catalog", str(tmp_path), "--queries", str(tmp_path))
    assert corrupt.returncode == 2
    assert corrupt.stderr.startswith(f"lookalike eval: {tmp_path / 'manifest.json'} is not a model manifest")


def test_services_started_directly_say_what_is_wrong_in_one_line(tmp_path: Path, model_dir: Path) -> None:
    """`python -m lookalike.embedder` / `.searcher` are the images' entry points: an ordinary mistake (no model
    there, a manifest that does not describe its graph, a bad setting, a data folder that is a file or that
    another searcher uses, a malformed environment value) is one line and exit 1, not a traceback; the
    environment variable is named. `lookalike serve embedder --help` lists the embedder's own flags.
    (A NaN batching delay stopped the batching thread of a server that then said it was healthy; a
    manifest listing fewer labels than the graph answered made every Embed fail INTERNAL.)"""
    import json
    import shutil

    from lookalike.tools.processes import running_service

    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    wrong_manifest = tmp_path / "wrong-manifest"
    shutil.copytree(model_dir, wrong_manifest)
    manifest = json.loads((wrong_manifest / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][:-1]
    (wrong_manifest / "manifest.json").write_text(json.dumps(manifest))
    in_use = tmp_path / "in-use"
    cases = [("lookalike.embedder", ["--model", str(tmp_path / "absent")], {}, "has no manifest.json"),
            ("lookalike.embedder", ["--model", str(tmp_path), "--providers", "gpu"], {}, "providers ['gpu']"),
            ("lookalike.embedder", ["--model", str(tmp_path), "--max-delay-ms", "nan"], {},
             "max_delay_ms must be a finite number, got nan"),
            ("lookalike.embedder", ["--model", str(tmp_path)], {"LOOKALIKE_EMBEDDER_REUSE_PORT": "ture"},
             "LOOKALIKE_EMBEDDER_REUSE_PORT='ture' is not a valid reuse-port (bool)"),
            ("lookalike.embedder", ["--model", str(tmp_path), "--metrics-port", "70000"], {},
             "metrics_port must be 0 (none) to 65535"),
            ("lookalike.embedder", ["--model", str(tmp_path), "--max-concurrent-rpcs", "-1"], {},
             "max_concurrent_rpcs must be 0"),
            ("lookalike.embedder", ["--model", str(wrong_manifest)], {}, "manifest.json says"),
            ("lookalike.searcher", ["--data", str(in_use)], {}, f"another searcher is using the data folder {in_use}"),
            ("lookalike.searcher", ["--data", str(not_a_folder)], {}, "cannot start:"),
            ("lookalike.searcher", ["--data", str(tmp_path), "--address", "127.0.0.1:99999"], {},
             "address must be host:port with a port of 0 to 65535, got '127.0.0.1:99999'"),
            ("lookalike.searcher", ["--data", str(tmp_path), "--max-concurrent-rpcs", "-1"], {},
             "max_concurrent_rpcs must be 0 (unbounded) or more, got -1"),
            ("lookalike.searcher", ["--data", str(tmp_path), "--metrics-port", "70000"], {},
             "metrics_port must be 0 (none) to 65535"),
            ("lookalike.searcher", ["--data", str(tmp_path), "--max-message-bytes", "3000000000"], {},
             "max_message_bytes must be under 2 GiB"),
            ("lookalike.searcher", ["--data", str(tmp_path)], {"LOOKALIKE_SEARCHER_MAX_CONNECTION_AGE_SECONDS": "inf"},
             "max_connection_age_seconds must be a finite number, got inf"),
            ("lookalike.searcher", ["--data", str(tmp_path), "--follow-interval", "nan"], {},
             "follow_interval must be a finite number, got nan"),
            ("lookalike.searcher", ["--data", str(tmp_path)], {"LOOKALIKE_SEARCHER_EF": "abc"},
             "environment variable LOOKALIKE_SEARCHER_EF='abc' is not a valid ef (int)")]
    with running_service("lookalike.searcher", ["--data", str(in_use)]):  # the folder is in use
        for module, args, env, expected in cases:
            result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                                    timeout=120, env={**os.environ, **env})
            assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, \
                (module, args, result.stderr[-2000:])
    helped = run_cli("serve", "embedder", "--help")
    assert helped.returncode == 0 and "--max-batch" in helped.stdout and "--max-queued-images" in helped.stdout


def test_searcher_client_round_trip_and_cli_serve(tmp_path: Path) -> None:
    from lookalike.tools.processes import running_service
    from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(6, 32)).astype(np.float32)
    with running_service("lookalike.tools.cli", ["serve", "searcher", "--data", str(tmp_path)]) as (_, port):
        with SearcherClient(f"127.0.0.1:{port}") as searcher:
            statuses = searcher.upsert([CatalogueItem(f"s{i}", "ab"[i % 2], v, "m", {"n": str(i)})
                                        for i, v in enumerate(vectors)]).statuses
            assert [s.code for s in statuses] == [0] * 6
            hits = searcher.search(vectors[4], "m", k=2, routing=routing_for(categories=["a"])).hits
            assert hits[0].id == "s4" and hits[0].attributes["n"] == "4" and all(h.category == "a" for h in hits)
            routed = searcher.search(vectors[1], "m", k=3, routing=routing_for(probabilities=[("b", 0.95), ("a", 0.05)]))
            assert [p.category for p in routed.probes] == ["b"] and routed.hits[0].id == "s1"
            assert searcher.delete(["s4"]).deleted == 1 and searcher.stats().items == 5
            with pytest.raises(InvalidArgumentError, match="k is 0"):
                searcher.search(vectors[0], "m", k=0)


def test_closing_an_async_client_during_a_call_is_a_library_error() -> None:
    """grpc.aio cancels the calls of a channel closed under them, and the caller got asyncio.CancelledError, the
    signal of its own task's cancellation (a BaseException, past `except Exception`). It now gets a
    LookalikeError with CANCELLED; cancelling the caller's task still raises CancelledError. The server is a
    gRPC server whose every method takes 5 s, so the calls stay in flight."""
    from concurrent import futures

    from lookalike.client.aio import AsyncSearcherClient
    from lookalike.client.connection import LookalikeError

    class Slow(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: time.sleep(5) or b"")

    slow = grpc.server(futures.ThreadPoolExecutor(4), handlers=[Slow()])
    settings = ChannelSettings(f"127.0.0.1:{slow.add_insecure_port('127.0.0.1:0')}", retries=0, timeout=20)
    slow.start()

    async def close_during_a_call() -> None:
        client = AsyncSearcherClient(settings)
        call = asyncio.ensure_future(client.stats())
        await asyncio.sleep(0.5)
        await client.close()
        with pytest.raises(LookalikeError, match="Searcher.GetStats failed with CANCELLED: the client was closed "
                                                 "during the call") as raised:
            await call
        assert raised.value.code == grpc.StatusCode.CANCELLED

    async def cancel_the_caller() -> None:
        async with AsyncSearcherClient(settings) as client:
            call = asyncio.ensure_future(client.stats())
            await asyncio.sleep(0.5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    try:
        asyncio.run(close_during_a_call())
        asyncio.run(cancel_the_caller())
    finally:
        slow.stop(None)
