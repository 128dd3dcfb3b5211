from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelManifest(_message.Message):
    __slots__ = ("model_id", "version", "onnx_file", "sha256", "input", "output", "embedding_dim", "metric", "labels", "backbone", "precision", "parity", "quantization", "temperature", "trained_on", "created_at", "calibration", "routing", "export_threads")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNX_FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    EXPORT_THREADS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: str
    onnx_file: str
    sha256: str
    input: InputSpec
    output: OutputSpec
    embedding_dim: int
    metric: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    backbone: str
    precision: str
    parity: ParityCheck
    quantization: QuantizationDrift
    temperature: float
    trained_on: str
    created_at: str
    calibration: Calibration
    routing: RoutingDefaults
    export_threads: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[str] = ..., onnx_file: _Optional[str] = ..., sha256: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., output: _Optional[_Union[OutputSpec, _Mapping]] = ..., embedding_dim: _Optional[int] = ..., metric: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., backbone: _Optional[str] = ..., precision: _Optional[str] = ..., parity: _Optional[_Union[ParityCheck, _Mapping]] = ..., quantization: _Optional[_Union[QuantizationDrift, _Mapping]] = ..., temperature: _Optional[float] = ..., trained_on: _Optional[str] = ..., created_at: _Optional[str] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., routing: _Optional[_Union[RoutingDefaults, _Mapping]] = ..., export_threads: _Optional[int] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("images", "temperature", "ece_before", "ece_after", "method", "fitted_temperature", "nll_before", "nll_after")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ECE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ECE_AFTER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FITTED_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    NLL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NLL_AFTER_FIELD_NUMBER: _ClassVar[int]
    images: int
    temperature: float
    ece_before: float
    ece_after: float
    method: str
    fitted_temperature: float
    nll_before: float
    nll_after: float
    def __init__(self, images: _Optional[int] = ..., temperature: _Optional[float] = ..., ece_before: _Optional[float] = ..., ece_after: _Optional[float] = ..., method: _Optional[str] = ..., fitted_temperature: _Optional[float] = ..., nll_before: _Optional[float] = ..., nll_after: _Optional[float] = ...) -> None: ...

class RoutingDefaults(_message.Message):
    __slots__ = ("queries", "target_recall", "threshold", "max_shards", "routing_recall", "expected_shards", "prior_weight", "prior_weight_scores")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TARGET_RECALL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_RECALL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_SCORES_FIELD_NUMBER: _ClassVar[int]
    queries: int
    target_recall: float
    threshold: float
    max_shards: int
    routing_recall: float
    expected_shards: float
    prior_weight: float
    prior_weight_scores: _containers.RepeatedCompositeFieldContainer[PriorWeightScore]
    def __init__(self, queries: _Optional[int] = ..., target_recall: _Optional[float] = ..., threshold: _Optional[float] = ..., max_shards: _Optional[int] = ..., routing_recall: _Optional[float] = ..., expected_shards: _Optional[float] = ..., prior_weight: _Optional[float] = ..., prior_weight_scores: _Optional[_Iterable[_Union[PriorWeightScore, _Mapping]]] = ...) -> None: ...

class PriorWeightScore(_message.Message):
    __slots__ = ("prior_weight", "map_at_10")
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAP_AT_10_FIELD_NUMBER: _ClassVar[int]
    prior_weight: float
    map_at_10: float
    def __init__(self, prior_weight: _Optional[float] = ..., map_at_10: _Optional[float] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "layout", "dtype", "height", "width", "channels", "resize", "normalization", "face_crop")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    FACE_CROP_FIELD_NUMBER: _ClassVar[int]
    name: str
    layout: str
    dtype: str
    height: int
    width: int
    channels: int
    resize: str
    normalization: str
    face_crop: FaceCrop
    def __init__(self, name: _Optional[str] = ..., layout: _Optional[str] = ..., dtype: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., resize: _Optional[str] = ..., normalization: _Optional[str] = ..., face_crop: _Optional[_Union[FaceCrop, _Mapping]] = ...) -> None: ...

class FaceCrop(_message.Message):
    __slots__ = ("detector", "margin", "no_face", "scale_factor", "min_neighbors", "min_size", "upsample")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    NO_FACE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLE_FIELD_NUMBER: _ClassVar[int]
    detector: str
    margin: float
    no_face: str
    scale_factor: float
    min_neighbors: int
    min_size: float
    upsample: int
    def __init__(self, detector: _Optional[str] = ..., margin: _Optional[float] = ..., no_face: _Optional[str] = ..., scale_factor: _Optional[float] = ..., min_neighbors: _Optional[int] = ..., min_size: _Optional[float] = ..., upsample: _Optional[int] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("embedding", "probabilities")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    embedding: str
    probabilities: str
    def __init__(self, embedding: _Optional[str] = ..., probabilities: _Optional[str] = ...) -> None: ...

class ParityCheck(_message.Message):
    __slots__ = ("images", "max_abs_diff", "tolerance", "passed")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    images: int
    max_abs_diff: float
    tolerance: float
    passed: bool
    def __init__(self, images: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., tolerance: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class QuantizationDrift(_message.Message):
    __slots__ = ("method", "parent_model_id", "calibration_images", "validation_images", "mean_cosine", "top10_overlap", "category_agreement", "min_cosine")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARENT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    TOP10_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    method: str
    parent_model_id: str
    calibration_images: int
    validation_images: int
    mean_cosine: float
    top10_overlap: float
    category_agreement: float
    min_cosine: float
    def __init__(self, method: _Optional[str] = ..., parent_model_id: _Optional[str] = ..., calibration_images: _Optional[int] = ..., validation_images: _Optional[int] = ..., mean_cosine: _Optional[float] = ..., top10_overlap: _Optional[float] = ..., category_agreement: _Optional[float] = ..., min_cosine: _Optional[float] = ...) -> None: ...
