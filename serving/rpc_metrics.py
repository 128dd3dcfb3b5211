"""Prometheus metrics shared by both servers: per-RPC counts and latency by status, and the HTTP exporter."""
from __future__ import annotations

import errno
import logging
import time
from typing import Any, Callable

import grpc
from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_REQUESTS = Counter("lookalike_rpc_requests_total", "RPCs handled, by method and status code",
                       ["method", "code"])
RPC_LATENCY = Histogram("lookalike_rpc_latency_seconds", "RPC handling time, by method and status code",
                        ["method", "code"],
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary RPC, labelled with the status code it ended with (DEADLINE_EXCEEDED or
    CANCELLED for one its caller stopped waiting for, whatever the handler returned), and logs each failed one
    (with its trace id when tracing is on, so a client's report can be matched to the server's side)."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        # Unary answers: the RPCs, and auth's refusals (serving/auth.py reads no request to refuse one).
        if handler is None or (handler.unary_unary or handler.stream_unary) is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary or handler.stream_unary

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return inner(request, context)
            except Exception:
                code = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            finally:
                if code == "OK" and context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code().name
                if code == "OK" and not context.is_active():  # the caller stopped waiting: its answer is dropped
                    remaining = context.time_remaining()
                    code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                seconds = time.perf_counter() - started
                RPC_REQUESTS.labels(method, code).inc()
                RPC_LATENCY.labels(method, code).observe(seconds)
                if code != "OK":
                    log.info("%s ended %s after %.1f ms: %s", method, code, seconds * 1000, context.details())

        wrap = (grpc.unary_unary_rpc_method_handler if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler)
        return wrap(timed, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def serve_metrics(port: int) -> int:
    """Starts the /metrics HTTP endpoint (port 0: none) on every address, IPv6 and IPv4 (gRPC listens on [::]
    too: an IPv6-only cluster could not scrape 0.0.0.0), or IPv4 alone where the host has no IPv6; returns
    the port."""
    if port:
        try:
            # One IPv6 socket takes IPv4 too where net.ipv6.bindv6only is 0, Linux's default.
            start_http_server(port, addr="::")
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise
            log.warning("metrics: no IPv6 on this host (%s): /metrics listens on IPv4 only", error)
            start_http_server(port)
    return port
