from lookalike.v1 import common_pb2 as _common_pb2
from lookalike.v1 import manifest_pb2 as _manifest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data", "id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    id: str
    def __init__(self, data: _Optional[bytes] = ..., id: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "top_categories")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_categories: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_categories: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("vector", "categories", "face")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    vector: _common_pb2.Vector
    categories: _containers.RepeatedCompositeFieldContainer[_common_pb2.CategoryProbability]
    face: Box
    def __init__(self, vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., categories: _Optional[_Iterable[_Union[_common_pb2.CategoryProbability, _Mapping]]] = ..., face: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("left", "top", "right", "bottom")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    left: int
    top: int
    right: int
    bottom: int
    def __init__(self, left: _Optional[int] = ..., top: _Optional[int] = ..., right: _Optional[int] = ..., bottom: _Optional[int] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("id", "embedding", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    embedding: Embedding
    error: _common_pb2.ItemStatus
    def __init__(self, id: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedResult]
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedResult, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_id", "sha256", "dimension", "labels", "providers", "manifest", "max_images_per_request", "max_image_bytes", "max_image_pixels", "max_message_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    sha256: str
    dimension: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    providers: _containers.RepeatedScalarFieldContainer[str]
    manifest: _manifest_pb2.ModelManifest
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., sha256: _Optional[str] = ..., dimension: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., providers: _Optional[_Iterable[str]] = ..., manifest: _Optional[_Union[_manifest_pb2.ModelManifest, _Mapping]] = ..., max_images_per_request: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
