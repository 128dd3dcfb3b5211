"""SearcherClient: upsert, delete and search catalogue items over gRPC."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import grpc
import numpy as np

from lookalike.client.connection import (ChannelSettings, LookalikeError, call_with_retries, channel_settings,
                                         deadline_after, library_error, status_code, time_left)
from lookalike.codec import pack_vector
from lookalike.filter_text import parse_filter
from lookalike.routing import Routing
from lookalike.v1 import searcher_pb2, searcher_pb2_grpc

# A filter as the message, or as text: 'in_stock = "true" AND brand IN ("a", "b") AND price <= 50'.
FilterInput = Union[searcher_pb2.Filter, str, None]
# Queries per SearchBatch call (the searcher's default max_batch_queries, or its reported limit when lower);
# longer batches are split.
BATCH_QUERIES = 256


def fitted(limit: int, default: int) -> int:
    """A batch size within a searcher's reported limit (0: an older searcher that reports none)."""
    return min(limit, default) if limit else default


def tightest(limits: Iterable[searcher_pb2.RequestLimits]) -> searcher_pb2.RequestLimits:
    """Each limit at its lowest over several searchers, those that report none left out."""
    merged = searcher_pb2.RequestLimits()
    for one in limits:
        for field_name in (descriptor.name for descriptor in searcher_pb2.RequestLimits.DESCRIPTOR.fields):
            value = getattr(one, field_name)
            if value and (not getattr(merged, field_name) or value < getattr(merged, field_name)):
                setattr(merged, field_name, value)
    return merged


@dataclass(frozen=True)
class CatalogueItem:
    """One item to store: a unit vector from model `model_id`, in shard `category`."""

    id: str
    category: str
    vector: np.ndarray
    model_id: str
    attributes: dict[str, str] = field(default_factory=dict)
    # Product key shared by the photos of one product; empty: a product of its own.
    product: str = ""

    def to_proto(self) -> searcher_pb2.Item:
        return searcher_pb2.Item(id=self.id, category=self.category, vector=pack_vector(self.vector),
                                 model_id=self.model_id, attributes=self.attributes, product=self.product)


def routing_for(categories: Sequence[str] | None = None,
                probabilities: Sequence[tuple[str, float]] | None = None, threshold: float = 0.0,
                max_shards: int = 0, prior_weight: float | None = None) -> searcher_pb2.Routing:
    """Explicit categories, probability routing (as the embedder returns them), or all shards (neither).
    threshold and max_shards 0, and prior_weight None, take the searcher's defaults."""
    if categories is not None and probabilities is not None:
        raise ValueError("give categories or probabilities, not both")
    if categories is not None:
        return Routing.explicit(categories).to_message()
    if probabilities is not None:
        return Routing.by_probability(probabilities, threshold, max_shards, prior_weight).to_message()
    return Routing.all_shards().to_message()


def as_filter(value: FilterInput) -> searcher_pb2.Filter | None:
    """A filter message from a message or its text form (lookalike.filter_text); None for no filter.
    InvalidArgumentError for text that is not a filter, as the searcher answers a filter it refuses."""
    if not value:
        return None
    if not isinstance(value, str):
        return value
    try:
        return parse_filter(value)
    except ValueError as error:
        raise library_error(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


def search_request(vector: np.ndarray, model_id: str, k: int, routing: searcher_pb2.Routing | None, ef: int,
                   filter: FilterInput = None, distinct_products: bool = False) -> searcher_pb2.SearchRequest:
    return searcher_pb2.SearchRequest(vector=pack_vector(vector), model_id=model_id, k=k, ef=ef,
                                      routing=routing or routing_for(), filter=as_filter(filter),
                                      distinct_products=distinct_products)


def search_batch_requests(requests: Sequence[searcher_pb2.SearchRequest],
                          size: int = BATCH_QUERIES) -> list[searcher_pb2.SearchBatchRequest]:
    """SearchBatch requests carrying `requests` in order, at most `size` each."""
    return [searcher_pb2.SearchBatchRequest(queries=requests[start:start + size])
            for start in range(0, len(requests), size)]


def batch_result(result: searcher_pb2.SearchBatchResult) -> searcher_pb2.SearchResponse | LookalikeError:
    """One query's answer from a SearchBatch, or the library's error for its status."""
    if result.status.code:
        return library_error(status_code(result.status.code), result.status.message, "Searcher.SearchBatch")
    return result.response


class SearcherClient:
    """Synchronous client for the Searcher service. Use as a context manager to close the channel."""

    def __init__(self, target: str | ChannelSettings) -> None:
        self.settings = channel_settings(target)
        self.channel = self.settings.open()
        self.stub = searcher_pb2_grpc.SearcherStub(self.channel)
        self._limits: searcher_pb2.RequestLimits | None = None

    def limits(self, timeout: float | None = None) -> searcher_pb2.RequestLimits:
        """The searcher's request limits (GetStats reports them), read once."""
        if self._limits is None:
            self._limits = self.stats(timeout).limits
        return self._limits

    def upsert(self, items: Sequence[CatalogueItem], timeout: float | None = None,
               replace_products: Sequence[str] = ()) -> searcher_pb2.UpsertResponse:
        """Stores items (one request; keep it under the server's max_batch). Each item gets its own status.
        The stored photos of `replace_products` that `items` does not carry are removed in the same write."""
        request = searcher_pb2.UpsertRequest(items=[item.to_proto() for item in items],
                                             replace_products=list(replace_products))
        return call_with_retries(self.stub.Upsert, request, self.settings, timeout, "Searcher.Upsert")

    def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
               products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        """Removes items by id, and products with all their photos."""
        return call_with_retries(self.stub.Delete, searcher_pb2.DeleteRequest(ids=list(ids), products=list(products)),
                                 self.settings, timeout, "Searcher.Delete")

    def search(self, vector: np.ndarray, model_id: str, k: int = 10, routing: searcher_pb2.Routing | None = None,
               ef: int = 0, timeout: float | None = None, filter: FilterInput = None,
               distinct_products: bool = False) -> searcher_pb2.SearchResponse:
        """The k nearest items (or products); `routing` from routing_for(...) (default: all shards)."""
        return call_with_retries(self.stub.Search, search_request(vector, model_id, k, routing, ef, filter,
                                                                  distinct_products),
                                 self.settings, timeout, "Searcher.Search")

    def search_batch(self, requests: Sequence[searcher_pb2.SearchRequest],
                     timeout: float | None = None) -> list[searcher_pb2.SearchResponse | LookalikeError]:
        """Many searches (from search_request), BATCH_QUERIES per call or the searcher's lower limit; each answer,
        or its error, in order. `timeout` bounds all the calls."""
        deadline = deadline_after(timeout)
        answers: list[searcher_pb2.SearchResponse | LookalikeError] = []
        limits = self._limits or self.limits(time_left(deadline, "Searcher.GetStats"))
        size = fitted(limits.max_batch_queries, BATCH_QUERIES)
        for request in search_batch_requests(requests, size):
            response = call_with_retries(self.stub.SearchBatch, request, self.settings,
                                         time_left(deadline, "Searcher.SearchBatch"), "Searcher.SearchBatch")
            answers.extend(batch_result(result) for result in response.results)
        return answers

    def stats(self, timeout: float | None = None) -> searcher_pb2.GetStatsResponse:
        return call_with_retries(self.stub.GetStats, searcher_pb2.GetStatsRequest(), self.settings, timeout,
                                 "Searcher.GetStats")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearcherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
