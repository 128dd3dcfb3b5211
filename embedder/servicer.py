"""The Embedder gRPC servicer: validates, converts and delegates to EmbeddingPipeline."""
from __future__ import annotations

import grpc
import numpy as np

from lookalike.embedder.config import EmbedderConfig
from lookalike.embedder.pipeline import EmbeddingPipeline
from lookalike.codec import pack_vector
from lookalike.serving.errors import InvalidArgument, Unavailable, rpc_method
from lookalike.serving.tracing import annotate
from lookalike.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    """Registered before the model loads (so health answers during loading); RPCs wait for `attach`."""

    def __init__(self, config: EmbedderConfig) -> None:
        self._config = config
        self._pipeline: EmbeddingPipeline | None = None
        self._labels: list[str] = []

    def attach(self, pipeline: EmbeddingPipeline) -> None:
        self._labels = list(pipeline.model.manifest.labels)
        self._pipeline = pipeline

    @property
    def pipeline(self) -> EmbeddingPipeline:
        if self._pipeline is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self._pipeline

    @rpc_method
    def Embed(self, request: embedder_pb2.EmbedRequest, context: grpc.ServicerContext) -> embedder_pb2.EmbedResponse:
        pipeline = self.pipeline
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("images is empty, expected at least one encoded image")
        if count > self._config.max_images_per_request:
            raise InvalidArgument(f"images has {count} entries, limit is {self._config.max_images_per_request} "
                                  "per request; split the batch")
        results = pipeline.embed([image.data for image in request.images], abandoned=lambda: not context.is_active())
        annotate(lambda: {"images": count, "failed_images": sum(result.error is not None for result in results)})
        response = embedder_pb2.EmbedResponse(model_id=pipeline.model.manifest.model_id)
        for image, result in zip(request.images, results):
            entry = response.results.add(id=image.id)
            if result.error is not None:
                entry.error.CopyFrom(common_pb2.ItemStatus(code=result.error.code.value[0], message=str(result.error)))
            else:
                entry.embedding.vector.CopyFrom(pack_vector(result.embedding))
                entry.embedding.categories.extend(self._top_categories(result.probabilities, request.top_categories))
                if result.face is not None:
                    left, top, right, bottom = result.face
                    entry.embedding.face.CopyFrom(embedder_pb2.Box(left=left, top=top, right=right, bottom=bottom))
        return response

    def _top_categories(self, probabilities: np.ndarray, top: int) -> list[common_pb2.CategoryProbability]:
        order = np.argsort(-probabilities, kind="stable")
        if top:
            order = order[:top]
        return [common_pb2.CategoryProbability(category=self._labels[i], probability=float(probabilities[i]))
                for i in order]

    @rpc_method
    def GetModelInfo(self, request: embedder_pb2.GetModelInfoRequest,
                     context: grpc.ServicerContext) -> embedder_pb2.GetModelInfoResponse:
        model = self.pipeline.model
        return embedder_pb2.GetModelInfoResponse(
            model_id=model.manifest.model_id, sha256=model.manifest.sha256, dimension=model.manifest.embedding_dim,
            labels=self._labels, providers=model.providers, manifest=model.manifest,
            max_images_per_request=self._config.max_images_per_request,
            max_image_bytes=self._config.max_image_bytes, max_image_pixels=self._config.max_image_pixels,
            max_message_bytes=self._config.max_message_bytes)
