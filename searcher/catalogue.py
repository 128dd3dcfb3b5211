"""The searcher's core: SQLite as the source of truth, one HNSW shard per category derived from it.

Writes are serialised: commit to SQLite (durable), then apply to the shards. Reads never touch SQLite.
Start-up loads each shard's snapshot and replays the rows written after it, so a searcher killed at any
moment comes back with every acknowledged write and nothing deleted.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike.routing import PlannedProbe, Routing, merge_hits, plan
from lookalike.serving.errors import FailedPrecondition
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.shard_metrics import SHARD_PROBES
from lookalike.searcher.shard import IndexSettings, Shard
from lookalike.searcher.store import ItemWrite, Store

log = logging.getLogger(__name__)

DATABASE = "catalogue.sqlite3"
SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class SearchQuery:
    """A validated search."""

    vector: np.ndarray
    model_id: str
    k: int
    ef: int = 0
    routing: Routing = Routing()


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    similarity: float
    category: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class ProbeReport:
    category: str
    probability: float
    k: int
    ef: int
    items: int
    seconds: float


@dataclass
class SearchOutcome:
    hits: list[Hit] = field(default_factory=list)
    probes: list[ProbeReport] = field(default_factory=list)
    unknown_categories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ItemOutcome:
    """None for stored, else the error for that item."""

    error: Exception | None = None


class Catalogue:
    def __init__(self, config: SearcherConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.settings = IndexSettings(m=config.m, ef_construction=config.ef_construction, ef=config.ef,
                                      initial_capacity=config.initial_capacity)
        self.store = Store(self.data_dir / DATABASE)
        self.shards: dict[str, Shard] = {}
        self._write_mutex = threading.Lock()
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None
        self._load()

    # -- start-up and shutdown ---------------------------------------------------------------------

    def _snapshot_dir(self, category: str) -> Path:
        # Category names are arbitrary strings; folder names must not be.
        return self.data_dir / SNAPSHOTS / hashlib.sha256(category.encode()).hexdigest()[:24]

    def _load(self) -> None:
        started = time.perf_counter()
        replayed = 0
        for category, (model_id, dimension) in sorted(self.store.shard_locks().items()):
            shard = None
            try:
                shard = Shard.load(self._snapshot_dir(category), self.settings)
            except Exception:  # noqa: BLE001 - a bad snapshot is rebuilt from the database
                log.exception("snapshot of shard %r is unreadable; rebuilding it from the database", category)
            if shard is None or shard.model_id != model_id or shard.dimension != dimension:
                shard = Shard(category, model_id, dimension, self.settings)
            since = shard.applied_seq
            removals = self.store.removals_after(category, since)
            if removals:
                shard.apply(removals[-1][1], removed=[item_id for item_id, _ in removals])
            batch: list = []
            for item in self.store.items_after(category, since):
                batch.append(item)
                if len(batch) == 4096:
                    self._apply_stored(shard, batch)
                    replayed += len(batch)
                    batch = []
            self._apply_stored(shard, batch)
            replayed += len(removals) + len(batch)
            self.shards[category] = shard
        log.info("loaded %d shards, %d items (%d rows replayed after snapshots) in %.2fs", len(self.shards),
                 sum(len(s) for s in self.shards.values()), replayed, time.perf_counter() - started)

    @staticmethod
    def _apply_stored(shard: Shard, items: list) -> None:
        if items:
            shard.apply(items[-1].seq, ids=[i.id for i in items], vectors=np.stack([i.vector for i in items]),
                        attributes=[i.attributes for i in items])

    def start_snapshots(self) -> None:
        """Snapshots changed shards every config.snapshot_interval seconds in the background."""
        if self.config.snapshot_interval <= 0 or self._snapshotter is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.config.snapshot_interval):
                try:
                    self.snapshot()
                except Exception:  # noqa: BLE001 - keep serving; the database still has everything
                    log.exception("background snapshot failed")

        self._snapshotter = threading.Thread(target=loop, name="snapshots", daemon=True)
        self._snapshotter.start()

    def snapshot(self) -> int:
        """Writes a snapshot of every shard changed since its last one; returns how many were written."""
        written = 0
        for category, shard in list(self.shards.items()):
            if shard.snapshot_time is not None and shard.applied_seq == shard.snapshot_seq:
                continue
            shard.save(self._snapshot_dir(category))
            with self._write_mutex:
                self.store.prune_tombstones(category, shard.snapshot_seq)
            written += 1
        return written

    def close(self) -> None:
        """Stops background snapshots, takes a final one (fast restarts) and closes the database."""
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        self.snapshot()
        self.store.close()

    # -- writes ------------------------------------------------------------------------------------

    def upsert(self, items: Sequence[ItemWrite]) -> tuple[list[ItemOutcome], int]:
        """Stores valid items durably, then indexes them; items from another model are refused one by one."""
        outcomes = [ItemOutcome() for _ in items]
        with self._write_mutex:
            locks = {c: (s.model_id, s.dimension) for c, s in self.shards.items()}
            new_shards: dict[str, tuple[str, int]] = {}
            accepted = []
            for position, item in enumerate(items):
                wanted = (item.model_id, item.vector.shape[0])
                lock = locks.get(item.category) or new_shards.get(item.category)
                if lock is None:
                    new_shards[item.category] = wanted
                elif lock != wanted:
                    outcomes[position] = ItemOutcome(FailedPrecondition(
                        f"items[{position}] is a {wanted[1]}-d vector from model {wanted[0]!r}, but shard "
                        f"{item.category!r} holds {lock[1]}-d vectors from model {lock[0]!r}; re-embed it with "
                        f"{lock[0]!r} or use a separate searcher for the new model"))
                    continue
                accepted.append(item)
            if not accepted:
                return outcomes, self.store.seq
            original = self.store.categories_of([item.id for item in accepted])
            self.store.upsert(accepted, new_shards, dict(original))
            for category, (model_id, dimension) in new_shards.items():
                self.shards[category] = Shard(category, model_id, dimension, self.settings)
            final = {item.id: item for item in accepted}  # the last write of an id in the request wins
            moved: dict[str, list[str]] = defaultdict(list)
            placed: dict[str, list[ItemWrite]] = defaultdict(list)
            for item in final.values():
                old = original.get(item.id)
                if old is not None and old != item.category:
                    moved[old].append(item.id)
                placed[item.category].append(item)
            for category in set(moved) | set(placed):
                entries = placed.get(category, [])
                self.shards[category].apply(
                    self.store.seq, removed=moved.get(category, []), ids=[e.id for e in entries],
                    vectors=np.stack([e.vector for e in entries]) if entries else None,
                    attributes=[e.attributes for e in entries])
            return outcomes, self.store.seq

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str], int]:
        """Removes ids durably; returns (removed, ids that were not stored, sequence number)."""
        with self._write_mutex:
            found = self.store.categories_of(list(dict.fromkeys(ids)))
            missing = [item_id for item_id in dict.fromkeys(ids) if item_id not in found]
            if not found:
                return 0, missing, self.store.seq
            seq = self.store.delete(found)
            by_category: dict[str, list[str]] = defaultdict(list)
            for item_id, category in found.items():
                by_category[category].append(item_id)
            for category, members in by_category.items():
                self.shards[category].apply(seq, removed=members)
            return len(found), missing, seq

    # -- reads -------------------------------------------------------------------------------------

    def search(self, query: SearchQuery) -> SearchOutcome:
        shards = dict(self.shards)  # a consistent view while writers may add shards
        ef = query.ef or self.config.ef
        routed = plan(query.routing, shards, self.config.routing_threshold, self.config.routing_max_shards)
        for probe in routed.probes:
            shard = shards[probe.category]
            if (shard.model_id, shard.dimension) != (query.model_id, query.vector.shape[0]):
                raise FailedPrecondition(
                    f"the query is a {query.vector.shape[0]}-d vector from model {query.model_id!r}, but shard "
                    f"{probe.category!r} holds {shard.dimension}-d vectors from model {shard.model_id!r}")
        outcome = SearchOutcome(unknown_categories=list(routed.unknown_categories))
        candidates: list[Hit] = []
        for probe in routed.probes:
            candidates.extend(self._probe(shards[probe.category], probe, query, ef, outcome))
        outcome.hits = merge_hits(candidates, query.k)
        return outcome

    def _probe(self, shard: Shard, probe: PlannedProbe, query: SearchQuery, ef: int,
               outcome: SearchOutcome) -> list[Hit]:
        SHARD_PROBES.labels(shard.category).inc()
        started = time.perf_counter()
        found = shard.search(query.vector, query.k, ef)
        # hnswlib never searches with an ef below k.
        outcome.probes.append(ProbeReport(probe.category, probe.probability, query.k, max(ef, query.k),
                                          len(shard), time.perf_counter() - started))
        return [Hit(item_id, similarity + probe.prior, similarity, shard.category, attributes)
                for item_id, similarity, attributes in found]

    def stats(self) -> tuple[list[dict], int, int]:
        """(per-shard stats, total items, last sequence number)."""
        rows = []
        now = time.time()
        for category, shard in sorted(self.shards.items()):
            stats = shard.stats()
            rows.append({"category": category, "model_id": shard.model_id, "dimension": shard.dimension,
                         "snapshot_sequence": shard.snapshot_seq,
                         "snapshot_age_seconds": now - shard.snapshot_time if shard.snapshot_time else -1.0,
                         **stats})
        return rows, sum(r["items"] for r in rows), self.store.seq
