"""asyncio clients: the same API as the sync ones, for services written with asyncio."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from lookalike.client.connection import (ChannelSettings, LookalikeError, call_with_retries_async, channel_settings,
                                         deadline_after, library_error, time_left, tracer)
from lookalike.client.embedder_client import (EmbeddedImage, ImageInput, RequestLimits, check_embed_arguments,
                                              embed_plan)
from lookalike.client.facade import (UPSERT_BATCH, IndexResult, RoutingMode, SearchResult, batch_search_result,
                                     catalogue_items, check_catalogue_fields, record_upserts, refused_products,
                                     routing_request, search_result, upsert_batches)
from lookalike.client.searcher_client import (BATCH_QUERIES, CatalogueItem, FilterInput, as_filter, batch_result,
                                              fitted, search_batch_requests, search_request)
from lookalike.routing import model_routing
from lookalike.v1 import embedder_pb2, embedder_pb2_grpc, searcher_pb2, searcher_pb2_grpc


class AsyncEmbedderClient:
    def __init__(self, target: str | ChannelSettings) -> None:
        self.settings = channel_settings(target)
        self.channel = self.settings.open_aio()
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)
        self._limits: RequestLimits | None = None

    async def model_info(self, timeout: float | None = None) -> embedder_pb2.GetModelInfoResponse:
        return await call_with_retries_async(self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest(),
                                             self.settings, timeout, "Embedder.GetModelInfo")

    async def embed(self, images: Sequence[ImageInput], ids: Sequence[str] | None = None, top_categories: int = 0,
                    timeout: float | None = None) -> list[EmbeddedImage]:
        """EmbedderClient.embed, awaited: `timeout` bounds all of it."""
        deadline = deadline_after(timeout)
        check_embed_arguments(images, ids)
        if self._limits is None:
            self._limits = RequestLimits.of(await self.model_info(time_left(deadline, "Embedder.GetModelInfo")),
                                            self.settings)
        plan = embed_plan(images, ids, top_categories, self._limits)
        return plan.results([await call_with_retries_async(self.stub.Embed, request, self.settings,
                                                           time_left(deadline, "Embedder.Embed"), "Embedder.Embed")
                             for request in plan.requests])

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncEmbedderClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSearcherClient:
    def __init__(self, target: str | ChannelSettings) -> None:
        self.settings = channel_settings(target)
        self.channel = self.settings.open_aio()
        self.stub = searcher_pb2_grpc.SearcherStub(self.channel)
        self._limits: searcher_pb2.RequestLimits | None = None

    async def limits(self, timeout: float | None = None) -> searcher_pb2.RequestLimits:
        """SearcherClient.limits, awaited."""
        if self._limits is None:
            self._limits = (await self.stats(timeout)).limits
        return self._limits

    async def upsert(self, items: Sequence[CatalogueItem], timeout: float | None = None,
                     replace_products: Sequence[str] = ()) -> searcher_pb2.UpsertResponse:
        request = searcher_pb2.UpsertRequest(items=[item.to_proto() for item in items],
                                             replace_products=list(replace_products))
        return await call_with_retries_async(self.stub.Upsert, request, self.settings, timeout, "Searcher.Upsert")

    async def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
                     products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        request = searcher_pb2.DeleteRequest(ids=list(ids), products=list(products))
        return await call_with_retries_async(self.stub.Delete, request, self.settings, timeout, "Searcher.Delete")

    async def search(self, vector: np.ndarray, model_id: str, k: int = 10, routing: searcher_pb2.Routing | None = None,
                     ef: int = 0, timeout: float | None = None, filter: FilterInput = None,
                     distinct_products: bool = False) -> searcher_pb2.SearchResponse:
        request = search_request(vector, model_id, k, routing, ef, filter, distinct_products)
        return await call_with_retries_async(self.stub.Search, request, self.settings, timeout, "Searcher.Search")

    async def search_batch(self, requests: Sequence[searcher_pb2.SearchRequest],
                           timeout: float | None = None) -> list[searcher_pb2.SearchResponse | LookalikeError]:
        """SearcherClient.search_batch, awaited: `timeout` bounds all the calls."""
        deadline = deadline_after(timeout)
        answers: list[searcher_pb2.SearchResponse | LookalikeError] = []
        limits = self._limits or await self.limits(time_left(deadline, "Searcher.GetStats"))
        size = fitted(limits.max_batch_queries, BATCH_QUERIES)
        for request in search_batch_requests(requests, size):
            left = time_left(deadline, "Searcher.SearchBatch")
            response = await call_with_retries_async(self.stub.SearchBatch, request, self.settings, left,
                                                     "Searcher.SearchBatch")
            answers.extend(batch_result(result) for result in response.results)
        return answers

    async def stats(self, timeout: float | None = None) -> searcher_pb2.GetStatsResponse:
        return await call_with_retries_async(self.stub.GetStats, searcher_pb2.GetStatsRequest(), self.settings,
                                             timeout, "Searcher.GetStats")

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSearcherClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncLookalike:
    """lookalike.client.facade.Lookalike for asyncio: the same methods, awaited, over one searcher target (no pod
    list or shard map). Create it inside the event loop it is used in: its channels belong to that loop."""

    def __init__(self, embedder: str | ChannelSettings, searcher: str | ChannelSettings, *,
                 threshold: float | None = None, max_shards: int | None = None,
                 prior_weight: float | None = None) -> None:
        """Routing values left None are the model's, fitted on validation at export (see Lookalike)."""
        # Checked before either channel opens: closing an asyncio channel takes an await, which a constructor
        # that raised cannot give it.
        for name, target in (("embedder", embedder), ("searcher", searcher)):
            if not isinstance(target, (str, ChannelSettings)):
                raise TypeError(f"{name} is a {type(target).__name__}, expected an address or ChannelSettings (a pod "
                                "list or a shard map: use lookalike.client.facade.Lookalike)")
        embedder, searcher = channel_settings(embedder), channel_settings(searcher)
        self.embedder = AsyncEmbedderClient(embedder)
        self.searcher = AsyncSearcherClient(searcher)
        self._given_routing = (threshold, max_shards, prior_weight)
        self._model: embedder_pb2.GetModelInfoResponse | None = None

    async def model_info(self, timeout: float | None = None) -> embedder_pb2.GetModelInfoResponse:
        """The served model (asked once): id, manifest, limits."""
        if self._model is None:
            self._model = await self.embedder.model_info(timeout)
        return self._model

    async def _model_within(self, deadline: float | None) -> embedder_pb2.GetModelInfoResponse:
        """Lookalike._model_within, awaited."""
        return self._model or await self.model_info(time_left(deadline, "Embedder.GetModelInfo"))

    async def model_id(self) -> str:
        return (await self.model_info()).model_id

    async def routing(self) -> tuple[float, int, float | None]:
        """(threshold, max_shards, prior_weight) adaptive searches send."""
        return model_routing((await self.model_info()).manifest, *self._given_routing)

    async def index(self, images: Sequence[ImageInput], ids: Sequence[str],
                    categories: Sequence[str | None] | None = None,
                    attributes: Sequence[Mapping[str, str]] | None = None, timeout: float | None = None,
                    products: Sequence[str] | None = None, replace_products: bool = False) -> IndexResult:
        deadline = deadline_after(timeout)
        check_catalogue_fields(images, categories, attributes, products)
        with tracer.start_as_current_span("Lookalike.index", attributes={"lookalike.images": len(images)}):
            embedded = await self.embedder.embed(images, ids=ids, top_categories=1,
                                                 timeout=time_left(deadline, "Embedder.Embed"))
            model = await self._model_within(deadline)
            items, result = catalogue_items(embedded, model.model_id, categories, attributes, products)
            size = fitted((await self.searcher.limits(time_left(deadline, "Searcher.GetStats"))).max_batch,
                          UPSERT_BATCH)
            for batch, replaced in upsert_batches(items, replace_products, refused_products(embedded, products), size):
                record_upserts(batch, await self.searcher.upsert(batch, time_left(deadline, "Searcher.Upsert"),
                                                                 replaced), result)
            return result

    async def search(self, image: ImageInput, k: int = 10, routing: RoutingMode = "adaptive", ef: int = 0,
                     timeout: float | None = None, filter: FilterInput = None,
                     distinct_products: bool = False) -> SearchResult:
        deadline = deadline_after(timeout)
        with tracer.start_as_current_span("Lookalike.search", attributes={"lookalike.k": k}):
            started = time.perf_counter()
            query_filter = as_filter(filter)  # a bad filter is refused before the photo is embedded for nothing
            embedded = (await self.embedder.embed([image], ids=["query"],
                                                  timeout=time_left(deadline, "Embedder.Embed")))[0]
            if not embedded.ok:
                raise library_error(embedded.error_code, embedded.error, "Embedder.Embed")
            embedded_at = time.perf_counter()
            model = await self._model_within(deadline)
            response = await self.searcher.search(embedded.vector, model.model_id, k,
                                                  routing_request(routing, embedded, *await self.routing()), ef,
                                                  time_left(deadline, "Searcher.Search"), query_filter,
                                                  distinct_products)
            return search_result(embedded, response, embedded_at - started, time.perf_counter() - embedded_at)

    async def search_batch(self, images: Sequence[ImageInput], k: int = 10, routing: RoutingMode = "adaptive",
                           ef: int = 0, timeout: float | None = None, filter: FilterInput = None,
                           distinct_products: bool = False) -> list[SearchResult | LookalikeError]:
        deadline = deadline_after(timeout)
        with tracer.start_as_current_span("Lookalike.search_batch", attributes={"lookalike.images": len(images)}):
            started = time.perf_counter()
            query_filter = as_filter(filter)  # a bad filter is refused before the photos are embedded for nothing
            embedded = await self.embedder.embed(images, ids=[str(n) for n in range(len(images))],
                                                 timeout=time_left(deadline, "Embedder.Embed"))
            embedded_at = time.perf_counter()
            model = await self._model_within(deadline)
            values = await self.routing()
            requests = [search_request(e.vector, model.model_id, k, routing_request(routing, e, *values), ef,
                                       query_filter, distinct_products) for e in embedded if e.ok]
            answers = iter(await self.searcher.search_batch(requests, time_left(deadline, "Searcher.SearchBatch"))
                           if requests else [])
            finished = time.perf_counter()
            return [batch_search_result(e, next(answers) if e.ok else None, embedded_at - started,
                                        finished - embedded_at) for e in embedded]

    async def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
                     products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        return await self.searcher.delete(ids, timeout, products)

    async def close(self) -> None:
        await self.embedder.close()
        await self.searcher.close()

    async def __aenter__(self) -> "AsyncLookalike":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
