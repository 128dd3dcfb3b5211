"""Prometheus metrics on both servers; gRPC over TLS with a plaintext health port for probes, client
certificates (mTLS), and certificates renewed under load without a restart."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lookalike.client.connection import ChannelSettings, InvalidArgumentError, UnavailableError
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for, search_request
from tests.conftest import start_searcher
from lookalike.tools.processes import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def scrape_at(host: str, port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the host, whatever the env
    with opener.open(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def ipv6_loopback_missing() -> str:
    """Why this machine cannot reach [::1] (no IPv6, or no IPv6 loopback address); empty when it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return f"this machine has no IPv6 loopback ([::1]: {error})"
    return ""


def test_the_metrics_endpoint_answers_on_ipv4_and_ipv6() -> None:
    """gRPC listens on [::]; so must /metrics, or Prometheus cannot scrape a pod on an IPv6-only cluster."""
    from lookalike.serving.rpc_metrics import serve_metrics

    port = serve_metrics(free_port())
    assert "lookalike_rpc_requests_total" in scrape_at("127.0.0.1", port)
    reason = ipv6_loopback_missing()
    if reason:
        pytest.skip(f"IPv6 half not checked: {reason}")
    assert "lookalike_rpc_requests_total" in scrape_at("[::1]", port)


def test_the_metrics_endpoint_falls_back_to_ipv4_without_ipv6(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from lookalike.serving import rpc_metrics

    serving = rpc_metrics.start_http_server

    def without_ipv6(port: int, addr: str = "0.0.0.0") -> object:
        if ":" in addr:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return serving(port, addr=addr)

    monkeypatch.setattr(rpc_metrics, "start_http_server", without_ipv6)
    with caplog.at_level("WARNING", logger="lookalike.serving.rpc_metrics"):
        port = rpc_metrics.serve_metrics(free_port())
    assert "lookalike_rpc_requests_total" in scrape_at("127.0.0.1", port)
    assert "IPv4 only" in caplog.text


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in a scrape; 0 for a series not there yet (a counter that has not counted)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


def counted(before: str, after: str, name: str, **labels: str) -> float:
    """How much a series grew between two scrapes: the registry is process-wide, so other tests' counts are
    already in it."""
    return sample(after, name, **labels) - sample(before, name, **labels)


def test_embedder_metrics(model_dir: Path, image_bytes: list[bytes]) -> None:
    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    metrics_port = free_port()
    started, port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0", metrics_port=metrics_port))
    try:
        with EmbedderClient(f"127.0.0.1:{port}") as client:
            client.model_info()
            before = scrape(metrics_port)
            embedded = client.embed(image_bytes[:3])
            broken = client.embed([b"broken"])
        after = scrape(metrics_port)
    finally:
        started.stop(None)
    assert all(result.ok for result in embedded) and not broken[0].ok
    # A bad image is refused in its own result of an OK response: two Embed calls, both OK.
    assert counted(before, after, "lookalike_rpc_requests_total", code="OK", method="Embed") == 2
    assert counted(before, after, "lookalike_rpc_latency_seconds_count", code="OK", method="Embed") == 2
    assert counted(before, after, "lookalike_rpc_latency_seconds_bucket", code="OK", method="Embed", le="+Inf") == 2
    # The three photos reach the model, in one batch or more; the undecodable bytes never do.
    batches = counted(before, after, "lookalike_embedder_batch_images_count")
    assert counted(before, after, "lookalike_embedder_batch_images_sum") == 3 and 1 <= batches <= 3
    assert counted(before, after, "lookalike_embedder_queue_delay_seconds_count") == batches
    assert counted(before, after, "lookalike_embedder_inference_seconds_count") == batches
    assert counted(before, after, "lookalike_embedder_inference_seconds_sum") > 0


def test_searcher_metrics(tmp_path: Path) -> None:
    metrics_port = free_port()
    started, channel = start_searcher(tmp_path, snapshot_interval=0, metrics_port=metrics_port)
    try:
        with SearcherClient(f"127.0.0.1:{started.port}") as client:
            vectors = np.eye(4, dtype=np.float32)
            before = scrape(metrics_port)
            client.upsert([CatalogueItem(f"i{n}", "hats", v, "m") for n, v in enumerate(vectors)])
            client.delete(["i0"])
            client.search(vectors[1], "m", k=2, routing=routing_for(categories=["hats"]))
            with pytest.raises(InvalidArgumentError, match="k"):
                client.search(vectors[1], "m", k=0)
        after = scrape(metrics_port)
    finally:
        channel.close()
        started.stop(None)
    assert sample(after, "lookalike_searcher_shard_items", category="hats") == 3
    assert sample(after, "lookalike_searcher_shard_deleted_slots", category="hats") == 1
    assert counted(before, after, "lookalike_searcher_shard_probes_total", category="hats") == 1
    assert counted(before, after, "lookalike_rpc_requests_total", code="OK", method="Search") == 1
    assert counted(before, after, "lookalike_rpc_requests_total", code="INVALID_ARGUMENT", method="Search") == 1
    assert counted(before, after, "lookalike_rpc_requests_total", code="OK", method="Upsert") == 1
    assert counted(before, after, "lookalike_rpc_requests_total", code="OK", method="Delete") == 1


def test_calls_their_callers_gave_up_on_are_counted_as_such(tmp_path: Path) -> None:
    """A search that outlived its caller's deadline, or whose caller cancelled it, was counted code OK: a
    dashboard of errors showed none while every client timed out."""
    metrics_port = free_port()
    started, channel = start_searcher(tmp_path, snapshot_interval=0, metrics_port=metrics_port)
    try:
        with SearcherClient(f"127.0.0.1:{started.port}") as client:
            vector = np.eye(4, dtype=np.float32)[0]
            client.upsert([CatalogueItem("i0", "hats", vector, "m")])
            before = scrape(metrics_port)
            request = search_request(vector, "m", 1, routing_for(categories=["hats"]), 0)
            shard = started.catalogue.shards[("hats", 0, 1)]
            with shard.lock.writing():  # the searches wait for it
                with pytest.raises(grpc.RpcError) as timed_out:
                    client.stub.Search(request, timeout=0.3)
                cancelled = client.stub.Search.future(request, timeout=30)
                time.sleep(0.3)
                cancelled.cancel()
                time.sleep(0.3)  # the server has heard of it before the search goes on
            assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 10
            while sum(counted(before, scrape(metrics_port), "lookalike_rpc_requests_total", code=code, method="Search")
                      for code in ("OK", "DEADLINE_EXCEEDED", "CANCELLED")) < 2:
                assert time.monotonic() < deadline, "the two searches were not counted"
                time.sleep(0.05)
        after = scrape(metrics_port)
    finally:
        channel.close()
        started.stop(None)
    assert counted(before, after, "lookalike_rpc_requests_total", code="DEADLINE_EXCEEDED", method="Search") == 1
    assert counted(before, after, "lookalike_rpc_requests_total", code="CANCELLED", method="Search") == 1


def test_health_watches_of_made_up_names_keep_nothing(tmp_path: Path) -> None:
    """Health needs no token, and grpc_health kept an entry per name ever watched: 40 watches of 8 MB names
    held 320 MB for good. Names are bounded, and a watch's entry goes when it ends."""
    started, channel = start_searcher(tmp_path, snapshot_interval=0)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Watch(health_pb2.HealthCheckRequest(service="x" * 300), timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "service is 300 bytes, expected a service name of at most 256" in refused.value.details()
        watched_before = set(started.health._send_response_callbacks)  # grpc_health's table of watchers
        for n in range(20):
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=f"made-up-{n}"), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            watch.cancel()
        deadline = time.monotonic() + 10
        while set(started.health._send_response_callbacks) != watched_before:
            assert time.monotonic() < deadline, set(started.health._send_response_callbacks) - watched_before
            time.sleep(0.05)
        kept = stub.Watch(health_pb2.HealthCheckRequest(service="lookalike.v1.Searcher"), timeout=10)
        assert next(kept).status == health_pb2.HealthCheckResponse.SERVING
        kept.cancel()
    finally:
        channel.close()
        started.stop(None)


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def certificate_authority(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away CA (EC P-256, one day): its certificate and key."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def issue(authority: tuple[Path, Path], directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for localhost signed by `authority`, good for servers and clients: (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-CA", str(authority[0]), "-CAkey", str(authority[1]),
                    "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost",
                    "-addext", "extendedKeyUsage=serverAuth,clientAuth", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def handshake_works(port: int, root: Path, client: tuple[Path, Path] | None = None) -> bool:
    """Whether a brand-new connection (its own subchannel, so a new TLS handshake) can call the server."""
    credentials = grpc.ssl_channel_credentials(root.read_bytes(), *((client[1].read_bytes(), client[0].read_bytes())
                                                                     if client else ()))
    with grpc.secure_channel(f"localhost:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return True
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return False


def install(source: tuple[Path, Path], cert: Path, key: Path) -> None:
    """Puts a certificate and key in place the way a rewritten Secret does: each file renamed in whole."""
    for new, target in ((source[0], cert), (source[1], key)):
        temporary = target.with_suffix(".new")
        temporary.write_bytes(new.read_bytes())
        os.replace(temporary, target)


def test_certificate_renewed_under_load_without_restart(tmp_path: Path) -> None:
    old_ca, new_ca = certificate_authority(tmp_path / "ca", "old-ca"), certificate_authority(tmp_path / "ca", "new-ca")
    both_cas = tmp_path / "ca" / "both.crt"
    both_cas.write_bytes(old_ca[0].read_bytes() + new_ca[0].read_bytes())
    cert, key = tmp_path / "mount" / "tls.crt", tmp_path / "mount" / "tls.key"
    cert.parent.mkdir()
    install(issue(old_ca, tmp_path / "issued", "old"), cert, key)
    renewed = issue(new_ca, tmp_path / "issued", "new")
    started, channel = start_searcher(tmp_path / "data", snapshot_interval=0, address_override="localhost:0",
                                      tls_cert=cert, tls_key=key)
    vectors = np.eye(8, dtype=np.float32)
    secure = ChannelSettings(f"localhost:{started.port}", tls=True, root_certificates=both_cas.read_bytes(), retries=0)
    with SearcherClient(secure) as client:
        client.upsert([CatalogueItem(f"i{n}", "hats", v, "m") for n, v in enumerate(vectors)])
    stop, failures, calls = threading.Event(), [], [0]

    def keep_searching() -> None:  # one long-lived connection per thread
        with SearcherClient(secure) as client:
            while not stop.is_set():
                try:
                    assert client.search(vectors[3], "m", k=1, routing=routing_for(categories=["hats"])).hits[0].id == "i3"
                    calls[0] += 1
                except Exception as error:  # noqa: BLE001 - every failure is collected and reported
                    failures.append(repr(error))

    def keep_connecting() -> None:  # a new connection, so a new handshake, for every call
        while not stop.is_set():
            if not handshake_works(started.port, both_cas):
                failures.append("new connection failed")

    threads = [threading.Thread(target=keep_searching) for _ in range(3)] + [threading.Thread(target=keep_connecting)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert handshake_works(started.port, old_ca[0]) and not handshake_works(started.port, new_ca[0])
        # Half a rotation (the new certificate beside the old key) is not served: the old pair stays.
        cert.write_bytes(renewed[0].read_bytes())
        assert handshake_works(started.port, old_ca[0])
        install(renewed, cert, key)
        time.sleep(0.5)
        # New connections get the renewed certificate; open ones carry on with theirs.
        assert handshake_works(started.port, new_ca[0]) and not handshake_works(started.port, old_ca[0])
        calls_before = calls[0]
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        channel.close()
        started.stop(None)
    assert failures == [] and calls[0] > calls_before > 0


def test_mutual_tls_requires_a_client_certificate_from_the_ca(model_dir: Path, tmp_path: Path) -> None:
    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    server_ca, client_ca, stranger_ca = (certificate_authority(tmp_path, name) for name in ("server-ca", "client-ca",
                                                                                             "stranger-ca"))
    server_cert, server_key = issue(server_ca, tmp_path, "server")
    started, port = create_server(EmbedderConfig(model_dir=model_dir, address="localhost:0", tls_cert=server_cert,
                                                 tls_key=server_key, tls_client_ca=client_ca[0]))
    try:
        member, stranger = issue(client_ca, tmp_path, "member"), issue(stranger_ca, tmp_path, "stranger")
        assert handshake_works(port, server_ca[0], member)
        assert not handshake_works(port, server_ca[0]) and not handshake_works(port, server_ca[0], stranger)
        settings = ChannelSettings(f"localhost:{port}", tls=True, root_certificates=server_ca[0].read_bytes(),
                                   private_key=member[1].read_bytes(), certificate_chain=member[0].read_bytes())
        with EmbedderClient(settings) as client:
            assert client.model_info().model_id
        # The client CA bundle is followed like the certificate: trusting the other CA takes effect for new
        # connections.
        install((stranger_ca[0], server_key), client_ca[0], server_key)
        time.sleep(0.05)
        assert handshake_works(port, server_ca[0], stranger) and not handshake_works(port, server_ca[0], member)
    finally:
        started.stop(None)


def test_tls_port_and_plaintext_health_port(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    health_port = free_port()
    started, channel = start_searcher(tmp_path / "data", snapshot_interval=0, address_override="localhost:0",
                                      tls_cert=cert, tls_key=key, health_address=f"127.0.0.1:{health_port}")
    try:
        secure = ChannelSettings(f"localhost:{started.port}", tls=True, root_certificates=cert.read_bytes())
        with SearcherClient(secure) as client:
            assert client.stats().items == 0
        plain = ChannelSettings(f"localhost:{started.port}", timeout=2, retries=1)
        with SearcherClient(plain) as client, pytest.raises(UnavailableError):
            client.stats()
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
            reply = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        started.stop(None)


@pytest.mark.parametrize(("workers", "rpc_limit", "refusal"), [(1, 0, grpc.StatusCode.DEADLINE_EXCEEDED),
                                                             (4, 1, grpc.StatusCode.RESOURCE_EXHAUSTED)])
def test_the_health_port_answers_while_the_serving_port_is_busy(workers: int, rpc_limit: int,
                                                                 refusal: grpc.StatusCode) -> None:
    """Kubelet's probes ask the health-only port: on the serving port a probe waits behind long calls holding
    every handler thread (one thread, one call held open) and times out, which took busy pods out of their
    Service; and at --max-concurrent-rpcs (one call) gRPC refuses the probe too, which restarted busy pods when
    liveness asked there. The health port has threads of its own and answers at once."""
    from lookalike.serving.server import build_server, start_health_server

    server, health_servicer = build_server(max_workers=workers, max_message_bytes=1 << 20,
                                           service_names=["test.Slow"], max_concurrent_rpcs=rpc_limit)
    release, entered = threading.Event(), threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        release.wait(30)
        return b""

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Slow", {
        "Hold": grpc.unary_unary_rpc_method_handler(slow)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_server, health_port = start_health_server(health_servicer, "127.0.0.1:0")
    check = health_pb2.HealthCheckRequest(service="")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                grpc.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
            held = channel.unary_unary("/test.Slow/Hold").future(b"", timeout=30)
            assert entered.wait(10)  # the one handler thread, or the one call allowed, is taken
            with pytest.raises(grpc.RpcError) as waited:
                health_pb2_grpc.HealthStub(channel).Check(check, timeout=1)
            assert waited.value.code() == refusal
            reply = health_pb2_grpc.HealthStub(health_channel).Check(check, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            release.set()
            held.result()
    finally:
        release.set()
        server.stop(None)
        health_server.stop(None)


def test_aged_connections_close_without_failing_a_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 0.3 s connection age the server sends GOAWAY again and again; calls keep succeeding."""
    from lookalike.searcher.servicer import SearcherServicer
    from lookalike.v1 import searcher_pb2

    # The address each call came from: a new connection comes from a new client port, so several addresses
    # show the connections were really closed and replaced (the calls would succeed without that too).
    peers: set[str] = set()
    answer = SearcherServicer.GetStats

    def get_stats(servicer: SearcherServicer, request: searcher_pb2.GetStatsRequest,
                  context: grpc.ServicerContext) -> searcher_pb2.GetStatsResponse:
        peers.add(context.peer())
        return answer(servicer, request, context)

    monkeypatch.setattr(SearcherServicer, "GetStats", get_stats)
    started, channel = start_searcher(tmp_path, snapshot_interval=0, max_connection_age_seconds=0.3)
    failures = 0
    with SearcherClient(ChannelSettings(f"127.0.0.1:{started.port}", retries=0)) as client:
        # At least 2 s (several connection ages) and 60 calls, however slow the machine (30 s at most).
        started_at = time.monotonic()
        calls = 0
        while (calls < 60 or time.monotonic() - started_at < 2.0) and time.monotonic() - started_at < 30:
            try:
                client.stats()
            except UnavailableError:
                failures += 1
            calls += 1
            time.sleep(0.01)
    channel.close()
    started.stop(None)
    assert calls >= 60 and failures == 0
    assert len(peers) >= 3, f"the calls came over {len(peers)} connection(s): {sorted(peers)}"
