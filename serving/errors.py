"""Domain errors that carry their gRPC status, and the one place that turns them into statuses.

Free of health, reflection and Prometheus imports, so code shared with the exporter (image decoding)
can raise them with only grpcio installed.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import grpc

log = logging.getLogger(__name__)

Method = TypeVar("Method", bound=Callable[..., Any])


class ServiceError(Exception):
    """A failure the caller can act on; carries the gRPC status code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def rpc_method(method: Method) -> Method:
    """Maps ServiceError to its status and anything else to INTERNAL (logged with its traceback).

    The one place where servicer exceptions become gRPC statuses.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ServiceError as error:
            context.abort(error.code, str(error))
        except Exception as error:  # noqa: BLE001 - the server must keep serving
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {type(error).__name__}")

    return wrapper  # type: ignore[return-value]


class _Undecodable:
    """What a request's bytes decoded to when they are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class UndecodableRequestInterceptor(grpc.ServerInterceptor):
    """Answers a request whose bytes are not a valid message (broken wire format, a string that is not
    UTF-8) with INVALID_ARGUMENT; grpcio itself would answer INTERNAL, which means a server fault."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        decode, behaviour = handler.request_deserializer, handler.unary_unary
        method = handler_call_details.method

        def decode_or_keep_error(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError, and UnicodeDecodeError for text
                return _Undecodable(error)

        def refuse_undecodable(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request to {method} is not a valid message: {str(request.error)[:200]}")
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(refuse_undecodable, request_deserializer=decode_or_keep_error,
                                                   response_serializer=handler.response_serializer)
