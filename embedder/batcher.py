"""Server-side micro-batching: concurrent requests share one inference call.

One thread owns the model. It waits for the first queued job, then up to max_delay for more, and runs
everything gathered (at most max_batch images) as one batch, so under load throughput approaches the
model's best batch rate instead of its batch-1 rate.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from lookalike.serving.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from lookalike.serving.tracing import annotate

log = logging.getLogger(__name__)

Inference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Whether nobody waits for a job's answer any more (its call's deadline passed, or the caller cancelled).
Abandoned = Callable[[], bool]


def never_abandoned() -> bool:
    return False

BATCH_IMAGES = Histogram("lookalike_embedder_batch_images", "Images per inference batch",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_DELAY = Histogram("lookalike_embedder_queue_delay_seconds", "Wait of a batch's oldest job before inference",
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
INFERENCE = Histogram("lookalike_embedder_inference_seconds", "Model time per batch",
                      buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
QUEUED_IMAGES = Gauge("lookalike_embedder_queued_images", "Images waiting for inference")
DROPPED_IMAGES = Counter("lookalike_embedder_dropped_images_total",
                         "Queued images not run because their call ended first (deadline passed or cancelled)")


@dataclass
class _Job:
    images: np.ndarray
    abandoned: Abandoned = never_abandoned
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    # Images in the inference batch this job ran in (its own and other requests'), and how long the job
    # waited for that batch to start, for the trace.
    batch_images: int = 0
    queue_seconds: float = 0.0


@dataclass
class BatchStats:
    """Running totals of the inference thread's work, kept in the process so tests can see how calls were
    grouped into batches (operators read the lookalike_embedder_* histograms instead)."""

    batches: int = 0
    images: int = 0


class MicroBatcher:
    """Collects jobs from many threads into batches for one inference thread."""

    def __init__(self, infer: Inference, max_batch: int, max_delay_seconds: float, max_queued_images: int) -> None:
        self._infer = infer
        self._max_batch = max_batch
        self._max_delay = max_delay_seconds
        self._max_queued = max_queued_images
        self._jobs: deque[_Job] = deque()
        self._queued_images = 0
        self._condition = threading.Condition()
        self._running = True
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def run(self, images: np.ndarray, timeout: float | None = None,
            abandoned: Abandoned = never_abandoned) -> tuple[np.ndarray, np.ndarray]:
        """Embeds uint8 [N, H, W, 3] images, in chunks of at most max_batch; blocks until done. Chunks still
        queued once `abandoned()` says nobody waits for them are dropped, not run (DeadlineExceeded)."""
        jobs = [_Job(images[start:start + self._max_batch], abandoned)
                for start in range(0, len(images), self._max_batch)]
        with self._condition:
            if not self._running:
                raise Unavailable("the embedder is shutting down")
            if self._queued_images + len(images) > self._max_queued:
                raise ResourceExhausted(
                    f"embedder queue is full: {self._queued_images} images waiting, {len(images)} more would "
                    f"exceed the limit of {self._max_queued}; retry later or add replicas")
            self._jobs.extend(jobs)
            self._queued_images += len(images)
            QUEUED_IMAGES.set(self._queued_images)
            self._condition.notify()
        results = [job.future.result(timeout) for job in jobs]
        annotate(lambda: {"inference_batch_images": [job.batch_images for job in jobs],
                          "queue_seconds": max(job.queue_seconds for job in jobs)})
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def close(self) -> None:
        """Stops the inference thread after the jobs already queued."""
        with self._condition:
            self._running = False
            self._condition.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Job]:
        with self._condition:
            while True:
                while not self._jobs and self._running:
                    self._condition.wait()
                if not self._jobs:
                    return []
                deadline = self._jobs[0].enqueued + self._max_delay
                while self._queued_images < self._max_batch and self._running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                batch = self._take()
                if batch:
                    return batch

    def _take(self) -> list[_Job]:
        """Up to max_batch images of queued jobs, in order; jobs nobody waits for are dropped on the way (under
        overload the queue outlasts callers' deadlines, and running them would only delay the living)."""
        batch, size, dropped = [], 0, 0
        while self._jobs and (not batch or size + len(self._jobs[0].images) <= self._max_batch):
            job = self._jobs.popleft()
            if job.abandoned():
                dropped += len(job.images)
                job.future.set_exception(DeadlineExceeded("the call ended (its deadline passed or it was cancelled) "
                                                          "before its images were embedded"))
                continue
            batch.append(job)
            size += len(job.images)
        self._queued_images -= size + dropped
        QUEUED_IMAGES.set(self._queued_images)
        if dropped:
            DROPPED_IMAGES.inc(dropped)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            started = time.monotonic()
            delay = started - batch[0].enqueued
            try:
                images = batch[0].images if len(batch) == 1 else np.concatenate([job.images for job in batch])
                embeddings, probabilities = self._infer(images)
            except Exception as error:  # noqa: BLE001 - fail these jobs, keep serving the next ones
                log.exception("inference failed for a batch of %d jobs", len(batch))
                for job in batch:
                    job.future.set_exception(error)
                continue
            self.stats.batches += 1
            self.stats.images += len(images)
            BATCH_IMAGES.observe(len(images))
            QUEUE_DELAY.observe(delay)
            INFERENCE.observe(time.monotonic() - started)
            offset = 0
            for job in batch:
                count = len(job.images)
                job.batch_images, job.queue_seconds = len(images), started - job.enqueued
                job.future.set_result((embeddings[offset:offset + count], probabilities[offset:offset + count]))
                offset += count
