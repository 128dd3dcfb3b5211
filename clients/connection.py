"""The one place that builds channels and makes calls: TLS, auth metadata, limits, deadlines, retries, errors."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import grpc
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)
# Spans of the library's calls: no-ops until the application installs an OpenTelemetry SDK. With one, each
# call's span travels to the servers in W3C `traceparent` metadata, so their spans join the caller's trace.
tracer = trace.get_tracer("lookalike.client")

Response = TypeVar("Response")


# Spread calls over every address the target resolves to (ipv4:host:port,host:port,... or a DNS name
# with several records, such as a Kubernetes headless Service), skipping the ones that are down.
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach one service. Every call gets `timeout` seconds unless the call says otherwise.

    `target` is one address (host:port) or several replicas of one service: `ipv4:a:1,b:2` or
    `dns:///name:port`. Calls are spread over the replicas round-robin, and a call that meets an
    unavailable replica is retried on another one within its deadline.
    """

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Sent with every call.
    metadata: tuple[tuple[str, str], ...] = ()
    # Bearer token for servers that require one; empty: $LOOKALIKE_TOKEN, else the file named by
    # $LOOKALIKE_TOKEN_FILE (read at each call, so a rotated Secret mount is picked up).
    token: str = ""
    max_message_bytes: int = 64 * 1024 * 1024
    timeout: float = 30.0
    # Attempts after the first, on UNAVAILABLE only, with exponential backoff and jitter, all within
    # the call's deadline.
    retries: int = 8
    backoff_initial: float = 0.1
    backoff_max: float = 3.0
    keepalive_seconds: int = 60

    def __post_init__(self) -> None:
        # gRPC reads a port past 65535 modulo 65536 (host:110831 reached port 45295) and an empty target as a
        # name to resolve, failing each call UNKNOWN: refused here, naming the target.
        if not self.target.strip():
            raise ValueError("target is empty: expected host:port, ipv4:host:port,... or dns:///name:port")
        addresses = self.target.split(":", 1)[1] if self.target.startswith(("ipv4:", "ipv6:")) else self.target
        for address in addresses.split(","):
            port = address.rpartition(":")[2]
            if port.isdigit() and int(port) > 65_535:
                raise ValueError(f"target {self.target!r}: port {port} is out of range (1 to 65535)")

    def _options(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_seconds * 1000),
            ("grpc.keepalive_permit_without_calls", 0),
            # Reconnect soon after a server (re)starts instead of gRPC's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.service_config", _ROUND_ROBIN),
        ]

    def call_metadata(self, name: str = "") -> tuple[tuple[str, str], ...] | None:
        """The metadata every call sends: `metadata`, plus the bearer token when there is one. `name` (the call,
        "Embedder.Embed") is named in the error when the token file cannot be read."""
        # Stripped as the file's is: a Secret made from a file keeps its newline, which a header cannot carry.
        token = (self.token or os.environ.get("LOOKALIKE_TOKEN", "")).strip()
        if not token and os.environ.get("LOOKALIKE_TOKEN_FILE"):
            path = os.environ["LOOKALIKE_TOKEN_FILE"]
            try:
                token = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:  # the library's error, as for a refused token
                raise library_error(grpc.StatusCode.UNAUTHENTICATED, f"the token file {path} (LOOKALIKE_TOKEN_FILE) "
                                    f"cannot be read: {error}", name) from error
        metadata = self.metadata + ((("authorization", f"Bearer {token}"),) if token else ())
        trace_context: dict[str, str] = {}
        propagate.inject(trace_context)
        return (metadata + tuple(trace_context.items())) or None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def open(self) -> grpc.Channel:
        """A blocking channel for the sync clients."""
        if self.tls:
            return grpc.secure_channel(self.target, self._credentials(), options=self._options())
        return grpc.insecure_channel(self.target, options=self._options())

    def open_aio(self) -> grpc.aio.Channel:
        """An asyncio channel for the async clients (same options)."""
        if self.tls:
            return grpc.aio.secure_channel(self.target, self._credentials(), options=self._options())
        return grpc.aio.insecure_channel(self.target, options=self._options())


def channel_settings(target: str | ChannelSettings) -> ChannelSettings:
    """What a client was given, as settings: a bare address takes the defaults."""
    return target if isinstance(target, ChannelSettings) else ChannelSettings(target)


class LookalikeError(Exception):
    """A failed call, with the gRPC status code and the server's details."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        super().__init__(f"{method or 'call'} failed with {code.name}: {details}")


class InvalidArgumentError(LookalikeError):
    """The request was refused as malformed; the message names the field."""


class NotFoundError(LookalikeError):
    """Something named in the request does not exist."""


class ResourceExhaustedError(LookalikeError):
    """A size limit or the server's queue was exceeded."""


class FailedPreconditionError(LookalikeError):
    """The request does not fit the server's state (e.g. a vector from another model)."""


class UnavailableError(LookalikeError):
    """The server could not be reached, or is loading or shutting down, even after retries."""


class DeadlineExceededError(LookalikeError, TimeoutError):
    """The call's deadline passed."""


_ERRORS: dict[grpc.StatusCode, type[LookalikeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def status_code(number: int) -> grpc.StatusCode:
    """The status code of a per-item or per-query status (ItemStatus.code)."""
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)


def library_error(code: grpc.StatusCode, details: str, method: str = "") -> LookalikeError:
    """The library's exception for a status code."""
    return _ERRORS.get(code, LookalikeError)(code, details, method)


def as_library_error(error: grpc.RpcError, method: str = "") -> LookalikeError:
    """A grpc.RpcError as the library's exception for its status code."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return library_error(code, details or "", method)


def backoff_delays(settings: ChannelSettings) -> list[float]:
    """Sleep before each retry: an exponentially growing cap, half of it fixed and half jitter."""
    caps = [min(settings.backoff_max, settings.backoff_initial * 2 ** attempt) for attempt in range(settings.retries)]
    return [cap / 2 + random.uniform(0, cap / 2) for cap in caps]


def _next_delay(error: grpc.RpcError, attempt: int, delays: list[float], deadline: float, name: str) -> float:
    """The sleep before the next attempt; raises the library error when there is none (not UNAVAILABLE,
    retries used up, or the call's deadline would pass first)."""
    if (error.code() != grpc.StatusCode.UNAVAILABLE or attempt == len(delays)
            or time.monotonic() + delays[attempt] >= deadline):
        raise as_library_error(error, name) from None
    log.debug("%s unavailable (%s), retry %d in %.2fs", name, error.details(), attempt + 1, delays[attempt])
    return delays[attempt]


def deadline_after(timeout: float | None) -> float | None:
    """When an operation given `timeout` seconds must end (time.monotonic()); None (or 0, as for one call): it
    has no deadline of its own, and each of its calls gets its channel's default."""
    return time.monotonic() + timeout if timeout else None


def seconds_left(deadline: float | None) -> float | None:
    """What is left of an operation's deadline, never below 0 (None: it has no deadline)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def time_left(deadline: float | None, name: str) -> float | None:
    """The timeout for an operation's next call: what is left of its deadline (None: the call's default).
    Raises DeadlineExceededError once nothing is left, rather than starting a call that cannot finish."""
    left = seconds_left(deadline)
    if left == 0.0:
        raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the operation's timeout passed before this call", name)
    return left


def call_span(name: str) -> Any:
    """The client span of one call (all its attempts), e.g. name "Searcher.Search"."""
    service, _, method = name.partition(".")
    return tracer.start_as_current_span(f"lookalike.v1.{service}/{method}", kind=trace.SpanKind.CLIENT,
                                        attributes={"rpc.system": "grpc", "rpc.service": f"lookalike.v1.{service}",
                                                    "rpc.method": method})


def call_with_retries(method: Callable[..., Response], request: Any, settings: ChannelSettings,
                      timeout: float | None = None, name: str = "") -> Response:
    """Calls a unary stub method with the settings' metadata, retrying UNAVAILABLE only.

    `timeout` (default settings.timeout) is the deadline for the whole call, retries included.
    """
    deadline = time.monotonic() + (timeout or settings.timeout)
    delays = backoff_delays(settings)
    with call_span(name) as span:
        for attempt in range(len(delays) + 1):
            span.set_attribute("lookalike.attempts", attempt + 1)
            try:
                return method(request, timeout=max(deadline - time.monotonic(), 0.001),
                              metadata=settings.call_metadata(name))
            except grpc.RpcError as error:
                time.sleep(_next_delay(error, attempt, delays, deadline, name))
    raise AssertionError("unreachable")


async def call_with_retries_async(method: Callable[..., Any], request: Any, settings: ChannelSettings,
                                  timeout: float | None = None, name: str = "") -> Any:
    """call_with_retries for grpc.aio stubs."""
    deadline = time.monotonic() + (timeout or settings.timeout)
    delays = backoff_delays(settings)
    with call_span(name) as span:
        for attempt in range(len(delays) + 1):
            span.set_attribute("lookalike.attempts", attempt + 1)
            try:
                return await method(request, timeout=max(deadline - time.monotonic(), 0.001),
                                    metadata=settings.call_metadata(name))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller's own cancellation goes on up
                # grpc.aio cancels the calls of a channel closed under them: an error of the call, not of the task
                raise library_error(grpc.StatusCode.CANCELLED, "the client was closed during the call", name) from None
            except grpc.RpcError as error:
                await asyncio.sleep(_next_delay(error, attempt, delays, deadline, name))
    raise AssertionError("unreachable")
