"""The facade most callers need: index catalogue images and search with a shopper's photo.

`Lookalike` embeds with the embedder, then upserts to or searches the searcher, routing each search on
the category probabilities the embedder returned. `lookalike.client.aio.AsyncLookalike` has the same methods
for asyncio, over one searcher target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence, Union

from lookalike.client.connection import (ChannelSettings, LookalikeError, deadline_after, library_error, time_left,
                                         tracer)
from lookalike.client.embedder_client import (EmbeddedImage, EmbedderClient, ImageInput, check_entries,
                                              check_one_per_image)
from lookalike.client.searcher_client import (CatalogueItem, FilterInput, SearcherClient, as_filter, fitted,
                                              routing_for, search_request)
from lookalike.client.shard_map import ShardMapClient
from lookalike.client.sharded import ShardedSearcherClient
from lookalike.routing import model_routing
from lookalike.v1 import embedder_pb2, searcher_pb2

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
    product: str = ""
    # With distinct_products: how many of the product's photos were among the candidates.
    product_matches: int = 0


@dataclass(frozen=True)
class ProbedShard:
    """What one probed shard did (the searcher's ShardProbe)."""

    category: str
    probability: float
    ef: int
    items: int
    seconds: float
    # With a filter: the shard's items that passed it, and whether they were searched exactly.
    filter_matches: int = 0
    filter_exact: bool = False


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
    # For a model that crops faces: the face embedded, (left, top, right, bottom) in the photo's pixels.
    face: tuple[int, int, int, int] | None = None


@dataclass
class IndexResult:
    """Ids stored, and (id, reason) for each image that was not."""

    indexed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def routing_request(mode: RoutingMode, embedded: EmbeddedImage, threshold: float, max_shards: int,
                    prior_weight: float | None) -> searcher_pb2.Routing:
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


def check_catalogue_fields(images: Sequence[ImageInput], categories: Sequence[str | None] | None,
                           attributes: Sequence[Mapping[str, str]] | None, products: Sequence[str] | None) -> None:
    """Refuses per-image lists index cannot store, before anything is sent: found while building a later upsert
    batch, a bad entry stopped the run after earlier batches were stored. ids are checked by embed."""
    check_one_per_image(images, categories=categories, attributes=attributes, products=products)
    check_entries("categories", categories, (str, type(None)), "a category name or None (predicted)")
    check_entries("attributes", attributes, Mapping, "a mapping of str to str")
    check_entries("products", products, str, "a product key (str)")
    for position, mapping in enumerate(attributes or ()):
        for key, value in mapping.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"attributes[{position}] has {key!r}: {value!r}, expected str keys and values")


def catalogue_items(embedded: Sequence[EmbeddedImage], model_id: str, categories: Sequence[str | None] | None,
                    attributes: Sequence[Mapping[str, str]] | None,
                    products: Sequence[str] | None = None) -> tuple[list[CatalogueItem], IndexResult]:
    """Items to upsert for embedded images (category given, else predicted) and the images that failed."""
    items, result = [], IndexResult()
    for position, image in enumerate(embedded):
        if not image.ok:
            result.failed.append((image.id, f"{image.error_code.name}: {image.error}"))
            continue
        category = (categories[position] if categories is not None else None) or image.top_category
        items.append(CatalogueItem(image.id, category, image.vector, model_id,
                                   dict(attributes[position]) if attributes is not None else {},
                                   products[position] if products is not None else ""))
    return items, result


def refused_products(embedded: Sequence[EmbeddedImage], products: Sequence[str] | None) -> set[str]:
    """The products with a photo the embedder refused: replacing them would remove that photo's stored version."""
    if products is None:
        return set()
    return {product for image, product in zip(embedded, products) if product and not image.ok}


def upsert_batches(items: Sequence[CatalogueItem], replace: bool, not_replaced: Collection[str] = (),
                   size: int = UPSERT_BATCH) -> list[tuple[list[CatalogueItem], list[str]]]:
    """Items in batches of `size` (UPSERT_BATCH, or the searcher's max_batch when lower), each with the products
    it replaces. With `replace`, all the items of a replaced product travel in the batch that replaces it: a
    later batch's photos of it would be removed by the first one's replace, and lost if then refused or if the
    run stopped in between. A product with more photos than a batch gets a larger batch of its own (the
    searcher's max_batch bounds it). Products in `not_replaced` are stored without removing anything, split like
    other items."""
    # Keyed by product for a replaced product's items, by position for any other: an int never equals a product.
    units: dict[str | int, list[CatalogueItem]] = {}
    for position, item in enumerate(items):
        replaced = replace and item.product and item.product not in not_replaced
        units.setdefault(item.product if replaced else position, []).append(item)
    batches: list[tuple[list[CatalogueItem], list[str]]] = []
    for key, unit in units.items():
        if not batches or len(batches[-1][0]) + len(unit) > size:
            batches.append(([], []))
        batches[-1][0].extend(unit)
        if isinstance(key, str):
            batches[-1][1].append(key)
    return batches


def record_upserts(items: Sequence[CatalogueItem], response: searcher_pb2.UpsertResponse, result: IndexResult) -> None:
    for item, status in zip(items, response.statuses):
        if status.code == 0:
            result.indexed.append(item.id)
        else:
            result.failed.append((item.id, status.message))


def batch_search_result(embedded: EmbeddedImage, answer: searcher_pb2.SearchResponse | LookalikeError | None,
                        embed_seconds: float, search_seconds: float) -> SearchResult | LookalikeError:
    """One photo's outcome in a batch: its result, or the embedder's or the searcher's error for it."""
    if not embedded.ok:
        return library_error(embedded.error_code, embedded.error, "Embedder.Embed")
    if isinstance(answer, LookalikeError):
        return answer
    assert answer is not None
    return search_result(embedded, answer, embed_seconds, search_seconds)


def search_result(embedded: EmbeddedImage, response: searcher_pb2.SearchResponse, embed_seconds: float,
                  search_seconds: float) -> SearchResult:
    return SearchResult(
        matches=[Match(h.id, h.score, h.similarity, h.category, dict(h.attributes), h.product, h.product_matches)
                 for h in response.hits],
        categories=embedded.categories,
        probes=[ProbedShard(p.category, p.probability, p.ef, p.items, p.seconds, p.filter_matches, p.filter_exact)
                for p in response.probes],
        unknown_categories=list(response.unknown_categories),
        embed_seconds=embed_seconds, search_seconds=search_seconds, missing_shards=list(response.missing_shards),
        face=embedded.face)


def searcher_target(text: str) -> str | list[str]:
    """The `searcher` argument of Lookalike from the text a person gives as --searcher: one address; replicas
    of one searcher as a gRPC target (ipv4:a,b or dns:///name), whose commas gRPC itself reads; or
    comma-separated pod addresses in StatefulSet ordinal order (sharded by category)."""
    if text.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        return text
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--searcher is {text!r}, expected host:port, ipv4:a:1,b:2, dns:///name:port or "
                         "comma-separated pod addresses")
    return targets if len(targets) > 1 else targets[0]


class Lookalike:
    """Sync facade over an embedder and a searcher. Use as a context manager to close both channels."""

    def __init__(self, embedder: str | ChannelSettings, searcher: str | ChannelSettings | Sequence[str],
                 *, threshold: float | None = None, max_shards: int | None = None,
                 prior_weight: float | None = None, shard_map: bool = False) -> None:
        """`searcher` is one target (one searcher, or replicas of one: ipv4:a,b or dns:///name); with
        `shard_map`, any searcher of replica groups that share a PostgreSQL store (the groups are found
        through their shard map, see lookalike.client.shard_map); or a list of searcher pods in
        StatefulSet ordinal order (sharded by category, see lookalike.client.sharded). Adaptive routing
        covers `threshold` of the probability with at most `max_shards` shards and merges by cosine +
        prior_weight * ln p (0: cosine alone); each left None is the model's value fitted on validation at
        export (its manifest), or the searcher's default for a model without one."""
        self.embedder = EmbedderClient(embedder)
        self.searcher: SearcherClient | ShardedSearcherClient | ShardMapClient
        try:
            if isinstance(searcher, (list, tuple)):
                self.searcher = ShardedSearcherClient(searcher)
            elif shard_map:
                self.searcher = ShardMapClient(searcher)
            else:
                self.searcher = SearcherClient(searcher)
        except BaseException:
            self.embedder.close()  # the caller gets no Lookalike to close it through
            raise
        self._given_routing = (threshold, max_shards, prior_weight)
        self._model: embedder_pb2.GetModelInfoResponse | None = None

    def model_info(self, timeout: float | None = None) -> embedder_pb2.GetModelInfoResponse:
        """The served model (asked once): id, manifest, limits."""
        if self._model is None:
            self._model = self.embedder.model_info(timeout)
        return self._model

    def _model_within(self, deadline: float | None) -> embedder_pb2.GetModelInfoResponse:
        """model_info() inside an operation's deadline: time is asked of it only while the model is unread."""
        return self._model or self.model_info(time_left(deadline, "Embedder.GetModelInfo"))

    @property
    def model_id(self) -> str:
        return self.model_info().model_id

    @property
    def routing(self) -> tuple[float, int, float | None]:
        """(threshold, max_shards, prior_weight) adaptive searches send (see __init__)."""
        return model_routing(self.model_info().manifest, *self._given_routing)

    def index(self, images: Sequence[ImageInput], ids: Sequence[str], categories: Sequence[str | None] | None = None,
              attributes: Sequence[Mapping[str, str]] | None = None, timeout: float | None = None,
              products: Sequence[str] | None = None, replace_products: bool = False) -> IndexResult:
        """Embeds and stores images under `ids` (upserting: an existing id is replaced).

        Each image goes to its given category, or to the embedder's most probable one when none is given.
        `products` gives each image's product key; with `replace_products`, these images become all the
        photos of their products (the products' other stored photos are removed). A product with a photo
        the embedder refused is not replaced: its other photos are stored and nothing of it is removed.
        `timeout` bounds all of it, as in every method here: each call gets what is left.
        """
        deadline = deadline_after(timeout)
        check_catalogue_fields(images, categories, attributes, products)
        with tracer.start_as_current_span("Lookalike.index", attributes={"lookalike.images": len(images)}):
            embedded = self.embedder.embed(images, ids=ids, top_categories=1,
                                           timeout=time_left(deadline, "Embedder.Embed"))
            model_id = self._model_within(deadline).model_id
            items, result = catalogue_items(embedded, model_id, categories, attributes, products)
            size = fitted(self.searcher.limits(time_left(deadline, "Searcher.GetStats")).max_batch, UPSERT_BATCH)
            for batch, replaced in upsert_batches(items, replace_products, refused_products(embedded, products), size):
                record_upserts(batch, self.searcher.upsert(batch, time_left(deadline, "Searcher.Upsert"), replaced),
                               result)
            return result

    def search(self, image: ImageInput, k: int = 10, routing: RoutingMode = "adaptive", ef: int = 0,
               timeout: float | None = None, filter: FilterInput = None,
               distinct_products: bool = False) -> SearchResult:
        """The k catalogue items (or distinct products) most like `image` that pass `filter` (a Filter
        message or its text, see lookalike.filter_text). Raises InvalidArgumentError for an unreadable image
        or a filter text that does not parse."""
        deadline = deadline_after(timeout)
        with tracer.start_as_current_span("Lookalike.search", attributes={"lookalike.k": k}):
            started = time.perf_counter()
            query_filter = as_filter(filter)  # a bad filter is refused before the photo is embedded for nothing
            embedded = self.embedder.embed([image], ids=["query"], timeout=time_left(deadline, "Embedder.Embed"))[0]
            if not embedded.ok:
                raise library_error(embedded.error_code, embedded.error, "Embedder.Embed")
            embedded_at = time.perf_counter()
            model = self._model_within(deadline)
            response = self.searcher.search(embedded.vector, model.model_id, k,
                                            routing_request(routing, embedded, *self.routing), ef,
                                            time_left(deadline, "Searcher.Search"), query_filter, distinct_products)
            return search_result(embedded, response, embedded_at - started, time.perf_counter() - embedded_at)

    def search_batch(self, images: Sequence[ImageInput], k: int = 10, routing: RoutingMode = "adaptive", ef: int = 0,
                     timeout: float | None = None, filter: FilterInput = None,
                     distinct_products: bool = False) -> list[SearchResult | LookalikeError]:
        """search() for many photos in one round trip per service (one Embed call per embedder request limit,
        one SearchBatch per 256 queries, or per the searcher's lower max_batch_queries): a result per photo, in
        order, or the error for that photo."""
        deadline = deadline_after(timeout)
        with tracer.start_as_current_span("Lookalike.search_batch", attributes={"lookalike.images": len(images)}):
            started = time.perf_counter()
            query_filter = as_filter(filter)  # a bad filter is refused before the photos are embedded for nothing
            embedded = self.embedder.embed(images, ids=[str(n) for n in range(len(images))],
                                           timeout=time_left(deadline, "Embedder.Embed"))
            embedded_at = time.perf_counter()
            model_id = self._model_within(deadline).model_id
            requests = [search_request(e.vector, model_id, k, routing_request(routing, e, *self.routing), ef,
                                       query_filter, distinct_products) for e in embedded if e.ok]
            answers = iter(self.searcher.search_batch(requests, time_left(deadline, "Searcher.SearchBatch"))
                           if requests else [])
            finished = time.perf_counter()
            return [batch_search_result(e, next(answers) if e.ok else None, embedded_at - started,
                                        finished - embedded_at) for e in embedded]

    def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
               products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        """Removes items by id, and products with all their photos."""
        return self.searcher.delete(ids, timeout, products)

    def close(self) -> None:
        self.embedder.close()
        self.searcher.close()

    def __enter__(self) -> "Lookalike":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
