"""MicroBatcher: every caller gets its own rows back, limits hold, failures reach the right callers."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lookalike.embedder.batcher import MicroBatcher
from lookalike.serving.errors import DeadlineExceeded, ResourceExhausted


def tagged(count: int, tag: int) -> np.ndarray:
    """`count` tiny "images" whose pixels carry `tag`, so each caller can recognise its rows."""
    return np.full((count, 2, 2, 3), tag, dtype=np.uint8)


class RecordingModel:
    """A stand-in for the ONNX model, on purpose: the batcher only calls a function of a batch, and these tests
    need rows that say whose they are and a model whose speed they set. Batching in front of the real ONNX
    Runtime session is tested through the server (test_embedder_server.py, concurrent requests share batches)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.delay = delay

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batch_sizes.append(len(images))
        time.sleep(self.delay)
        values = images.reshape(len(images), -1)[:, :1].astype(np.float32)
        return values, values * 2


def wait_until(condition, seconds: float = 10.0) -> None:
    """Polls `condition` until it holds (events between threads ordered by state, not by sleeps)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batcher"
        time.sleep(0.005)


class HeldModel(RecordingModel):
    """RecordingModel whose first batch waits inside the model until released: the test knows when the model
    is busy, and what is queued behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return super().__call__(images)


def test_concurrent_callers_are_batched_and_get_their_own_rows() -> None:
    model = RecordingModel(delay=0.01)
    batcher = MicroBatcher(model, max_batch=16, max_delay_seconds=0.05, max_queued_images=1000)
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def caller(tag: int) -> None:
        results[tag] = batcher.run(tagged(tag % 3 + 1, tag))

    threads = [threading.Thread(target=caller, args=(tag,)) for tag in range(1, 13)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    for tag, (first, second) in results.items():
        assert first.shape == (tag % 3 + 1, 1) and (first == tag).all() and (second == 2 * tag).all()
    assert max(model.batch_sizes) <= 16
    assert len(model.batch_sizes) < 12, "callers arriving together should share batches"
    assert batcher.stats.images == sum(tag % 3 + 1 for tag in range(1, 13))


def test_requests_larger_than_max_batch_are_split() -> None:
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch=4, max_delay_seconds=0.0, max_queued_images=100)
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3).repeat(2, 1).repeat(2, 2)
    first, _ = batcher.run(images)
    batcher.close()
    assert first[:, 0].tolist() == list(range(10))
    assert max(model.batch_sizes) <= 4


def test_full_queue_is_resource_exhausted() -> None:
    model = HeldModel()
    batcher = MicroBatcher(model, max_batch=2, max_delay_seconds=0.0, max_queued_images=3)
    background = threading.Thread(target=batcher.run, args=(tagged(2, 1),))
    background.start()
    assert model.entered.wait(10)  # the first job is inside the model, the queue is empty
    waiting = threading.Thread(target=batcher.run, args=(tagged(3, 2),))
    waiting.start()
    wait_until(lambda: batcher._queued_images == 3)
    with pytest.raises(ResourceExhausted, match="3 images waiting, 1 more would exceed the limit of 3"):
        batcher.run(tagged(1, 3))
    model.release.set()
    background.join()
    waiting.join()
    batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_next_batch_works() -> None:
    calls = {"count": 0}

    def flaky(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("model exploded")
        return RecordingModel()(images)

    batcher = MicroBatcher(flaky, max_batch=8, max_delay_seconds=0.0, max_queued_images=100)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher.run(tagged(1, 1))
    first, _ = batcher.run(tagged(2, 5))
    batcher.close()
    assert (first == 5).all()


def test_the_trace_says_how_long_a_request_waited_for_its_batch_not_for_its_answer() -> None:
    """queue_seconds on the RPC's span is the wait before inference started (about max_delay for a lone
    request), not the wait for the result, which also holds the model's 1 s."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    batcher = MicroBatcher(RecordingModel(delay=1.0), max_batch=16, max_delay_seconds=0.01, max_queued_images=100)
    try:
        with provider.get_tracer("test").start_as_current_span("rpc"):
            started = time.monotonic()
            batcher.run(tagged(2, 1))
            answered = time.monotonic() - started
    finally:
        batcher.close()
    attributes = spans.get_finished_spans()[0].attributes
    assert attributes["lookalike.inference_batch_images"] == (2,)
    assert 0.01 <= attributes["lookalike.queue_seconds"] < 0.5 and answered >= attributes["lookalike.queue_seconds"] + 1.0


def test_jobs_nobody_waits_for_are_dropped_not_run() -> None:
    """Under overload the queue outlasts callers' deadlines: a job whose call has ended by the time its batch is
    formed is dropped (its caller gets DeadlineExceeded) instead of taking the model from living callers;
    the queue count comes back to zero."""
    model = HeldModel()
    batcher = MicroBatcher(model, max_batch=4, max_delay_seconds=0.0, max_queued_images=64)
    gone = threading.Event()
    outcomes: dict[str, object] = {}

    def call(name: str, tag: int, abandoned: object = lambda: False) -> None:
        try:
            outcomes[name] = batcher.run(tagged(4, tag), abandoned=abandoned)[0][:, 0].tolist()
        except DeadlineExceeded as error:
            outcomes[name] = error

    try:
        first = threading.Thread(target=call, args=("first", 1))
        first.start()
        assert model.entered.wait(10)  # the model is busy with the first batch
        ended = threading.Thread(target=call, args=("ended", 2, gone.is_set))
        ended.start()
        wait_until(lambda: batcher._queued_images == 4)
        living = threading.Thread(target=call, args=("living", 3))
        living.start()
        wait_until(lambda: batcher._queued_images == 8)
        gone.set()  # the second caller's deadline passes while it waits in the queue
        model.release.set()
        for thread in (first, ended, living):
            thread.join(30)
        assert outcomes["first"] == [1.0] * 4 and outcomes["living"] == [3.0] * 4
        assert isinstance(outcomes["ended"], DeadlineExceeded) and "before its images were embedded" in str(outcomes["ended"])
        assert model.batch_sizes == [4, 4]  # the ended caller's images never reached the model
        assert batcher._queued_images == 0
    finally:
        model.release.set()
        batcher.close()


def test_the_image_queue_fills_before_calls_wait_unseen_in_grpc(tmp_path) -> None:
    """max_queued_images is the embedder's back-pressure, but only calls holding a handler thread reach the
    queue: with 16 threads of at most 64 images it held 1,024 at most and never reached its 2,048. The
    defaults leave room to reach it, and a request larger than the queue is refused as a setting."""
    from lookalike.embedder.config import EmbedderConfig

    config = EmbedderConfig(model_dir=tmp_path)
    assert config.grpc_workers * config.max_images_per_request > config.max_queued_images
    with pytest.raises(ValueError, match=r"max_images_per_request \(64\) must not exceed max_queued_images \(32\)"):
        EmbedderConfig(model_dir=tmp_path, max_queued_images=32)
