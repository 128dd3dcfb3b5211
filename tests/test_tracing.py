"""OpenTelemetry tracing: one client call is one trace across embedder and searcher, exported over OTLP.

Real parts throughout: both servers run as processes with tracing on, the client runs in a process with
the OpenTelemetry SDK, and all three export to an OTLP/gRPC trace collector this test serves on port 0.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lookalike.tools.processes import running_service

CLIENT = """
import json, sys
import numpy as np
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1], insecure=True)))
trace.set_tracer_provider(provider)

from lookalike.client.connection import InvalidArgumentError
from lookalike.client.facade import Lookalike

embedder, searcher, *photos = sys.argv[2:]
with Lookalike(embedder, searcher) as lookalike:
    lookalike.index(photos, [f"item{n}" for n in range(len(photos))])
    with trace.get_tracer("shop").start_as_current_span("shopper asks") as span:
        found = lookalike.search(photos[0], k=3)
        search_trace = format(span.get_span_context().trace_id, "032x")
    with trace.get_tracer("shop").start_as_current_span("bad request") as span:
        try:
            lookalike.searcher.search(np.ones(8, np.float32), lookalike.model_id, k=0)
        except InvalidArgumentError:
            pass
        refused_trace = format(span.get_span_context().trace_id, "032x")
provider.shutdown()
print(json.dumps({"search": search_trace, "refused": refused_trace, "top": found.matches[0].id}))
"""


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver keeping every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> dict[str, dict[str, Any]]:
        """The spans of one trace as {"service span-name": {attribute: value}}."""
        return {f"{service} {span.name}": {a.key: _value(a.value) for a in span.attributes}
                for service, span in self.spans if span.trace_id.hex() == trace_id}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


def test_one_trace_across_client_embedder_and_searcher(model_dir: Path, grocery_val: list, tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    # Spans leave the servers in batches; a short delay keeps the test quick.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    embedder_log: list[str] = []
    searcher_log: list[str] = []
    photos = [str(image.path) for image in grocery_val[:4]]
    try:
        with running_service("lookalike.embedder", ["--model", str(model_dir), "--otlp-endpoint", endpoint],
                             env=env, log_lines=embedder_log) as (_, embedder_port), \
             running_service("lookalike.searcher", ["--data", str(tmp_path), "--otlp-endpoint", endpoint],
                             env=env, log_lines=searcher_log) as (_, searcher_port):
            client = subprocess.run([sys.executable, "-c", CLIENT, endpoint, f"127.0.0.1:{embedder_port}",
                                     f"127.0.0.1:{searcher_port}", *photos],
                                    capture_output=True, text=True, timeout=120)
            assert client.returncode == 0, client.stderr
            traces = json.loads(client.stdout.strip().splitlines()[-1])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "lookalike-searcher /lookalike.v1.Searcher/Search" not in \
                    collector.trace(traces["search"]):
                time.sleep(0.1)
    finally:
        server.stop(None)
    assert traces["top"] == "item0"
    spans = collector.trace(traces["search"])
    # The shopper's span, the facade's, one client span per call, and the two servers' spans: one trace.
    assert {"shop shopper asks", "shop Lookalike.search", "shop lookalike.v1.Embedder/Embed",
            "shop lookalike.v1.Searcher/Search", "lookalike-embedder /lookalike.v1.Embedder/Embed",
            "lookalike-searcher /lookalike.v1.Searcher/Search"} <= set(spans), sorted(spans)
    embed = spans["lookalike-embedder /lookalike.v1.Embedder/Embed"]
    assert embed["lookalike.images"] == 1 and embed["lookalike.failed_images"] == 0
    assert embed["lookalike.inference_batch_images"][0] >= 1
    search = spans["lookalike-searcher /lookalike.v1.Searcher/Search"]
    assert search["lookalike.shards_probed"] == len(search["lookalike.shard_categories"]) >= 1
    assert len(search["lookalike.shard_seconds"]) == search["lookalike.shards_probed"] and search["lookalike.hits"] >= 1
    # The refused call's server log line carries its trace id.
    refused = [line for line in searcher_log if "Search ended INVALID_ARGUMENT" in line]
    assert refused and f"trace={traces['refused']}" in refused[0], searcher_log[-5:]


WATCHED = """
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lookalike.serving.server import bind, build_server

server, health = build_server(max_workers=4, max_message_bytes=4 << 20, service_names=["lookalike.v1.Searcher"],
                              otlp_endpoint=sys.argv[1])
port = bind(server, "127.0.0.1:0")
server.start()
health.set("", health_pb2.HealthCheckResponse.SERVING)
watches = []
for _ in range(4):  # as many as the server has handler threads
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    next(watch)
    watches.append((channel, watch))
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    except grpc.RpcError as error:
        print(error.code().name)
for channel, watch in watches:
    watch.cancel()
    channel.close()
server.stop(None)
"""


def test_with_tracing_on_open_health_watches_hold_no_handler_thread() -> None:
    """The tracing interceptor wrapped Health.Watch in a blocking stream handler: each watch (kubelet's, a
    client's, anyone's: health needs no token) held a handler thread, and a few froze the server. Health
    calls are not traced."""
    done = subprocess.run([sys.executable, "-c", WATCHED, "http://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "SERVING", done.stdout + done.stderr[-2000:]
