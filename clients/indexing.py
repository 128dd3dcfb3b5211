"""Indexing a large labelled catalogue: batches, bounded concurrency, progress, resumable, with a summary."""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, TextIO

import grpc

from lookalike.client.connection import LookalikeError
from lookalike.client.facade import IndexResult, Lookalike

# Refusals every later batch would meet too (after the client's own retries): the run stops at the first
# instead of spending the retries again on each remaining batch.
STOPS_THE_RUN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class CatalogueImage(Protocol):
    """An image file to index with its category and relevance label (lookalike.quality's LabelledImage is one)."""

    @property
    def item_id(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def category(self) -> str: ...

    @property
    def label(self) -> str: ...


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"indexed {self.indexed}, already indexed (skipped) {self.skipped}, failed {len(self.failed)} "
                 f"in {self.seconds:.1f} s"]
        lines += [f"  failed {item_id}: {reason}" for item_id, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more")
        return "\n".join(lines)


class Journal:
    """Images the searcher acknowledged, one per line: the id with what was stored under it (the model that
    embedded it, the file by its absolute path, category or that it was predicted, label) and the file's size and
    mtime, so a changed file, placement, label or model is redone."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.done: set[str] = set()
        if path is None:
            return
        try:  # before anything is stored: a journal that cannot be written would record none of it
            with path.open("a", encoding="utf-8"):
                pass
            self.done = set(path.read_text(encoding="utf-8").splitlines())
        except OSError as error:
            raise OSError(error.errno, f"the journal {path} cannot be written: {error.strerror}") from None

    @staticmethod
    def key(image: CatalogueImage, use_labels: bool, model_id: str) -> str:
        """OSError when the file cannot be read."""
        stat = image.path.stat()
        category = image.category if use_labels else "(predicted)"
        return (f"{image.item_id}\t{model_id}\t{image.path.resolve()}\t{category}\t{image.label}\t{stat.st_size}\t"
                f"{stat.st_mtime_ns}")

    def record(self, keys: Sequence[str]) -> None:
        if self.path is None or not keys:
            return
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(key + "\n" for key in keys))
        self.done.update(keys)


class _Progress:
    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.done, self.failed = total, stream, 0, 0
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._last = 0.0
        self._last_tenth = 0
        self._tty = stream is not None and stream.isatty()

    def advance(self, done: int, failed: int) -> None:
        with self._lock:
            self.done += done
            self.failed += failed
            now = time.perf_counter()
            finished = self.done + self.failed >= self.total
            tenth = int(10 * (self.done + self.failed) / max(self.total, 1))
            # A terminal gets a live bar; a log file a line per tenth of the work.
            due = (now - self._last >= 0.5) if self._tty else tenth > self._last_tenth
            if self.stream is None or not (due or finished):
                return
            self._last, self._last_tenth = now, tenth
            rate = self.done / max(now - self.started, 1e-9)
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            end = "\r" if self._tty and not finished else "\n"
            self.stream.write(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                              f"{rate:.0f} img/s, {self.failed} failed{end}")
            self.stream.flush()


def index_catalogue(lookalike: Lookalike, images: Sequence[CatalogueImage], *, journal: Path | None = None,
                    use_labels: bool = True, batch_size: int = 32, concurrency: int = 2,
                    progress: TextIO | None = sys.stderr) -> IndexSummary:
    """Embeds and stores every image not yet in the journal, `concurrency` batches at a time.

    Idempotent: ids are upserted, and ids the journal records as stored (same model, file, size and mtime) are
    skipped, so an interrupted run resumes where it stopped; an id listed twice is indexed once, from its last
    image. use_labels=False stores each image in its
    predicted category instead of its folder's. A batch that fails is listed in the summary and the run goes
    on, except for a service that is down or refuses the caller (STOPS_THE_RUN): that error is raised once
    the batches already in flight end, and what they stored is in the journal.
    """
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if value < 1:
            raise ValueError(f"{name} is {value}, expected 1 or more")
    started = time.perf_counter()
    record = Journal(journal)
    if record.done and lookalike.searcher.stats().items == 0:
        record.done.clear()  # the searcher was emptied since: the journal no longer says what is stored
    images = list({image.item_id: image for image in images}.values())
    model_id = lookalike.model_id
    keys: dict[str, str] = {}
    unreadable: list[tuple[str, str]] = []
    for image in images:
        try:
            keys[image.item_id] = Journal.key(image, use_labels, model_id)
        except OSError as error:  # listed as failed; the rest of the catalogue goes on
            unreadable.append((image.item_id, f"{type(error).__name__}: {error}"))
    pending = [image for image in images if image.item_id in keys and keys[image.item_id] not in record.done]
    summary = IndexSummary(skipped=len(keys) - len(pending), failed=unreadable)
    meter = _Progress(len(pending), progress)
    batches = [pending[start:start + batch_size] for start in range(0, len(pending), batch_size)]

    stopped: list[LookalikeError] = []

    def run(batch: list[CatalogueImage]) -> IndexResult:
        if stopped:
            return IndexResult()  # not tried: still pending in the journal
        try:
            result = lookalike.index([image.path for image in batch], [image.item_id for image in batch],
                                     categories=[image.category for image in batch] if use_labels else None,
                                     attributes=[{"label": image.label, "path": str(image.path.resolve())}
                                                 for image in batch])
        except Exception as error:  # noqa: BLE001 - one failed batch (an unreadable file, ...) must not stop the catalogue
            if isinstance(error, LookalikeError) and error.code in STOPS_THE_RUN:
                stopped.append(error)
                return IndexResult()
            result = IndexResult(failed=[(image.item_id, f"{type(error).__name__}: {error}") for image in batch])
        record.record([keys[item_id] for item_id in result.indexed])
        meter.advance(len(result.indexed), len(result.failed))
        return result

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for result in pool.map(run, batches):
            summary.indexed += len(result.indexed)
            summary.failed.extend(result.failed)
    if stopped:
        raise stopped[0]
    summary.seconds = time.perf_counter() - started
    return summary
