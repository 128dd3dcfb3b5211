"""SearcherClient: upsert, delete and search catalogue items over gRPC."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lookalike.client.connection import ChannelSettings, call_with_retries
from lookalike.codec import pack_vector
from lookalike.routing import Routing
from lookalike.v1 import searcher_pb2, searcher_pb2_grpc


@dataclass(frozen=True)
class CatalogueItem:
    """One item to store: a unit vector from model `model_id`, in shard `category`."""

    id: str
    category: str
    vector: np.ndarray
    model_id: str
    attributes: dict[str, str] = field(default_factory=dict)

    def to_proto(self) -> searcher_pb2.Item:
        return searcher_pb2.Item(id=self.id, category=self.category, vector=pack_vector(self.vector),
                                 model_id=self.model_id, attributes=self.attributes)


def routing_for(categories: Sequence[str] | None = None,
                probabilities: Sequence[tuple[str, float]] | None = None, threshold: float = 0.0,
                max_shards: int = 0, prior_weight: float = 0.0) -> searcher_pb2.Routing:
    """Explicit categories, probability routing (as the embedder returns them), or all shards (neither)."""
    if categories is not None and probabilities is not None:
        raise ValueError("give categories or probabilities, not both")
    if categories is not None:
        return Routing.explicit(categories).to_message()
    if probabilities is not None:
        return Routing.by_probability(probabilities, threshold, max_shards, prior_weight).to_message()
    return Routing.all_shards().to_message()


def search_request(vector: np.ndarray, model_id: str, k: int, routing: searcher_pb2.Routing | None,
                   ef: int) -> searcher_pb2.SearchRequest:
    return searcher_pb2.SearchRequest(vector=pack_vector(vector), model_id=model_id, k=k, ef=ef,
                                      routing=routing or routing_for())


class SearcherClient:
    """Synchronous client for the Searcher service. Use as a context manager to close the channel."""

    def __init__(self, target: str | ChannelSettings) -> None:
        self.settings = target if isinstance(target, ChannelSettings) else ChannelSettings(target)
        self.channel = self.settings.open()
        self.stub = searcher_pb2_grpc.SearcherStub(self.channel)

    def upsert(self, items: Sequence[CatalogueItem], timeout: float | None = None) -> searcher_pb2.UpsertResponse:
        """Stores items (one request; keep it under the server's max_batch). Each item gets its own status."""
        request = searcher_pb2.UpsertRequest(items=[item.to_proto() for item in items])
        return call_with_retries(self.stub.Upsert, request, self.settings, timeout, "Searcher.Upsert")

    def delete(self, ids: Sequence[str], timeout: float | None = None) -> searcher_pb2.DeleteResponse:
        return call_with_retries(self.stub.Delete, searcher_pb2.DeleteRequest(ids=list(ids)), self.settings, timeout,
                                 "Searcher.Delete")

    def search(self, vector: np.ndarray, model_id: str, k: int = 10, routing: searcher_pb2.Routing | None = None,
               ef: int = 0, timeout: float | None = None) -> searcher_pb2.SearchResponse:
        """The k nearest items; `routing` from routing_for(...) (default: all shards)."""
        return call_with_retries(self.stub.Search, search_request(vector, model_id, k, routing, ef), self.settings,
                                 timeout, "Searcher.Search")

    def stats(self, timeout: float | None = None) -> searcher_pb2.GetStatsResponse:
        return call_with_retries(self.stub.GetStats, searcher_pb2.GetStatsRequest(), self.settings, timeout,
                                 "Searcher.GetStats")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearcherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
