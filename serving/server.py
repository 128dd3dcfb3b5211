"""Server plumbing shared by the embedder and searcher: gRPC server assembly, health, TLS, graceful stop."""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lookalike.serving.auth import TokenAuthInterceptor, TokenFile
from lookalike.serving.errors import UndecodableRequestInterceptor
from lookalike.serving.rpc_metrics import MetricsInterceptor
from lookalike.serving.tls import TlsFiles, server_credentials
from lookalike.serving.tracing import start_tracing

log = logging.getLogger(__name__)


# Health names are service names ("lookalike.v1.Searcher"): far below this.
MAX_HEALTH_NAME_BYTES = 256


class BoundedHealthServicer(health.HealthServicer):
    """grpc_health's servicer, keeping nothing of a Watch once it ends. Its table of watchers kept every name
    ever watched (health needs no token, and a name may be as long as a message): 40 watches of 8 MB names
    held 320 MB for good."""

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable[[health_pb2.HealthCheckResponse | None], None] | None = None) -> Any:
        if len(request.service.encode()) > MAX_HEALTH_NAME_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"service is {len(request.service.encode())} bytes, expected a service name of at most "
                          f"{MAX_HEALTH_NAME_BYTES}")
        answer = super().Watch(request, context, send_response_callback)
        if send_response_callback is not None and not context.is_active():
            # Ended before its close callback was added: gRPC never runs that one, so the watcher stayed.
            self._forget(send_response_callback, request.service)
        return answer

    def _forget(self, send_response_callback: Callable, service: str) -> bool:
        """Removes a watcher (and its name once none is left); False when it was gone already."""
        with self._lock:
            watchers = self._send_response_callbacks.get(service)
            if watchers is None or send_response_callback not in watchers:
                return False
            watchers.remove(send_response_callback)
            if not watchers:
                del self._send_response_callbacks[service]
            return True

    # grpc_health's own hook (the version requirements.lock pins), forgetting the watcher as above.
    def _on_close_callback(self, send_response_callback: Callable, service: str) -> Callable[[], None]:
        def callback() -> None:
            if self._forget(send_response_callback, service):
                send_response_callback(None)

        return callback


def build_server(
    *,
    max_workers: int,
    max_message_bytes: int,
    service_names: Iterable[str],
    auth_tokens: Path | None = None,
    max_concurrent_rpcs: int = 0,
    max_connection_age_seconds: float = 0.0,
    otlp_endpoint: str = "",
    reuse_port: bool = False,
) -> tuple[grpc.Server, BoundedHealthServicer]:
    """A gRPC server with message-size limits, per-RPC metrics, grpc.health.v1 (NOT_SERVING for now),
    reflection, given a tokens file bearer-token auth with roles (lookalike.serving.auth), and given an
    OTLP endpoint a trace span per RPC (lookalike.serving.tracing).

    The caller adds its servicers, binds a port and flips health to SERVING once it is ready.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Several processes may share a port only where that is asked for (a stateless service); otherwise
        # a second server on a taken port must fail rather than silently split the traffic.
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if max_connection_age_seconds:
        # gRPC keeps connections for ever, so pods added later would get no traffic from existing
        # clients; an aged connection is closed (GOAWAY) and the client reconnects, round-robin.
        options += [("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)),
                    ("grpc.max_connection_age_grace_ms", 30_000)]
    names = list(service_names)
    interceptors: list[grpc.ServerInterceptor] = []
    if otlp_endpoint:
        # Outermost, so metrics, auth and the servicer all run inside the RPC's span.
        service = os.environ.get("OTEL_SERVICE_NAME") or "lookalike-" + names[0].rsplit(".", 1)[-1].lower()
        interceptors.append(start_tracing(service, otlp_endpoint))
    # Metrics before auth, so refused calls are counted with their status too.
    interceptors.append(MetricsInterceptor())
    if auth_tokens is not None:
        interceptors.append(TokenAuthInterceptor(TokenFile(auth_tokens)))
    # Innermost: it wraps the servicer's own handler (refusals by auth have nothing to decode).
    interceptors.append(UndecodableRequestInterceptor())
    # Past max_concurrent_rpcs gRPC itself answers RESOURCE_EXHAUSTED, before a thread or a buffer is spent.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         interceptors=interceptors, maximum_concurrent_rpcs=max_concurrent_rpcs or None)
    health_servicer = BoundedHealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


def bind(server: grpc.Server, address: str, tls: TlsFiles | None = None) -> int:
    """Binds a port ("host:0" picks a free one), with TLS (renewed files followed, see serving.tls) when given."""
    try:
        port = (server.add_secure_port(address, server_credentials(tls)) if tls is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpcio's own "Failed to bind": say what to check instead
        port = 0
    if port == 0:
        raise OSError(f"could not bind {address}: the port is taken (another process listens on it) or the "
                      "address is not this machine's")
    return port


def start_health_server(health_servicer: health.HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server answering only grpc.health.v1 from the main server's health servicer.

    Kubelet's native grpc probes speak no TLS, so a TLS server needs this beside it for its probes.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, address)
    server.start()
    return server, port


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer; subclasses free their service in `release`."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    # The plaintext health-only server beside a TLS port, if any.
    health_server: grpc.Server | None

    def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, drains requests for `grace` seconds, stops, then releases the service."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        self.release()

    def release(self) -> None:
        """What the service frees once no request runs any more."""


def exit_on_signal_while_starting() -> None:
    """Until serve_until_signalled takes over, SIGTERM and SIGINT end the process at once (exit 128 + signal).
    In a container the server is PID 1, which ignores a signal it has no handler for: a pod deleted while it
    loads (a model, shards rebuilt from the store, a database not up yet) waited out its whole grace period."""
    def leave(signum: int, _frame: object) -> None:
        log.info("signal %d while starting: exiting", signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)


def serve_until_signalled(running: RunningServer, grace_seconds: float, ready_line: str) -> None:
    """Prints `ready_line` (what callers wait for), blocks until SIGTERM/SIGINT, then stops the server
    gracefully (see RunningServer.stop)."""
    stopping = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down (grace %.1fs)", signum, grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Announced only now: a SIGTERM sent as soon as the line is read must find the handler, not the default
    # action, which kills the process without its graceful stop (the searcher's final snapshot).
    print(ready_line, flush=True)
    stopping.wait()
    running.stop(grace_seconds)
