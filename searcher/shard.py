"""One category's HNSW index (hnswlib, inner product on unit vectors) with its id maps and snapshots.

hnswlib facts that shape this: add_items is not safe alongside knn_query and resize_index is safe with
neither (so every shard has a readers-writer lock); ef is not saved with the index and is global to it,
but a search keeps max(ef, k) candidates (so a request's larger ef is a larger k, cut back to the k
asked for, with no change to the index); deleted slots are reused only with
allow_replace_deleted; a wrong dimension raises a bare RuntimeError (callers validate before this).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import hnswlib
import numpy as np

from lookalike.searcher.filters import AttributeColumns, AttributeFilter
from lookalike.searcher.rwlock import ReadWriteLock
from lookalike.serving.cpus import available_cpus

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
# What an item without attributes answers with: one shared read-only mapping, not an empty dict per item.
NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


def _label_locks() -> int:
    """How many label locks each hnswlib index allocates: 65,536 in PyPI's build, fewer in the one `make` and
    the searcher image install (third_party/hnswlib/build_wheel.py), whose local version names the count
    (0.8.0+locks1024.savenogil.savechecked)."""
    _, _, local = importlib.metadata.version("hnswlib").partition("+locks")
    count = local.split(".")[0]
    return int(count) if count.isdigit() else 65_536


HNSWLIB_LABEL_LOCKS = _label_locks()


@dataclass(frozen=True)
class IndexSettings:
    m: int = 16
    ef_construction: int = 200
    initial_capacity: int = 1024
    # A shard with at most this many items is searched exactly (one matrix product) instead of through
    # the graph, as Qdrant's full_scan_threshold does: as fast at that size, and never misses an item
    # that deletions and replaced slots have left hard for the graph to reach.
    exact_below: int = 2048
    # Attributes whose values are numbers (checked on Upsert), so filters can compare them as such.
    numeric_attributes: frozenset[str] = frozenset()
    # A filter with at most filter_exact_factor * sqrt(ef * items) matches in a shard is searched exactly
    # (one product with their vectors) rather than through the graph, which skips the rest: the graph then
    # visits about ef / share nodes, so its cost grows as the filter gets selective while the exact cost
    # shrinks with the matches; they cross near that point (measured: `lookalike bench filters`).
    filter_exact_factor: float = 4.0


@dataclass
class ShardAnswer:
    """A shard's hits, best first, as (id, cosine similarity, attributes, product); with a filter, how many
    of its items passed it and whether they were searched exactly."""

    hits: list[tuple[str, float, Mapping[str, str], str]]
    filter_matches: int = 0
    filter_exact: bool = False


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
        # Per item the Python side keeps little (a catalogue is millions of these): the id's label, the label's
        # id (a list by label, None where removed), and attributes and product key only for items that have them.
        self.label_of: dict[str, int] = {}
        self.id_of: list[str | None] = []
        self.attributes: dict[str, dict[str, str]] = {}
        # Product key of each item that has one.
        self.products: dict[str, str] = {}
        self.columns = AttributeColumns(settings.numeric_attributes, self._labelled_attributes)
        # Every label's vector in one matrix, for exact search (a small shard, a selective filter): hnswlib's
        # get_items copies vector by vector, too slow per query. Built on first use, then kept by each write.
        self._by_label: np.ndarray | None = None
        # The log position this shard reflects, and the last position that changed its items.
        self.applied_seq = 0
        self.content_seq = 0
        self.snapshot_seq = 0
        self.snapshot_time: float | None = None
        # The store the last snapshot was taken from (Store.store_id; 0: none, or a snapshot from before ids).
        self.store_id = 0
        if index is None:
            index = hnswlib.Index(space="ip", dim=dimension)
            index.init_index(max_elements=settings.initial_capacity, ef_construction=settings.ef_construction,
                             M=settings.m, allow_replace_deleted=True, random_seed=100)
        # hnswlib searches at max(the index's ef, k); each search asks for its own breadth (see `search`), so
        # the index's ef stays at the minimum rather than imposing a floor on every search.
        index.set_ef(1)
        index.set_num_threads(1)
        self.index = index

    # -- writes ------------------------------------------------------------------------------------

    @property
    def next_label(self) -> int:
        """The label the next new item gets: labels are never reused, so one past the last given."""
        return len(self.id_of)

    def _labelled_attributes(self) -> Iterable[tuple[int, Mapping[str, str]]]:
        return ((label, self.attributes.get(item_id, NO_ATTRIBUTES)) for item_id, label in self.label_of.items())

    def apply(self, seq: int, removed: Sequence[str] = (), ids: Sequence[str] = (), vectors: np.ndarray | None = None,
              attributes: Sequence[dict[str, str]] = (), products: Sequence[str] = ()) -> None:
        """Removes `removed`, then adds or replaces `ids` (unit vectors of this shard's dimension) with their
        attributes and product keys (`products` empty: none).

        One write lock for both, so a snapshot sees the whole change at `seq` or none of it.
        """
        with self.lock.writing():
            for item_id in removed:
                label = self.label_of.pop(item_id, None)
                if label is not None:
                    self.id_of[label] = None
                    self.attributes.pop(item_id, None)
                    self.products.pop(item_id, None)
                    self.columns.clear(label)
                    self.index.mark_deleted(label)
            if len(ids):
                self._add(ids, vectors, attributes, products or [""] * len(ids))
            self.applied_seq = max(self.applied_seq, seq)
            self.content_seq = max(self.content_seq, seq)

    def advance(self, seq: int) -> None:
        """Records that the log up to `seq` holds nothing more for this shard."""
        with self.lock.writing():
            self.applied_seq = max(self.applied_seq, seq)

    @property
    def needs_snapshot(self) -> bool:
        return self.snapshot_time is None or self.content_seq > self.snapshot_seq

    def _add(self, ids: Sequence[str], vectors: np.ndarray, attributes: Sequence[dict[str, str]],
             products: Sequence[str]) -> None:
        if len(set(ids)) < len(ids):
            # The last write of an id repeated in one batch wins; a new id written twice must not take two labels.
            rows = sorted({item_id: row for row, item_id in enumerate(ids)}.values())
            ids, vectors = [ids[row] for row in rows], vectors[rows]
            attributes, products = [attributes[row] for row in rows], [products[row] for row in rows]
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
            for row, label in zip(fresh, labels):
                self.label_of[ids[row]] = label
                self.id_of.append(ids[row])
            # Large batches (bulk indexing, start-up replay) insert on every CPU the pod may use; hnswlib's own
            # parallel insert is safe while we hold the write lock.
            threads = available_cpus() if len(fresh) >= 256 else 1
            self.index.add_items(vectors[fresh], np.asarray(labels, dtype=np.int64), num_threads=threads,
                                 replace_deleted=True)
        if self._by_label is not None:
            labels = np.asarray([self.label_of[item_id] for item_id in ids], dtype=np.int64)
            if self.next_label > len(self._by_label):
                grown = np.zeros((max(self.next_label, 2 * len(self._by_label)), self.dimension), np.float32)
                grown[:len(self._by_label)] = self._by_label
                self._by_label = grown
            self._by_label[labels] = vectors
        for item_id, attrs, product in zip(ids, attributes, products):
            if attrs:
                self.attributes[item_id] = dict(attrs)
            else:
                self.attributes.pop(item_id, None)
            self.columns.set(self.label_of[item_id], attrs)
            if product:
                self.products[item_id] = product
            else:
                self.products.pop(item_id, None)

    # -- reads -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.label_of)

    def search(self, vector: np.ndarray, k: int, ef: int, where: AttributeFilter | None = None) -> ShardAnswer:
        """Up to k hits, best first; with `where`, only items that pass it."""
        if len(self.label_of) <= self.settings.exact_below:
            with self.lock.reading():
                if len(self.label_of) <= self.settings.exact_below:
                    return self._exact(vector, k, where)
        # hnswlib's ef is one setting of the whole index, but a search keeps max(ef, k) candidates and returns
        # the best k: asking for `breadth` results and keeping the best k is the search at that ef, under the
        # read lock, so searches with different ef run concurrently.
        breadth = max(ef, k)
        with self.lock.reading():
            count = len(self.label_of)
            if count == 0:
                return ShardAnswer([])
            passing = self.columns.mask(where) if where is not None else None
            matches = int(passing.sum()) if passing is not None else count
            if passing is not None and (matches <= k or
                                        matches <= self.settings.filter_exact_factor * math.sqrt(breadth * count)):
                return self._exact_among(vector, k, np.flatnonzero(passing), matches)
            labels, distances = self._knn(vector, min(breadth, matches), passing)
            return ShardAnswer([self._hit(self.id_of[label], 1.0 - distance)
                                for label, distance in zip(labels[0][:k].tolist(), distances[0][:k].tolist())],
                               matches if passing is not None else 0)

    def _hit(self, item_id: str, similarity: float) -> tuple[str, float, Mapping[str, str], str]:
        return item_id, similarity, self.attributes.get(item_id, NO_ATTRIBUTES), self.products.get(item_id, "")

    def _exact(self, vector: np.ndarray, k: int, where: AttributeFilter | None) -> ShardAnswer:
        """Brute force over the live items, or those passing `where` (the caller holds the read lock)."""
        passing = self.columns.mask(where) if where is not None else self.columns.live
        labels = np.flatnonzero(passing)
        answer = self._exact_among(vector, k, labels, len(labels))
        return answer if where is not None else ShardAnswer(answer.hits)

    def _exact_among(self, vector: np.ndarray, k: int, labels: np.ndarray, matches: int) -> ShardAnswer:
        """Brute force over the given live labels (the caller holds a lock)."""
        table = self._by_label
        if table is None:
            live = np.fromiter(self.label_of.values(), dtype=np.int64, count=len(self.label_of))
            table = np.zeros((max(self.next_label, 1), self.dimension), np.float32)
            if len(live):
                table[live] = self.index.get_items(live)
            # Readers may build it twice at once; both results are the same, so the race is harmless.
            self._by_label = table
        # Most of the table: one product over all of it (dead rows included) costs less than copying the rows.
        similarities = (table @ vector)[labels] if 2 * len(labels) >= len(table) else table[labels] @ vector
        top = _best(similarities, k)
        return ShardAnswer([self._hit(self.id_of[int(labels[i])], similarity) for i, similarity in top], matches, True)

    def _knn(self, vector: np.ndarray, k: int, passing: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # With many deleted slots (or a filter) the graph can yield fewer than k results, which hnswlib
        # reports as a RuntimeError; asking for fewer keeps the answer correct (best first, possibly < k).
        # hnswlib calls the filter for each label it visits, skipping those that fail it.
        allowed = passing.__getitem__ if passing is not None else None
        while True:
            try:
                return self.index.knn_query(vector[None, :], k=k, num_threads=1, filter=allowed)
            except RuntimeError:
                if k == 1:
                    return np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)
                k = max(1, k // 2)

    def stats(self) -> dict[str, float]:
        with self.lock.reading():
            live = len(self.label_of)
            capacity = self.index.get_max_elements()
            used = self.index.get_current_count()
            deleted = used - live
        # hnswlib keeps per item in use: the vector, level-0 links (2*M ids), a link count and a label (upper
        # levels and the label map add about a tenth); per slot of capacity a lock, a level and a pointer; per
        # index its label locks (40 bytes each).
        per_item = self.dimension * 4 + 2 * self.settings.m * 4 + 4 + 8
        per_slot = 40 + 4 + 8
        per_index = HNSWLIB_LABEL_LOCKS * 40
        table = self._by_label.nbytes if self._by_label is not None else 0
        return {"items": live, "deleted": max(deleted, 0), "capacity": capacity,
                "memory_bytes": int(used * per_item * 1.1) + capacity * per_slot + per_index + table}

    # -- snapshots ---------------------------------------------------------------------------------

    def save(self, directory: Path, store_id: int) -> None:
        """Writes index + maps at the shard's applied sequence number, atomically (CURRENT is switched last),
        naming the store they came from."""
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock.reading():
            seq = self.applied_seq
            # Names no earlier save used: a save at the sequence of the current snapshot (a compacted shard has
            # new labels at the same sequence) that stopped between its files would otherwise leave CURRENT
            # naming the new index beside the old labels.
            token = uuid.uuid4().hex[:8]
            index_name, meta_name = f"index-{seq}-{token}.hnsw", f"meta-{seq}-{token}.json"
            staging = directory / (index_name + ".tmp")
            self.index.save_index(str(staging))
            meta = {"category": self.category, "part": self.part, "parts": self.parts, "model_id": self.model_id,
                    "dimension": self.dimension, "seq": seq, "store_id": store_id, "next_label": self.next_label,
                    "labels": self.label_of, "attributes": self.attributes, "products": self.products,
                    "written_at": time.time()}
            meta_bytes = json.dumps(meta).encode()
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
            handle.seek(0)
            index_digest = hashlib.file_digest(handle, "blake2b").hexdigest()
        os.replace(staging, directory / index_name)
        _write_durably(directory / (meta_name + ".tmp"), meta_bytes)
        os.replace(directory / (meta_name + ".tmp"), directory / meta_name)
        # What was written, as read back from the disk: a snapshot changed since (a flipped bit in a vector or
        # a graph link loads without complaint and answers wrong for good) is rebuilt instead.
        current = {"index": index_name, "index_blake2b": index_digest, "meta": meta_name,
                   "meta_blake2b": hashlib.blake2b(meta_bytes).hexdigest()}
        _write_durably(directory / (CURRENT + ".tmp"), json.dumps(current).encode())
        os.replace(directory / (CURRENT + ".tmp"), directory / CURRENT)
        _fsync_dir(directory)
        for stale in directory.iterdir():
            if stale.name not in (CURRENT, index_name, meta_name):
                stale.unlink()
        self.snapshot_seq = seq
        self.snapshot_time = time.time()
        self.store_id = store_id

    @classmethod
    def load(cls, directory: Path, settings: IndexSettings) -> "Shard | None":
        """The shard as of its last snapshot, or None when there is none."""
        current = directory / CURRENT
        if not current.is_file():
            return None
        names = json.loads(current.read_text())
        meta_bytes = (directory / names["meta"]).read_bytes()
        _check_digest(directory / names["meta"], names.get("meta_blake2b"), hashlib.blake2b(meta_bytes).hexdigest())
        meta = json.loads(meta_bytes)
        with open(directory / names["index"], "rb") as handle:
            _check_digest(directory / names["index"], names.get("index_blake2b"),
                          hashlib.file_digest(handle, "blake2b").hexdigest())
        index = hnswlib.Index(space="ip", dim=meta["dimension"])
        index.load_index(str(directory / names["index"]), allow_replace_deleted=True)
        shard = cls(meta["category"], meta["model_id"], meta["dimension"], settings, index,
                    meta.get("part", 0), meta.get("parts", 1))
        shard.label_of = {item_id: int(label) for item_id, label in meta["labels"].items()}
        shard.id_of = [None] * meta["next_label"]
        for item_id, label in shard.label_of.items():
            shard.id_of[label] = item_id
        # Snapshots written before attributes were kept only when present hold empty ones.
        shard.attributes = {item_id: attrs for item_id, attrs in meta["attributes"].items() if attrs}
        shard.products = meta.get("products", {})  # snapshots written before products had none
        shard.columns.set_live(np.fromiter(shard.label_of.values(), dtype=np.int64, count=len(shard.label_of)))
        shard.applied_seq = shard.content_seq = shard.snapshot_seq = meta["seq"]
        shard.snapshot_time = meta["written_at"]
        shard.store_id = meta.get("store_id", 0)
        return shard


def _check_digest(path: Path, recorded: str | None, actual: str) -> None:
    """Refuses a snapshot file whose bytes are not those written (snapshots from before digests have none)."""
    if recorded is not None and actual != recorded:
        raise ValueError(f"{path}: its BLAKE2b digest is {actual[:16]}..., not the {recorded[:16]}... written")


def _best(similarities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, similarity) of the k highest similarities, best first."""
    k = min(k, len(similarities))
    if k == 0:
        return []
    top = np.argpartition(-similarities, k - 1)[:k]
    top = top[np.argsort(-similarities[top], kind="stable")]
    return [(int(row), float(similarities[row])) for row in top]
