"""Bearer tokens with roles on a real searcher (and embedder): who may call what, and a rotated file."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lookalike.client.connection import ChannelSettings, LookalikeError
from lookalike.client.embedder_client import EmbedderClient
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
from lookalike.v1 import searcher_pb2
from tests.conftest import start_searcher

TOKENS = {"read": "reader-token-1", "write": "writer-token-1", "admin": "admin-token-1"}


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    lines = ["# role sha256(token)"] + [f"{role} {hashlib.sha256(token.encode()).hexdigest()}"
                                         for role, token in tokens.items()]
    staging = path.with_suffix(".tmp")
    staging.write_text("\n".join(lines) + "\n")
    staging.replace(path)  # as a Secret mount swaps its files: whole, never half written


@pytest.fixture()
def guarded(tmp_path: Path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    started, channel = start_searcher(tmp_path / "data", snapshot_interval=0, auth_tokens=tokens)
    yield started, tokens
    channel.close()
    started.stop(None)


def client(started, token: str = "") -> SearcherClient:
    return SearcherClient(ChannelSettings(f"127.0.0.1:{started.port}", token=token, retries=0, timeout=10))


def refusal(call) -> LookalikeError:
    with pytest.raises(LookalikeError) as refused:
        call()
    return refused.value


ITEM = CatalogueItem("sku-1", "hats", np.eye(8, dtype=np.float32)[0], "m")


def test_roles_decide_who_may_call_what(guarded) -> None:
    started, _ = guarded
    missing = refusal(lambda: client(started).stats())
    assert missing.code == grpc.StatusCode.UNAUTHENTICATED and "none was sent" in missing.details
    unknown = refusal(lambda: client(started, "guessed-token").stats())
    assert unknown.code == grpc.StatusCode.UNAUTHENTICATED and "guessed-token" not in unknown.details
    reader = client(started, TOKENS["read"])
    assert reader.stats().items == 0
    denied = refusal(lambda: reader.upsert([ITEM]))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details == "Upsert needs role 'write'; this token has role 'read'"
    assert TOKENS["read"] not in denied.details
    writer = client(started, TOKENS["write"])
    assert writer.upsert([ITEM]).statuses[0].code == 0
    assert reader.search(ITEM.vector, "m", k=1).hits[0].id == "sku-1", "a reader searches what a writer stored"
    move = searcher_pb2.MoveCategoryRequest(category="hats", group="b")
    with pytest.raises(grpc.RpcError) as raw:
        writer.stub.MoveCategory(move, metadata=writer.settings.call_metadata(), timeout=10)
    assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = client(started, TOKENS["admin"])
    with pytest.raises(grpc.RpcError) as raw:
        admin.stub.MoveCategory(move, metadata=admin.settings.call_metadata(), timeout=10)
    # Past auth: the searcher itself answers (SQLite has no groups to move between).
    assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_health_needs_no_token(guarded) -> None:
    started, _ = guarded
    with grpc.insecure_channel(f"127.0.0.1:{started.port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token_and_made_up_methods_cost_nothing(guarded) -> None:
    """Reflection's stream holds a handler thread while open: without a token, a few idle streams froze every
    call. It now needs `read`. A made-up method name got a refusal of its own, and with it per-method metric
    series that grew with every new name; it now gets gRPC's UNIMPLEMENTED and no series."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from prometheus_client import REGISTRY

    started, _ = guarded
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(f"127.0.0.1:{started.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                                 metadata=[("authorization", f"Bearer {TOKENS['read']}")]))
        assert "lookalike.v1.Searcher" in {s.name for s in answers[0].list_services_response.service}

        def method_series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
            """Every metric series labelled by RPC method: (sample name, its labels)."""
            return {(sample.name, tuple(sorted(sample.labels.items()))) for metric in REGISTRY.collect()
                    for sample in metric.samples if "method" in sample.labels}

        before = method_series()
        for n in range(20):
            with pytest.raises(grpc.RpcError) as unknown:
                channel.unary_unary(f"/lookalike.v1.Searcher/MadeUp{n}")(b"", timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        grown = method_series() - before
        assert not grown, f"made-up methods added {len(grown)} metric series, e.g. {sorted(grown)[:2]}"


def test_callers_without_a_token_cannot_hold_the_handler_threads(tmp_path: Path) -> None:
    """A refusal was a unary handler: gRPC holds a handler thread waiting for the request before running it, so
    as many streams without a token as the server has threads, sending nothing, froze every call. Refusals
    now read nothing; and they are still counted, by method and code."""
    from prometheus_client import REGISTRY

    def refused(method: str) -> float:
        return REGISTRY.get_sample_value("lookalike_rpc_requests_total",
                                         {"method": method, "code": "UNAUTHENTICATED"}) or 0.0

    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    started, channel = start_searcher(tmp_path / "data", snapshot_interval=0, auth_tokens=tokens, grpc_workers=4)
    idle: list[tuple[grpc.Channel, object]] = []
    release = threading.Event()

    def nothing_until_released():  # type: ignore[no-untyped-def]
        release.wait()
        return
        yield

    before = refused("Search")
    try:
        for _ in range(4):
            stream = grpc.insecure_channel(f"127.0.0.1:{started.port}")
            idle.append((stream, stream.stream_stream("/lookalike.v1.Searcher/Search")(nothing_until_released(),
                                                                                      timeout=60)))
        time.sleep(0.5)
        assert client(started, TOKENS["read"]).stats().items == 0
        for _, call in idle:
            with pytest.raises(grpc.RpcError) as answer:
                next(call)
            assert answer.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused("Search") - before == 4
    finally:
        release.set()
        for stream, _ in idle:
            stream.close()
        channel.close()
        started.stop(None)


def test_a_rotated_tokens_file_is_read_without_a_restart(guarded) -> None:
    started, tokens = guarded
    assert client(started, TOKENS["read"]).stats().items == 0
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_tokens(tokens, {"read": "reader-token-2"})
    assert client(started, "reader-token-2").stats().items == 0
    assert refusal(lambda: client(started, TOKENS["read"]).stats()).code == grpc.StatusCode.UNAUTHENTICATED


def test_the_client_takes_its_token_from_the_environment_or_a_file(guarded, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    started, _ = guarded
    # With the newline a Secret made from a file keeps (it was sent in the header: gRPC's INTERNAL "Invalid
    # metadata", naming nothing), as from the token file.
    monkeypatch.setenv("LOOKALIKE_TOKEN", TOKENS["read"] + "\n")
    assert client(started).stats().items == 0
    monkeypatch.delenv("LOOKALIKE_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["write"] + "\n")
    monkeypatch.setenv("LOOKALIKE_TOKEN_FILE", str(token_file))
    assert client(started).upsert([ITEM]).statuses[0].code == 0
    # A file that cannot be read is the library's error, as a refused token is (not a bare OSError).
    monkeypatch.setenv("LOOKALIKE_TOKEN_FILE", str(tmp_path / "missing"))
    error = refusal(lambda: client(started).stats())
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and "LOOKALIKE_TOKEN_FILE) cannot be read" in error.details
    assert error.method == "Searcher.GetStats", "the call it was for (the web page blamed the searcher for all)"


def test_a_malformed_rewrite_keeps_the_last_good_tokens(guarded, caplog: pytest.LogCaptureFixture) -> None:
    """A rotated Secret with one bad line must not take every call down: the tokens read before stay in use,
    the file's problem is logged once, and the next good rewrite is read as usual."""
    started, tokens = guarded
    assert client(started, TOKENS["read"]).stats().items == 0
    time.sleep(0.01)  # a new modification time even on coarse clocks
    typo = f"raed {hashlib.sha256(b'reader-token-2').hexdigest()}"  # line 5: after the comment and three tokens
    staging = tokens.with_suffix(".tmp")
    staging.write_text(tokens.read_text() + typo + "\n")
    staging.replace(tokens)
    with caplog.at_level(logging.WARNING, logger="lookalike.serving.auth"):
        for _ in range(3):
            assert client(started, TOKENS["read"]).stats().items == 0, "a token still valid keeps working"
        assert refusal(lambda: client(started, "guessed-token").stats()).code == grpc.StatusCode.UNAUTHENTICATED
        assert refusal(lambda: client(started, "reader-token-2").stats()).code == grpc.StatusCode.UNAUTHENTICATED
    logged = [record for record in caplog.records if record.name == "lookalike.serving.auth"]
    assert len(logged) == 1, "logged once per change of the file, not once per call"
    assert logged[0].levelno == logging.ERROR and f"{tokens}:5: expected 'ROLE SHA256_HEX'" in logged[0].getMessage()
    time.sleep(0.01)
    write_tokens(tokens, {"read": "reader-token-2"})
    assert client(started, "reader-token-2").stats().items == 0
    assert refusal(lambda: client(started, TOKENS["read"]).stats()).code == grpc.StatusCode.UNAUTHENTICATED


def test_a_tokens_file_gone_missing_keeps_the_last_good_tokens(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from lookalike.serving.auth import TokenFile

    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    token_file = TokenFile(tokens)
    tokens.unlink()
    with caplog.at_level(logging.WARNING, logger="lookalike.serving.auth"):
        assert [token_file.role_of(TOKENS["write"]) for _ in range(3)] == ["write"] * 3
    assert caplog.text.count("does not load") == 1 and str(tokens) in caplog.text
    write_tokens(tokens, {"admin": "admin-token-2"})
    assert token_file.role_of("admin-token-2") == "admin" and token_file.role_of(TOKENS["write"]) is None


@pytest.mark.parametrize("line", ["owner abc", "read " + "z" * 64, "write " + "ab" * 31, "read"])
def test_a_malformed_tokens_file_stops_the_start(tmp_path: Path, line: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# role sha256(token)\n{line}\n")
    with pytest.raises(ValueError, match=f"^{tokens}:2: expected 'ROLE SHA256_HEX'"):
        start_searcher(tmp_path / "data", snapshot_interval=0, auth_tokens=tokens)


def test_the_embedder_checks_tokens_too(model_dir: Path, image_bytes: list[bytes], tmp_path: Path) -> None:
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    started, port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0", auth_tokens=tokens))
    try:
        anonymous = EmbedderClient(ChannelSettings(f"127.0.0.1:{port}", retries=0))
        assert refusal(lambda: anonymous.model_info()).code == grpc.StatusCode.UNAUTHENTICATED
        reader = EmbedderClient(ChannelSettings(f"127.0.0.1:{port}", token=TOKENS["read"]))
        assert reader.embed(image_bytes[:1])[0].ok
    finally:
        started.stop(None)
