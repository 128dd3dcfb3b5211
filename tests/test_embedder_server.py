"""The embedder over real gRPC channels: real model, real images, bad input, limits, health, batching."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from lookalike.codec import unpack_vector
from lookalike.v1 import embedder_pb2, embedder_pb2_grpc
from tests.test_preprocess import png_claiming


def stub(channel: grpc.Channel) -> embedder_pb2_grpc.EmbedderStub:
    return embedder_pb2_grpc.EmbedderStub(channel)


def embed(channel: grpc.Channel, *images: bytes, top: int = 0) -> embedder_pb2.EmbedResponse:
    request = embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=d, id=f"img{i}") for i, d in enumerate(images)],
                                        top_categories=top)
    return stub(channel).Embed(request, timeout=30)


def reencode(jpeg: bytes, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, fmt)
    return buffer.getvalue()


def assert_still_serving(channel: grpc.Channel, image: bytes) -> None:
    response = embed(channel, image)
    assert response.results[0].HasField("embedding")


def test_health_is_serving_after_warm_up(embedder) -> None:
    _, channel = embedder
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lookalike.v1.Embedder"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info(embedder, model_dir: Path) -> None:
    _, channel = embedder
    info = stub(channel).GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=5)
    assert info.model_id.startswith("effnet-lite0@") and info.dimension == 1280
    assert len(info.labels) == 43 and info.providers == ["CPUExecutionProvider"]
    assert info.manifest.sha256 == info.sha256 and info.max_images_per_request == 8
    assert info.max_message_bytes == 4 * 1024 * 1024


def test_jpeg_png_webp_embed_to_unit_vectors_with_probabilities(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    jpeg = image_bytes[0]
    response = embed(channel, jpeg, reencode(jpeg, "PNG"), reencode(jpeg, "WEBP"))
    assert [r.id for r in response.results] == ["img0", "img1", "img2"]
    vectors = []
    for result in response.results:
        assert result.HasField("embedding"), result.error.message
        vector = unpack_vector(result.embedding.vector)
        assert vector.shape == (1280,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        probabilities = [c.probability for c in result.embedding.categories]
        assert len(probabilities) == 43 and sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert probabilities == sorted(probabilities, reverse=True)
        vectors.append(vector)
    # The same photo in three encodings lands in nearly the same place (WebP is lossy).
    assert float(vectors[0] @ vectors[1]) > 0.999 and float(vectors[0] @ vectors[2]) > 0.95


def test_same_image_twice_gives_the_identical_vector(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    first = embed(channel, image_bytes[1], image_bytes[1])
    again = embed(channel, image_bytes[1])
    a, b, c = (r.embedding.vector.values for r in [*first.results, *again.results])
    assert a == b == c


def test_top_categories_limits_and_orders(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    categories = embed(channel, image_bytes[2], top=3).results[0].embedding.categories
    assert len(categories) == 3 and categories[0].probability >= categories[1].probability >= categories[2].probability


def test_bad_images_get_their_own_errors_and_the_rest_succeeds(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    truncated = image_bytes[0][: len(image_bytes[0]) // 3]
    response = embed(channel, b"", truncated, b"%PDF-1.4 this is a text file\n", png_claiming(20000, 20000),
                     image_bytes[3])
    codes = [r.error.code for r in response.results[:4]]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    messages = [r.error.message for r in response.results[:4]]
    assert "images[0] is empty" in messages[0]
    assert "images[1] could not be decoded" in messages[1]
    assert "images[2] is not a readable image" in messages[2]
    assert "images[3] is 20000x20000" in messages[3] and "limit is 12000000 pixels" in messages[3]
    assert response.results[4].HasField("embedding")


def test_image_over_the_byte_limit(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    big = image_bytes[0] + b"\0" * (2 * 1024 * 1024)
    result = embed(channel, big).results[0]
    assert result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "limit is 2097152 bytes per image" in result.error.message
    assert_still_serving(channel, image_bytes[0])


def test_no_images_and_too_many_images_are_invalid(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    with pytest.raises(grpc.RpcError) as empty:
        embed(channel)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images is empty" in empty.value.details()
    with pytest.raises(grpc.RpcError) as many:
        embed(channel, *([image_bytes[0]] * 9))
    assert many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images has 9 entries, limit is 8" in many.value.details()
    assert_still_serving(channel, image_bytes[0])


def test_oversized_message_is_resource_exhausted(embedder, image_bytes: list[bytes]) -> None:
    _, channel = embedder
    with pytest.raises(grpc.RpcError) as error:
        embed(channel, b"\xff" * (5 * 1024 * 1024))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details()
    assert_still_serving(channel, image_bytes[0])


def test_concurrent_requests_share_batches(embedder, image_bytes: list[bytes]) -> None:
    started, channel = embedder
    stats = started.pipeline.batcher.stats
    before_batches, before_images = stats.batches, stats.images
    reference = embed(channel, image_bytes[4]).results[0].embedding.vector.values
    errors: list[BaseException] = []
    outputs: list[bytes] = []

    def client() -> None:
        try:
            for _ in range(3):
                outputs.append(embed(channel, image_bytes[4]).results[0].embedding.vector.values)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(outputs) == 24
    # Batching must not change a vector beyond float rounding.
    for output in outputs:
        np.testing.assert_allclose(np.frombuffer(output, "<f4"), np.frombuffer(reference, "<f4"), atol=1e-5)
    batches = stats.batches - before_batches
    assert stats.images - before_images == 25
    # Measured: 4 batches (the reference alone, then 24 requests from 8 threads in 3). At most 12 means every
    # batch but the reference's carried 2 images or more on average.
    assert batches <= 12, f"{batches} batches for 25 single-image requests: concurrent requests were not batched"


def test_calls_that_ended_while_queued_are_not_embedded(embedder, image_bytes: list[bytes]) -> None:
    """Twelve calls of eight photos each, all sent at once with a 50 ms deadline: the server cannot embed 96
    photos in 50 ms on two cores, so most calls end while their images wait. Those images are dropped, not
    embedded for nobody (before, every one was embedded after its caller had given up)."""
    started, channel = embedder
    stats = started.pipeline.batcher.stats
    before = stats.images
    stub = embedder_pb2_grpc.EmbedderStub(channel)
    request = embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=image_bytes[n % 6]) for n in range(8)])
    calls = [stub.Embed.future(request, timeout=0.05) for _ in range(12)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 6
    time.sleep(3)  # whatever the server still does for them happens now
    embedded = stats.images - before
    assert embedded <= 8 * codes.count(grpc.StatusCode.OK) + 32, f"{embedded} of 96 photos embedded for ended calls"
    assert len(embed(channel, image_bytes[0]).results) == 1  # and it keeps serving


def test_requested_gpu_provider_that_is_not_active_keeps_health_not_serving(model_dir: Path) -> None:
    """Real ONNX Runtime falls back to CPU when CUDA is asked for and absent; we must not report SERVING."""
    import onnxruntime as ort

    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA, the fallback cannot be provoked")
    started, port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0",
                                                 providers=("cuda", "cpu")))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            info = stub(channel).GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=5)
            assert "CUDAExecutionProvider" not in info.providers
    finally:
        started.stop(None)


def test_model_changed_after_export_is_refused(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import ModelError, OnnxModel

    copy = tmp_path / "tampered"
    shutil.copytree(model_dir, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="sha256 .* manifest says"):
        OnnxModel(EmbedderConfig(model_dir=copy))


def test_onnx_runtime_threads_sleep_between_batches_unless_asked(model_dir: Path) -> None:
    """--spin-wait is off by default: ONNX Runtime's busy-wait took a core between requests (BENCHMARKS.md)."""
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import OnnxModel

    def spinning(config: EmbedderConfig) -> str:
        options = OnnxModel(config).session.get_session_options()
        return options.get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(EmbedderConfig.from_args(["--model", str(model_dir)])) == "0"
    assert spinning(EmbedderConfig.from_args(["--model", str(model_dir), "--spin-wait"])) == "1"


def test_reflection_lists_the_services(embedder) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    _, channel = embedder
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"lookalike.v1.Embedder", "grpc.health.v1.Health"} <= services


@pytest.mark.gpu
def test_cuda_provider_matches_cpu_in_fp32_and_fp16(model_dir: Path, image_bytes: list[bytes], tmp_path: Path,
                                                    grocery_val: list) -> None:
    """On a GPU machine with onnxruntime-gpu: CUDA is active and the vectors match the CPU's fp32 ones, for the
    fp32 graph and for its fp16 twin."""
    import shutil
    import subprocess

    import onnxruntime as ort

    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import OnnxModel
    from lookalike.embedder.preprocess import decode_image
    from lookalike.exporter.quantize import half_precision_model

    # onnxruntime-gpu lists CUDA among its providers on any machine; a GPU must be there too.
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not shutil.which("nvidia-smi") or \
            subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        pytest.skip("no NVIDIA GPU with onnxruntime-gpu's CUDA execution provider here")
    cpu = OnnxModel(EmbedderConfig(model_dir=model_dir))
    pixels = np.stack([decode_image(data, cpu.input_size) for data in image_bytes])
    expected_embeddings, expected_probabilities = cpu.run(pixels)
    half_precision_model(model_dir, tmp_path / "fp16", grocery_val[:16])
    for folder, tolerance in ((model_dir, 1e-3), (tmp_path / "fp16", 1e-2)):
        gpu = OnnxModel(EmbedderConfig(model_dir=folder, providers=("cuda", "cpu")))
        assert gpu.providers[0] == "CUDAExecutionProvider" and not gpu.missing_gpu_providers
        embeddings, probabilities = gpu.run(pixels)
        np.testing.assert_allclose(embeddings, expected_embeddings, atol=tolerance)
        np.testing.assert_allclose(probabilities, expected_probabilities, atol=tolerance)
        assert np.min(np.sum(embeddings * expected_embeddings, axis=1)) >= 0.999


def test_processes_share_a_port_only_when_asked(model_dir: Path) -> None:
    """--reuse-port lets a second embedder listen on a taken port; without it, the second fails to bind."""
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    first, port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0", reuse_port=True))
    try:
        second, second_port = create_server(EmbedderConfig(model_dir=model_dir, address=f"127.0.0.1:{port}",
                                                            reuse_port=True))
        second.stop(None)
        assert second_port == port
        with pytest.raises(OSError, match="could not bind"):
            create_server(EmbedderConfig(model_dir=model_dir, address=f"127.0.0.1:{port}"))
    finally:
        first.stop(None)


def test_images_are_not_decoded_for_a_call_that_ended(model_dir: Path, image_bytes: list[bytes],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the caller had left was asked once, before decoding: a large request whose deadline passed kept
    the decode threads busy with all of its images (a 64-photo request decoded for 30 s after its caller's
    1-s deadline), ahead of other callers. Now each image asks first."""
    from lookalike.embedder import pipeline as pipeline_module
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import OnnxModel
    from lookalike.serving.errors import DeadlineExceeded

    config = EmbedderConfig(model_dir=model_dir, decode_workers=1)
    pipeline = pipeline_module.EmbeddingPipeline(OnnxModel(config), config)
    decoding = pipeline_module.decode_face_image
    decoded: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        decoded.append(1)
        return decoding(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "decode_face_image", counted)
    asked = iter([False, False])  # before decoding, and the first image: then the caller is gone
    try:
        with pytest.raises(DeadlineExceeded, match="while its images were decoded"):
            pipeline.embed(image_bytes[:1] * 8, abandoned=lambda: next(asked, True))
        assert len(decoded) == 1, "only the image decoded before the caller left"
        assert len(pipeline.embed(image_bytes[:1] * 2)) == 2
    finally:
        pipeline.close()
