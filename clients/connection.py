"""The one place that builds channels and makes calls: TLS, auth metadata, limits, deadlines, retries, errors."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import grpc

log = logging.getLogger(__name__)

Response = TypeVar("Response")


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach one service. Every call gets `timeout` seconds unless the call says otherwise."""

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Sent with every call, e.g. (("authorization", "Bearer ..."),).
    metadata: tuple[tuple[str, str], ...] = ()
    max_message_bytes: int = 64 * 1024 * 1024
    timeout: float = 30.0
    # Attempts after the first, on UNAVAILABLE only, with exponential backoff and full jitter.
    retries: int = 5
    backoff_initial: float = 0.1
    backoff_max: float = 3.0
    keepalive_seconds: int = 60

    def open(self) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_seconds * 1000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if self.tls:
            credentials = grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                                       self.certificate_chain)
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)


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


def as_library_error(error: grpc.RpcError, method: str = "") -> LookalikeError:
    """A grpc.RpcError as the library's exception for its status code."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return _ERRORS.get(code, LookalikeError)(code, details or "", method)


def backoff_delays(settings: ChannelSettings) -> list[float]:
    """Sleep before each retry: full jitter over an exponentially growing cap."""
    return [random.uniform(0, min(settings.backoff_max, settings.backoff_initial * 2 ** attempt))
            for attempt in range(settings.retries)]


def call_with_retries(method: Callable[..., Response], request: Any, settings: ChannelSettings,
                      timeout: float | None = None, name: str = "") -> Response:
    """Calls a unary stub method with a deadline and the settings' metadata, retrying UNAVAILABLE only."""
    delays = backoff_delays(settings)
    for attempt in range(len(delays) + 1):
        try:
            return method(request, timeout=timeout or settings.timeout, metadata=settings.metadata or None)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == len(delays):
                raise as_library_error(error, name) from None
            log.debug("%s unavailable (%s), retry %d in %.2fs", name, error.details(), attempt + 1, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")
