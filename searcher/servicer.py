"""The Searcher gRPC servicer: validates at the edge, converts, and delegates to the Catalogue."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import grpc
import numpy as np

from lookalike.codec import VectorError, unpack_vector
from lookalike.routing import MAX_PRIOR_WEIGHT, Routing
from lookalike.serving.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable, rpc_method
from lookalike.serving.tracing import annotate
from lookalike.v1 import common_pb2, searcher_pb2, searcher_pb2_grpc
from lookalike.searcher.catalogue import Catalogue, SearchOutcome, SearchQuery
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.filters import compile_filter, numeric_value
from lookalike.searcher.store import ItemWrite

MAX_KEY_BYTES = 256
# Categories one routing may name: a classifier's whole label set fits (product taxonomies run to thousands);
# checking and planning a list costs about 1.5 microseconds an entry under the interpreter lock.
MAX_ROUTING_CATEGORIES = 10_000


def unit_vector(vector: common_pb2.Vector, field: str, max_dimension: int) -> np.ndarray:
    """A Vector message as a unit-length float32 array, or InvalidArgument naming the field."""
    try:
        values = unpack_vector(vector, field)
    except VectorError as error:
        raise InvalidArgument(str(error)) from error
    if values.shape[0] > max_dimension:
        raise InvalidArgument(f"{field} has {values.shape[0]} values, limit is {max_dimension}")
    if not np.isfinite(values).all():
        raise InvalidArgument(f"{field} contains NaN or infinite values, expected finite float32 values")
    # In float64: the float32 norm of values near float32's limits overflows to inf (which would store zeros)
    # or underflows (which would store a vector short of unit length).
    wide = values.astype(np.float64)
    norm = math.sqrt(wide @ wide)
    if norm == 0.0:
        raise InvalidArgument(f"{field} is all zeros, expected a non-zero embedding")
    return (wide / norm).astype(np.float32)


def _once_each(categories: Sequence[str], field: str, suffix: str = "") -> None:
    """Refuses a routing list naming a category twice: each entry would probe its shard again."""
    seen: set[str] = set()
    for position, category in enumerate(categories):
        if category in seen:
            raise InvalidArgument(f"{field}[{position}]{suffix} repeats {category!r}, expected each category once")
        seen.add(category)


def _at_most(count: int, limit: int, field: str, per: str = "") -> None:
    """INVALID_ARGUMENT naming the field when it has more than `limit` entries."""
    if count > limit:
        raise InvalidArgument(f"{field} has {count} entries, limit is {limit}{per}")


def _key(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is empty, expected a non-empty string")
    return _optional_key(value, field)


def _optional_key(value: str, field: str) -> str:
    if len(value.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{field} is {len(value.encode())} bytes, limit is {MAX_KEY_BYTES}")
    if chr(0) in value:  # PostgreSQL's text cannot hold it: refused here for every store alike
        raise InvalidArgument(f"{field} contains a NUL character at {value.index(chr(0))}, expected text without it")
    return value


class SearcherServicer(searcher_pb2_grpc.SearcherServicer):
    """Registered before the catalogue loads (so health answers during loading); RPCs wait for `attach`."""

    def __init__(self, config: SearcherConfig) -> None:
        self._config = config
        self._numeric = config.numeric_attribute_names
        self._catalogue: Catalogue | None = None

    def attach(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    @property
    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            raise Unavailable("the searcher is still loading its shards; retry shortly")
        return self._catalogue

    def _check_batch(self, count: int, field: str) -> None:
        if count == 0:
            raise InvalidArgument(f"{field} is empty, expected at least one")
        _at_most(count, self._config.max_batch, field, " per request")

    def _attributes(self, attributes: Mapping[str, str], field: str) -> dict[str, str]:
        _at_most(len(attributes), self._config.max_attributes, field)
        if "" in attributes:  # a filter cannot name it, so it could never be filtered on
            raise InvalidArgument(f"{field} has an empty attribute name, expected a non-empty name")
        size = sum(len(key.encode()) + len(value.encode()) for key, value in attributes.items())
        if size > self._config.max_attribute_bytes:
            raise InvalidArgument(f"{field} holds {size} bytes of keys and values, limit is "
                                  f"{self._config.max_attribute_bytes}")
        for name in self._numeric & attributes.keys():
            numeric_value(attributes[name], f"{field}[{name!r}]")
        return dict(attributes)

    @rpc_method
    def Upsert(self, request: searcher_pb2.UpsertRequest, context: grpc.ServicerContext) -> searcher_pb2.UpsertResponse:
        catalogue = self.catalogue
        self._check_batch(len(request.items), "items")
        _at_most(len(request.replace_products), self._config.max_batch, "replace_products", " per request")
        replace_products = [_key(product, f"replace_products[{n}]")
                            for n, product in enumerate(request.replace_products)]
        statuses: list[common_pb2.ItemStatus | None] = []
        valid, positions = [], []
        for position, item in enumerate(request.items):
            field = f"items[{position}]"
            try:
                valid.append(ItemWrite(id=_key(item.id, f"{field}.id"), category=_key(item.category, f"{field}.category"),
                                       vector=unit_vector(item.vector, f"{field}.vector", self._config.max_dimension),
                                       attributes=self._attributes(item.attributes, f"{field}.attributes"),
                                       model_id=_key(item.model_id, f"{field}.model_id"),
                                       product=_optional_key(item.product, f"{field}.product")))
                positions.append(position)
                statuses.append(None)
            except ServiceError as error:
                statuses.append(common_pb2.ItemStatus(code=error.code.value[0], message=str(error)))
        # A refused item's stored photo is not one the request leaves out: replace_products keeps it.
        refused_ids = [item.id for item, status in zip(request.items, statuses) if status is not None]
        outcomes, seq = (catalogue.upsert(valid, [f"items[{p}]" for p in positions], replace_products, refused_ids)
                         if valid or replace_products else ([], catalogue.applied_seq))
        for position, outcome in zip(positions, outcomes):
            error = outcome.error
            statuses[position] = (common_pb2.ItemStatus(code=error.code.value[0], message=str(error))
                                  if isinstance(error, ServiceError) else common_pb2.ItemStatus(code=0))
        annotate(lambda: {"items": len(request.items), "rejected_items": sum(status.code != 0 for status in statuses)})
        return searcher_pb2.UpsertResponse(statuses=statuses, sequence=seq)

    @rpc_method
    def Delete(self, request: searcher_pb2.DeleteRequest, context: grpc.ServicerContext) -> searcher_pb2.DeleteResponse:
        catalogue = self.catalogue
        if not request.ids and not request.products:
            raise InvalidArgument("ids and products are both empty, expected at least one id or product")
        for field, values in (("ids", request.ids), ("products", request.products)):
            _at_most(len(values), self._config.max_batch, field, " per request")
        ids = [_key(item_id, f"ids[{position}]") for position, item_id in enumerate(request.ids)]
        products = [_key(product, f"products[{position}]") for position, product in enumerate(request.products)]
        deleted, missing, seq = catalogue.delete(ids, products)
        annotate(lambda: {"ids": len(ids), "deleted": deleted})
        return searcher_pb2.DeleteResponse(deleted=deleted, missing=missing, sequence=seq)

    @rpc_method
    def Search(self, request: searcher_pb2.SearchRequest, context: grpc.ServicerContext) -> searcher_pb2.SearchResponse:
        outcome = self.catalogue.search(self._query(request))
        annotate(lambda: {"k": request.k, "hits": len(outcome.hits), "shards_probed": len(outcome.probes),
                          "shard_categories": [probe.category for probe in outcome.probes],
                          "shard_seconds": [probe.seconds for probe in outcome.probes],
                          "shard_ef": [probe.ef for probe in outcome.probes]})
        response = searcher_pb2.SearchResponse()
        _fill_search_response(response, outcome)
        self._check_answer_size(response, "k, or the attributes stored with the items")
        return response

    @rpc_method
    def SearchBatch(self, request: searcher_pb2.SearchBatchRequest,
                    context: grpc.ServicerContext) -> searcher_pb2.SearchBatchResponse:
        catalogue = self.catalogue
        count = len(request.queries)
        if not 1 <= count <= self._config.max_batch_queries:
            raise InvalidArgument(f"queries has {count} entries, expected 1 to {self._config.max_batch_queries}")
        checked: list[SearchQuery | ServiceError] = []
        for position, query in enumerate(request.queries):
            try:
                checked.append(self._query(query, f"queries[{position}]."))
            except ServiceError as error:
                checked.append(error)
        valid = [query for query in checked if isinstance(query, SearchQuery)]
        found = iter(catalogue.search_many(valid))
        response = searcher_pb2.SearchBatchResponse()
        for position, query in enumerate(checked):
            result = response.results.add()
            if isinstance(query, ServiceError):
                result.status.CopyFrom(common_pb2.ItemStatus(code=query.code.value[0], message=str(query)))
                continue
            outcome = next(found)
            if isinstance(outcome, ServiceError):  # the catalogue's errors name the field, not the query
                result.status.CopyFrom(common_pb2.ItemStatus(code=outcome.code.value[0],
                                                              message=f"queries[{position}].{outcome}"))
            else:
                _fill_search_response(result.response, outcome)
        annotate(lambda: {"queries": count,
                          "failed_queries": sum(result.status.code != 0 for result in response.results)})
        self._check_answer_size(response, "queries per call, their k, or the attributes stored with the items")
        return response

    def _check_answer_size(self, response: searcher_pb2.SearchResponse | searcher_pb2.SearchBatchResponse,
                           smaller: str) -> None:
        """RESOURCE_EXHAUSTED saying what to ask less of, rather than gRPC's own refusal to send it."""
        size = response.ByteSize()
        if size > self._config.max_message_bytes:
            raise ResourceExhausted(f"the answer holds {size} bytes, over this searcher's {self._config.max_message_bytes}"
                                    f"-byte message limit: ask for fewer {smaller}")

    def _query(self, request: searcher_pb2.SearchRequest, at: str = "") -> SearchQuery:
        """The validated query; `at` prefixes field names in errors (queries[3]. in a batch)."""
        if not 1 <= request.k <= self._config.max_k:
            raise InvalidArgument(f"{at}k is {request.k}, expected 1 to {self._config.max_k}")
        if request.ef > 10 * self._config.max_k:
            raise InvalidArgument(f"{at}ef is {request.ef}, expected at most {10 * self._config.max_k}")
        vector = unit_vector(request.vector, f"{at}vector", self._config.max_dimension)
        model_id = _key(request.model_id, f"{at}model_id")
        mode = request.routing.WhichOneof("mode") if request.HasField("routing") else None
        if request.HasField("routing") and mode is None:
            raise InvalidArgument(f"{at}routing has no mode, expected one of all, explicit or probabilities (a mode "
                                  "this searcher does not know, from a newer client?)")
        if mode == "explicit":
            categories = request.routing.explicit.categories
            field = f"{at}routing.explicit.categories"
            if not categories:
                raise InvalidArgument(f"{field} is empty, expected at least one category")
            _at_most(len(categories), MAX_ROUTING_CATEGORIES, field)
            for position, category in enumerate(categories):
                _key(category, f"{field}[{position}]")
            _once_each(categories, field)
        if mode == "probabilities":
            routing = request.routing.probabilities
            field = f"{at}routing.probabilities"
            if not routing.categories:
                raise InvalidArgument(f"{field}.categories is empty, expected the embedder's category probabilities")
            _at_most(len(routing.categories), MAX_ROUTING_CATEGORIES, f"{field}.categories")
            for position, entry in enumerate(routing.categories):
                _key(entry.category, f"{field}.categories[{position}].category")
            _once_each([entry.category for entry in routing.categories], f"{field}.categories", ".category")
            for position, entry in enumerate(routing.categories):
                if not (math.isfinite(entry.probability) and 0.0 <= entry.probability <= 1.0):
                    raise InvalidArgument(f"{field}.categories[{position}].probability is {entry.probability}, "
                                          "expected a value in [0, 1]")
            if not (math.isfinite(routing.threshold) and 0.0 <= routing.threshold <= 1.0):
                raise InvalidArgument(f"{field}.threshold is {routing.threshold}, expected a value in (0, 1], or 0 "
                                      "for the server default")
            if not (math.isfinite(routing.prior_weight) and 0 <= routing.prior_weight <= MAX_PRIOR_WEIGHT):
                raise InvalidArgument(f"{field}.prior_weight is {routing.prior_weight}, expected 0 to {MAX_PRIOR_WEIGHT}")
        return SearchQuery(vector=vector, model_id=model_id, k=request.k, ef=request.ef,
                           routing=Routing.from_message(request.routing if mode else None),
                           where=compile_filter(request.filter, self._numeric, f"{at}filter"),
                           distinct_products=request.distinct_products)

    @rpc_method
    def GetStats(self, request: searcher_pb2.GetStatsRequest, context: grpc.ServicerContext) -> searcher_pb2.GetStatsResponse:
        stats = self.catalogue.stats()
        return searcher_pb2.GetStatsResponse(shards=[searcher_pb2.ShardStats(**row) for row in stats.shards],
                                             items=stats.items, sequence=stats.applied_sequence,
                                             store_sequence=stats.store_sequence, lag_seconds=stats.lag_seconds,
                                             routing_defaults=self.catalogue.routing.to_message(),
                                             limits=searcher_pb2.RequestLimits(
                                                 max_batch=self._config.max_batch,
                                                 max_batch_queries=self._config.max_batch_queries,
                                                 max_k=self._config.max_k,
                                                 max_message_bytes=self._config.max_message_bytes))

    @rpc_method
    def GetShardMap(self, request: searcher_pb2.GetShardMapRequest,
                    context: grpc.ServicerContext) -> searcher_pb2.GetShardMapResponse:
        catalogue = self.catalogue
        groups, placements, locks = catalogue.shard_map()
        response = searcher_pb2.GetShardMapResponse(group=catalogue.group, sequence=catalogue.applied_seq,
                                                    routing_defaults=catalogue.routing.to_message())
        for name, target, live in groups:
            response.groups.add(name=name, target=target, live_replicas=live)
        for placement in placements:
            model_id, dimension = locks.get(placement.category, ("", 0))
            response.placements.add(category=placement.category, group=placement.group, moving_to=placement.moving_to,
                                    model_id=model_id, dimension=dimension, part=placement.part,
                                    parts=placement.parts, building=placement.building)
        return response

    @rpc_method
    def MoveCategory(self, request: searcher_pb2.MoveCategoryRequest,
                     context: grpc.ServicerContext) -> searcher_pb2.MoveCategoryResponse:
        placement = self.catalogue.move(_key(request.category, "category"), _key(request.group, "group"))
        return searcher_pb2.MoveCategoryResponse(placement=searcher_pb2.Placement(
            category=request.category, group=placement.group, moving_to=placement.moving_to, part=placement.part,
            parts=placement.parts))


def _fill_search_response(response: searcher_pb2.SearchResponse, outcome: SearchOutcome) -> None:
    response.unknown_categories.extend(outcome.unknown_categories)
    add_hit = response.hits.add
    for hit in outcome.hits:
        # Fields left at their defaults are not passed: an empty map or string given by keyword still costs
        # its conversion, and most hits have no attributes, product or product_matches (2.5x less time).
        message = add_hit(id=hit.id, score=hit.score, similarity=hit.similarity, category=hit.category)
        if hit.attributes:
            message.attributes.update(hit.attributes)
        if hit.product:
            message.product = hit.product
        if hit.product_matches:
            message.product_matches = hit.product_matches
    for probe in outcome.probes:
        response.probes.add(category=probe.category, probability=probe.probability, k=probe.k, ef=probe.ef,
                            items=probe.items, seconds=probe.seconds, part=probe.part, parts=probe.parts,
                            filter_matches=probe.filter_matches, filter_exact=probe.filter_exact)
