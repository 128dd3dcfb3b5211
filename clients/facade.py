"""The facade most callers need: index catalogue images and search with a shopper's photo.

`Lookalike` embeds with the embedder, then upserts to or searches the searcher, routing each search on
the category probabilities the embedder returned. `lookalike.client.aio.AsyncLookalike` has the same API.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from lookalike.client.connection import ChannelSettings, library_error, tracer
from lookalike.client.embedder_client import EmbeddedImage, EmbedderClient, ImageInput
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for
from lookalike.client.shard_map import ShardMapClient
from lookalike.client.sharded import ShardedSearcherClient
from lookalike.v1 import searcher_pb2

# "adaptive": probe shards by the embedder's probabilities; "top1": only the most probable category;
# "all": every shard; or a list of category names.
RoutingMode = Union[str, Sequence[str]]
UPSERT_BATCH = 500


@dataclass(frozen=True)
class Match:
    id: str
    score: float
    similarity: float
    category: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class ProbedShard:
    """What one probed shard did (the searcher's ShardProbe)."""

    category: str
    probability: float
    ef: int
    items: int
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    """The matches, best first, with what the embedder predicted and which shards were searched."""

    matches: list[Match]
    categories: list[tuple[str, float]]
    probes: list[ProbedShard]
    unknown_categories: list[str]
    embed_seconds: float
    search_seconds: float
    # Shards that could not be searched (every replica of their group unreachable): the matches are
    # then what the other groups found.
    missing_shards: list[str] = field(default_factory=list)


@dataclass
class IndexResult:
    """Ids stored, and (id, reason) for each image that was not."""

    indexed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def routing_request(mode: RoutingMode, embedded: EmbeddedImage, threshold: float, max_shards: int,
                    prior_weight: float) -> searcher_pb2.Routing:
    """The searcher routing for a facade routing mode and the query's embedding."""
    if isinstance(mode, str):
        if mode == "adaptive":
            return routing_for(probabilities=embedded.categories, threshold=threshold, max_shards=max_shards,
                               prior_weight=prior_weight)
        if mode == "top1":
            return routing_for(categories=[embedded.top_category])
        if mode == "all":
            return routing_for()
        raise ValueError(f"routing {mode!r}: expected 'adaptive', 'top1', 'all' or a list of categories")
    return routing_for(categories=list(mode))


def catalogue_items(embedded: Sequence[EmbeddedImage], model_id: str, categories: Sequence[str | None] | None,
                    attributes: Sequence[Mapping[str, str]] | None) -> tuple[list[CatalogueItem], IndexResult]:
    """Items to upsert for embedded images (category given, else predicted) and the images that failed."""
    items, result = [], IndexResult()
    for position, image in enumerate(embedded):
        if not image.ok:
            result.failed.append((image.id, f"{image.error_code.name}: {image.error}"))
            continue
        category = (categories[position] if categories is not None else None) or image.top_category
        items.append(CatalogueItem(image.id, category, image.vector, model_id,
                                   dict(attributes[position]) if attributes is not None else {}))
    return items, result


def record_upserts(items: Sequence[CatalogueItem], response: searcher_pb2.UpsertResponse, result: IndexResult) -> None:
    for item, status in zip(items, response.statuses):
        if status.code == 0:
            result.indexed.append(item.id)
        else:
            result.failed.append((item.id, status.message))


def search_result(embedded: EmbeddedImage, response: searcher_pb2.SearchResponse, embed_seconds: float,
                  search_seconds: float) -> SearchResult:
    return SearchResult(
        matches=[Match(h.id, h.score, h.similarity, h.category, dict(h.attributes)) for h in response.hits],
        categories=embedded.categories,
        probes=[ProbedShard(p.category, p.probability, p.ef, p.items, p.seconds) for p in response.probes],
        unknown_categories=list(response.unknown_categories),
        embed_seconds=embed_seconds, search_seconds=search_seconds, missing_shards=list(response.missing_shards))


class Lookalike:
    """Sync facade over an embedder and a searcher. Use as a context manager to close both channels."""

    def __init__(self, embedder: str | ChannelSettings, searcher: str | ChannelSettings | Sequence[str],
                 *, threshold: float = 0.0, max_shards: int = 0, prior_weight: float = 0.0,
                 shard_map: bool = False) -> None:
        """`searcher` is one target (one searcher, or replicas of one: ipv4:a,b or dns:///name); with
        `shard_map`, any searcher of replica groups that share a PostgreSQL store (the groups are found
        through their shard map, see lookalike.client.shard_map); or a list of searcher pods in
        StatefulSet ordinal order (sharded by category, see lookalike.client.sharded). threshold /
        max_shards 0 take the searcher's defaults; prior_weight 0 merges by cosine alone."""
        self.embedder = EmbedderClient(embedder)
        self.searcher: SearcherClient | ShardedSearcherClient | ShardMapClient
        if isinstance(searcher, (list, tuple)):
            self.searcher = ShardedSearcherClient(searcher)
        elif shard_map:
            self.searcher = ShardMapClient(searcher)
        else:
            self.searcher = SearcherClient(searcher)
        self.threshold, self.max_shards, self.prior_weight = threshold, max_shards, prior_weight
        self._model_id: str | None = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = self.embedder.model_info().model_id
        return self._model_id

    def index(self, images: Sequence[ImageInput], ids: Sequence[str], categories: Sequence[str | None] | None = None,
              attributes: Sequence[Mapping[str, str]] | None = None, timeout: float | None = None) -> IndexResult:
        """Embeds and stores images under `ids` (upserting: an existing id is replaced).

        Each image goes to its given category, or to the embedder's most probable one when none is given.
        """
        with tracer.start_as_current_span("Lookalike.index", attributes={"lookalike.images": len(images)}):
            embedded = self.embedder.embed(images, ids=ids, top_categories=1, timeout=timeout)
            items, result = catalogue_items(embedded, self.model_id, categories, attributes)
            for start in range(0, len(items), UPSERT_BATCH):
                batch = items[start:start + UPSERT_BATCH]
                record_upserts(batch, self.searcher.upsert(batch, timeout=timeout), result)
            return result

    def search(self, image: ImageInput, k: int = 10, routing: RoutingMode = "adaptive", ef: int = 0,
               timeout: float | None = None) -> SearchResult:
        """The k catalogue items most like `image`. Raises InvalidArgumentError for an unreadable image."""
        with tracer.start_as_current_span("Lookalike.search", attributes={"lookalike.k": k}):
            started = time.perf_counter()
            embedded = self.embedder.embed([image], ids=["query"], timeout=timeout)[0]
            if not embedded.ok:
                raise library_error(embedded.error_code, embedded.error, "Embedder.Embed")
            embedded_at = time.perf_counter()
            response = self.searcher.search(embedded.vector, self.model_id, k,
                                            routing_request(routing, embedded, self.threshold, self.max_shards,
                                                            self.prior_weight), ef=ef, timeout=timeout)
            return search_result(embedded, response, embedded_at - started, time.perf_counter() - embedded_at)

    def delete(self, ids: Sequence[str], timeout: float | None = None) -> searcher_pb2.DeleteResponse:
        return self.searcher.delete(ids, timeout=timeout)

    def close(self) -> None:
        self.embedder.close()
        self.searcher.close()

    def __enter__(self) -> "Lookalike":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
