from lookalike.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("id", "category", "vector", "attributes", "model_id", "product")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    id: str
    category: str
    vector: _common_pb2.Vector
    attributes: _containers.ScalarMap[str, str]
    model_id: str
    product: str
    def __init__(self, id: _Optional[str] = ..., category: _Optional[str] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., model_id: _Optional[str] = ..., product: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("items", "replace_products")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    replace_products: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., replace_products: _Optional[_Iterable[str]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("statuses", "sequence")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_common_pb2.ItemStatus]
    sequence: int
    def __init__(self, statuses: _Optional[_Iterable[_Union[_common_pb2.ItemStatus, _Mapping]]] = ..., sequence: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "products")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    products: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., products: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing", "sequence")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    sequence: int
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ..., sequence: _Optional[int] = ...) -> None: ...

class ExplicitRouting(_message.Message):
    __slots__ = ("categories",)
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, categories: _Optional[_Iterable[str]] = ...) -> None: ...

class ProbabilityRouting(_message.Message):
    __slots__ = ("categories", "threshold", "max_shards", "prior_weight")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedCompositeFieldContainer[_common_pb2.CategoryProbability]
    threshold: float
    max_shards: int
    prior_weight: float
    def __init__(self, categories: _Optional[_Iterable[_Union[_common_pb2.CategoryProbability, _Mapping]]] = ..., threshold: _Optional[float] = ..., max_shards: _Optional[int] = ..., prior_weight: _Optional[float] = ...) -> None: ...

class AllShards(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Routing(_message.Message):
    __slots__ = ("explicit", "probabilities", "all")
    EXPLICIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    explicit: ExplicitRouting
    probabilities: ProbabilityRouting
    all: AllShards
    def __init__(self, explicit: _Optional[_Union[ExplicitRouting, _Mapping]] = ..., probabilities: _Optional[_Union[ProbabilityRouting, _Mapping]] = ..., all: _Optional[_Union[AllShards, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("vector", "model_id", "k", "ef", "routing", "filter", "distinct_products")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    vector: _common_pb2.Vector
    model_id: str
    k: int
    ef: int
    routing: Routing
    filter: Filter
    distinct_products: bool
    def __init__(self, vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., model_id: _Optional[str] = ..., k: _Optional[int] = ..., ef: _Optional[int] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., distinct_products: _Optional[bool] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, all: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("attribute", "equals", "one_of", "range", "negate")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ONE_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    NEGATE_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    equals: str
    one_of: StringList
    range: NumericRange
    negate: bool
    def __init__(self, attribute: _Optional[str] = ..., equals: _Optional[str] = ..., one_of: _Optional[_Union[StringList, _Mapping]] = ..., range: _Optional[_Union[NumericRange, _Mapping]] = ..., negate: _Optional[bool] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class NumericRange(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: float
    gt: float
    lte: float
    lt: float
    def __init__(self, gte: _Optional[float] = ..., gt: _Optional[float] = ..., lte: _Optional[float] = ..., lt: _Optional[float] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchBatchResult(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ItemStatus
    response: SearchResponse
    def __init__(self, status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., response: _Optional[_Union[SearchResponse, _Mapping]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchBatchResult, _Mapping]]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "similarity", "category", "attributes", "product", "product_matches")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_MATCHES_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    similarity: float
    category: str
    attributes: _containers.ScalarMap[str, str]
    product: str
    product_matches: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., similarity: _Optional[float] = ..., category: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., product: _Optional[str] = ..., product_matches: _Optional[int] = ...) -> None: ...

class ShardProbe(_message.Message):
    __slots__ = ("category", "probability", "k", "ef", "items", "seconds", "part", "parts", "filter_matches", "filter_exact")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    FILTER_MATCHES_FIELD_NUMBER: _ClassVar[int]
    FILTER_EXACT_FIELD_NUMBER: _ClassVar[int]
    category: str
    probability: float
    k: int
    ef: int
    items: int
    seconds: float
    part: int
    parts: int
    filter_matches: int
    filter_exact: bool
    def __init__(self, category: _Optional[str] = ..., probability: _Optional[float] = ..., k: _Optional[int] = ..., ef: _Optional[int] = ..., items: _Optional[int] = ..., seconds: _Optional[float] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., filter_matches: _Optional[int] = ..., filter_exact: _Optional[bool] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "probes", "unknown_categories", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    probes: _containers.RepeatedCompositeFieldContainer[ShardProbe]
    unknown_categories: _containers.RepeatedScalarFieldContainer[str]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., probes: _Optional[_Iterable[_Union[ShardProbe, _Mapping]]] = ..., unknown_categories: _Optional[_Iterable[str]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("category", "items", "deleted", "capacity", "model_id", "dimension", "memory_bytes", "snapshot_sequence", "snapshot_age_seconds", "part", "parts")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    category: str
    items: int
    deleted: int
    capacity: int
    model_id: str
    dimension: int
    memory_bytes: int
    snapshot_sequence: int
    snapshot_age_seconds: float
    part: int
    parts: int
    def __init__(self, category: _Optional[str] = ..., items: _Optional[int] = ..., deleted: _Optional[int] = ..., capacity: _Optional[int] = ..., model_id: _Optional[str] = ..., dimension: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., snapshot_sequence: _Optional[int] = ..., snapshot_age_seconds: _Optional[float] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("shards", "items", "sequence", "store_sequence", "lag_seconds", "routing_defaults", "limits")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STORE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    items: int
    sequence: int
    store_sequence: int
    lag_seconds: float
    routing_defaults: RoutingSettings
    limits: RequestLimits
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., items: _Optional[int] = ..., sequence: _Optional[int] = ..., store_sequence: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., routing_defaults: _Optional[_Union[RoutingSettings, _Mapping]] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_batch", "max_batch_queries", "max_k", "max_message_bytes")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_batch_queries: int
    max_k: int
    max_message_bytes: int
    def __init__(self, max_batch: _Optional[int] = ..., max_batch_queries: _Optional[int] = ..., max_k: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class RoutingSettings(_message.Message):
    __slots__ = ("threshold", "max_shards", "prior_weight")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    max_shards: int
    prior_weight: float
    def __init__(self, threshold: _Optional[float] = ..., max_shards: _Optional[int] = ..., prior_weight: _Optional[float] = ...) -> None: ...

class GetShardMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaGroup(_message.Message):
    __slots__ = ("name", "target", "live_replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LIVE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: str
    live_replicas: int
    def __init__(self, name: _Optional[str] = ..., target: _Optional[str] = ..., live_replicas: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("category", "group", "moving_to", "model_id", "dimension", "part", "parts", "building")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MOVING_TO_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    BUILDING_FIELD_NUMBER: _ClassVar[int]
    category: str
    group: str
    moving_to: str
    model_id: str
    dimension: int
    part: int
    parts: int
    building: bool
    def __init__(self, category: _Optional[str] = ..., group: _Optional[str] = ..., moving_to: _Optional[str] = ..., model_id: _Optional[str] = ..., dimension: _Optional[int] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., building: _Optional[bool] = ...) -> None: ...

class GetShardMapResponse(_message.Message):
    __slots__ = ("groups", "placements", "group", "sequence", "routing_defaults")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[ReplicaGroup]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    group: str
    sequence: int
    routing_defaults: RoutingSettings
    def __init__(self, groups: _Optional[_Iterable[_Union[ReplicaGroup, _Mapping]]] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., group: _Optional[str] = ..., sequence: _Optional[int] = ..., routing_defaults: _Optional[_Union[RoutingSettings, _Mapping]] = ...) -> None: ...

class MoveCategoryRequest(_message.Message):
    __slots__ = ("category", "group")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    category: str
    group: str
    def __init__(self, category: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class MoveCategoryResponse(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...
