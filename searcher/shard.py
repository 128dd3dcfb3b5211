"""One category's HNSW index (hnswlib, inner product on unit vectors) with its id maps and snapshots.

hnswlib facts that shape this: add_items is not safe alongside knn_query and resize_index is safe with
neither (so every shard has a readers-writer lock); ef is not saved with the index and is global to it
(so a request asking for another ef searches under the write lock); deleted slots are reused only with
allow_replace_deleted; a wrong dimension raises a bare RuntimeError (callers validate before this).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import hnswlib
import numpy as np

from lookalike.searcher.rwlock import ReadWriteLock
from lookalike.serving.cpus import available_cpus

log = logging.getLogger(__name__)

CURRENT = "CURRENT"


@dataclass(frozen=True)
class IndexSettings:
    m: int = 16
    ef_construction: int = 200
    ef: int = 64
    initial_capacity: int = 1024
    # A shard with at most this many items is searched exactly (one matrix product) instead of through
    # the graph, as Qdrant's full_scan_threshold does: as fast at that size, and never misses an item
    # that deletions and replaced slots have left hard for the graph to reach.
    exact_below: int = 2048


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class Shard:
    """The items of one category. Every public method takes the shard's lock itself."""

    def __init__(self, category: str, model_id: str, dimension: int, settings: IndexSettings,
                 index: hnswlib.Index | None = None, part: int = 0, parts: int = 1) -> None:
        self.category = category
        # Sub-shard `part` of `parts` of its category (0 of 1: the whole category).
        self.part, self.parts = part, parts
        self.model_id = model_id
        self.dimension = dimension
        self.settings = settings
        self.lock = ReadWriteLock()
        self.label_of: dict[str, int] = {}
        self.id_of: dict[int, str] = {}
        self.attributes: dict[str, dict[str, str]] = {}
        self.next_label = 0
        # (ids, vectors) of the live items for exact search of a small shard; rebuilt after a change.
        self._dense: tuple[list[str], np.ndarray] | None = None
        # The log position this shard reflects, and the last position that changed its items.
        self.applied_seq = 0
        self.content_seq = 0
        self.snapshot_seq = 0
        self.snapshot_time: float | None = None
        if index is None:
            index = hnswlib.Index(space="ip", dim=dimension)
            index.init_index(max_elements=settings.initial_capacity, ef_construction=settings.ef_construction,
                             M=settings.m, allow_replace_deleted=True, random_seed=100)
        index.set_ef(settings.ef)
        index.set_num_threads(1)
        self.index = index

    # -- writes ------------------------------------------------------------------------------------

    def apply(self, seq: int, removed: Sequence[str] = (), ids: Sequence[str] = (), vectors: np.ndarray | None = None,
              attributes: Sequence[dict[str, str]] = ()) -> None:
        """Removes `removed`, then adds or replaces `ids` (unit vectors of this shard's dimension).

        One write lock for both, so a snapshot sees the whole change at `seq` or none of it.
        """
        with self.lock.writing():
            self._dense = None
            for item_id in removed:
                label = self.label_of.pop(item_id, None)
                if label is not None:
                    del self.id_of[label]
                    self.attributes.pop(item_id, None)
                    self.index.mark_deleted(label)
            if len(ids):
                self._add(ids, vectors, attributes)
            self.applied_seq = max(self.applied_seq, seq)
            self.content_seq = max(self.content_seq, seq)

    def advance(self, seq: int) -> None:
        """Records that the log up to `seq` holds nothing more for this shard."""
        with self.lock.writing():
            self.applied_seq = max(self.applied_seq, seq)

    @property
    def needs_snapshot(self) -> bool:
        return self.snapshot_time is None or self.content_seq > self.snapshot_seq

    def _add(self, ids: Sequence[str], vectors: np.ndarray, attributes: Sequence[dict[str, str]]) -> None:
        existing = [row for row, item_id in enumerate(ids) if item_id in self.label_of]
        fresh = [row for row, item_id in enumerate(ids) if item_id not in self.label_of]
        if existing:
            # In place, never with replace_deleted: hnswlib would move the label into a free slot and
            # leave its old slot live in the graph, so searches would return the item twice.
            labels = [self.label_of[ids[row]] for row in existing]
            self.index.add_items(vectors[existing], np.asarray(labels, dtype=np.int64), num_threads=1)
        if fresh:
            needed = self.index.get_current_count() + len(fresh)
            if needed > self.index.get_max_elements():
                self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
            labels = list(range(self.next_label, self.next_label + len(fresh)))
            self.next_label += len(fresh)
            for row, label in zip(fresh, labels):
                self.label_of[ids[row]] = label
                self.id_of[label] = ids[row]
            # Large batches (bulk indexing, start-up replay) insert on every CPU the pod may use; hnswlib's own
            # parallel insert is safe while we hold the write lock.
            threads = available_cpus() if len(fresh) >= 256 else 1
            self.index.add_items(vectors[fresh], np.asarray(labels, dtype=np.int64), num_threads=threads,
                                 replace_deleted=True)
        for item_id, attrs in zip(ids, attributes):
            self.attributes[item_id] = dict(attrs)

    # -- reads -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.label_of)

    def search(self, vector: np.ndarray, k: int, ef: int) -> list[tuple[str, float, dict[str, str]]]:
        """Up to k (id, cosine similarity, attributes), best first."""
        if len(self.label_of) <= self.settings.exact_below:
            with self.lock.reading():
                if len(self.label_of) <= self.settings.exact_below:
                    return self._exact(vector, k)
        exclusive = ef != self.settings.ef
        with (self.lock.writing() if exclusive else self.lock.reading()):
            count = len(self.label_of)
            if count == 0:
                return []
            k = min(k, count)
            if exclusive:
                self.index.set_ef(ef)
            try:
                labels, distances = self._knn(vector, k)
            finally:
                if exclusive:
                    self.index.set_ef(self.settings.ef)
            return [(self.id_of[int(label)], 1.0 - float(distance), self.attributes[self.id_of[int(label)]])
                    for label, distance in zip(labels[0], distances[0])]

    def _exact(self, vector: np.ndarray, k: int) -> list[tuple[str, float, dict[str, str]]]:
        """Brute force over the live items (the caller holds the read lock)."""
        dense = self._dense
        if dense is None:
            ids = list(self.label_of)
            vectors = (np.asarray(self.index.get_items([self.label_of[i] for i in ids]), dtype=np.float32)
                       if ids else np.zeros((0, self.dimension), np.float32))
            # Readers may build it twice at once; both results are the same, so the race is harmless.
            dense = self._dense = (ids, vectors)
        ids, vectors = dense
        if not ids:
            return []
        similarities = vectors @ vector
        k = min(k, len(ids))
        top = np.argpartition(-similarities, k - 1)[:k]
        top = top[np.argsort(-similarities[top], kind="stable")]
        return [(ids[i], float(similarities[i]), self.attributes[ids[i]]) for i in top]

    def _knn(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # With many deleted slots the graph can yield fewer than k live results, which hnswlib reports
        # as a RuntimeError; asking for fewer keeps the answer correct (best first, possibly < k).
        while True:
            try:
                return self.index.knn_query(vector[None, :], k=k, num_threads=1)
            except RuntimeError:
                if k == 1:
                    return np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)
                k = max(1, k // 2)

    def stats(self) -> dict[str, float]:
        with self.lock.reading():
            live = len(self.label_of)
            capacity = self.index.get_max_elements()
            deleted = self.index.get_current_count() - live
        # hnswlib keeps per slot: the vector, level-0 links (2*M ids), a link count and a label;
        # upper levels add about 1/ln(M) of that for links.
        per_slot = self.dimension * 4 + 2 * self.settings.m * 4 + 4 + 8
        return {"items": live, "deleted": max(deleted, 0), "capacity": capacity,
                "memory_bytes": int(capacity * per_slot * 1.1)}

    # -- snapshots ---------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes index + maps at the shard's applied sequence number, atomically (CURRENT is switched last)."""
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock.reading():
            seq = self.applied_seq
            index_name, meta_name = f"index-{seq}.hnsw", f"meta-{seq}.json"
            staging = directory / (index_name + ".tmp")
            self.index.save_index(str(staging))
            meta = json.dumps({"category": self.category, "part": self.part, "parts": self.parts, "model_id": self.model_id, "dimension": self.dimension,
                               "seq": seq, "next_label": self.next_label, "labels": self.label_of,
                               "attributes": self.attributes, "written_at": time.time()}).encode()
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, directory / index_name)
        _write_durably(directory / (meta_name + ".tmp"), meta)
        os.replace(directory / (meta_name + ".tmp"), directory / meta_name)
        _write_durably(directory / (CURRENT + ".tmp"), json.dumps({"index": index_name, "meta": meta_name}).encode())
        os.replace(directory / (CURRENT + ".tmp"), directory / CURRENT)
        _fsync_dir(directory)
        for stale in directory.iterdir():
            if stale.name not in (CURRENT, index_name, meta_name):
                stale.unlink()
        self.snapshot_seq = seq
        self.snapshot_time = time.time()

    @classmethod
    def load(cls, directory: Path, settings: IndexSettings) -> "Shard | None":
        """The shard as of its last snapshot, or None when there is none."""
        current = directory / CURRENT
        if not current.is_file():
            return None
        names = json.loads(current.read_text())
        meta = json.loads((directory / names["meta"]).read_text())
        index = hnswlib.Index(space="ip", dim=meta["dimension"])
        index.load_index(str(directory / names["index"]), allow_replace_deleted=True)
        shard = cls(meta["category"], meta["model_id"], meta["dimension"], settings, index,
                    meta.get("part", 0), meta.get("parts", 1))
        shard.label_of = {item_id: int(label) for item_id, label in meta["labels"].items()}
        shard.id_of = {label: item_id for item_id, label in shard.label_of.items()}
        shard.attributes = meta["attributes"]
        shard.next_label = meta["next_label"]
        shard.applied_seq = shard.content_seq = shard.snapshot_seq = meta["seq"]
        shard.snapshot_time = meta["written_at"]
        return shard
