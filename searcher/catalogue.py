"""The searcher's core: a store (SQLite or PostgreSQL) as the source of truth, one HNSW shard per
category derived from its log.

Shards change only by applying the store's log in order, so one path serves every case: a write is
committed (durable), then this searcher applies the log up to it before acknowledging (it serves its
own writes at once); a replica sharing a PostgreSQL store follows other replicas' commits the same way
(woken by NOTIFY, polling when none comes); start-up loads each shard's snapshot and applies the log
after it. A searcher killed at any moment comes back with every acknowledged write and nothing deleted.
Searches never touch the store.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import uuid
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike.routing import PlannedProbe, Routing, merge_hits, plan
from lookalike.serving.errors import FailedPrecondition, InvalidArgument, NotFound
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.shard_metrics import SHARD_PROBES
from lookalike.searcher.shard import IndexSettings, Shard
from lookalike.searcher.store import ItemWrite, LogBatch, Placement, Replica, StoredItem, open_store

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
class CatalogueStats:
    shards: list[dict]
    items: int
    # The last write this searcher has applied, the store's last committed write, and how long the
    # oldest write this searcher has seen committed but not applied has waited (0 when caught up).
    applied_sequence: int
    store_sequence: int
    lag_seconds: float


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
        self.store = open_store(config.store, self.data_dir, DATABASE, config.store_timeout)
        self.shards: dict[str, Shard] = {}
        self.applied_seq = 0
        # Replica groups (a shared store only): this replica serves the categories placed on its group
        # or moving to it, and keeps one that left for move_grace seconds (clients with the old map).
        self.group = config.group
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.placements: dict[str, Placement] = {}
        self._leaving: dict[str, float] = {}
        # One applier of the log at a time; searches never wait for it (shards have their own locks).
        self._apply_mutex = threading.Lock()
        # (sequence, when first seen committed) of writes not yet applied: what lag_seconds reports.
        self._unapplied: deque[tuple[int, float]] = deque()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._load()

    # -- start-up and shutdown ---------------------------------------------------------------------

    def _snapshot_dir(self, category: str) -> Path:
        # Category names are arbitrary strings; folder names must not be.
        return self.data_dir / SNAPSHOTS / hashlib.sha256(category.encode()).hexdigest()[:24]

    def _load(self) -> None:
        started = time.perf_counter()
        head = self.store.head()
        pruned = self.store.pruned_to()
        self.placements = self.store.placements()
        replayed = 0
        for category, (model_id, dimension) in sorted(self.store.shard_locks().items()):
            if not self.serves(category):
                continue
            self.shards[category], rows = self._build(category, model_id, dimension, head, pruned.get(category, 0))
            replayed += rows
        self.applied_seq = head
        log.info("loaded %d shards, %d items (%d rows replayed after snapshots) in %.2fs, at sequence %d",
                 len(self.shards), sum(len(s) for s in self.shards.values()), replayed, time.perf_counter() - started,
                 head)

    def _build(self, category: str, model_id: str, dimension: int, up_to: int, pruned_to: int) -> tuple[Shard, int]:
        """The shard as of log position `up_to`: its snapshot when usable, plus the log after it."""
        shard = None
        try:
            shard = Shard.load(self._snapshot_dir(category), self.settings)
        except Exception:  # noqa: BLE001 - a bad snapshot is rebuilt from the store
            log.exception("snapshot of shard %r is unreadable; rebuilding it from the store", category)
        if shard is not None and not (shard.model_id == model_id and shard.dimension == dimension
                                      and pruned_to <= shard.applied_seq <= up_to):
            # Another model's, older than the removals still on record, or newer than the store (a
            # database restored from an older backup): the store is the truth, so rebuild from it.
            log.info("snapshot of shard %r (sequence %d) does not fit the store (%d, pruned to %d); rebuilding",
                     category, shard.applied_seq, up_to, pruned_to)
            shard = None
        if shard is None:
            shard = Shard(category, model_id, dimension, self.settings)
        since = shard.applied_seq
        removals = self.store.removals_after(category, since, up_to)
        if removals:
            shard.apply(removals[-1].seq, removed=[removal.id for removal in removals])
        replayed = len(removals)
        batch: list[StoredItem] = []
        for item in self.store.items_after(category, since, up_to):
            batch.append(item)
            if len(batch) == 4096:
                self._put(shard, batch)
                replayed += len(batch)
                batch = []
        self._put(shard, batch)
        shard.advance(up_to)
        return shard, replayed + len(batch)

    def serves(self, category: str) -> bool:
        """Whether this replica's group serves `category` (a single searcher over SQLite serves all)."""
        placement = self.placements.get(category)
        return (not self.store.shared or placement is None
                or self.group in (placement.group, placement.moving_to) or category in self._leaving)

    @staticmethod
    def _put(shard: Shard, items: list[StoredItem], removed: Sequence[str] = ()) -> None:
        if items or removed:
            shard.apply(max([i.seq for i in items], default=0), removed=removed, ids=[i.id for i in items],
                        vectors=np.stack([i.vector for i in items]) if items else None,
                        attributes=[i.attributes for i in items])

    def start_background(self) -> None:
        """Snapshots changed shards every snapshot_interval seconds, and follows a shared store."""
        if self._workers:
            return
        if self.store.shared:
            self.heartbeat()  # in the map (and a home for new categories) before serving
        if self.config.snapshot_interval > 0:
            self._workers.append(threading.Thread(target=self._snapshot_loop, name="snapshots", daemon=True))
        if self.store.shared:
            self._workers.append(threading.Thread(target=self._follow_loop, name="follower", daemon=True))
        for worker in self._workers:
            worker.start()

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_interval):
            try:
                self.snapshot()
            except Exception:  # noqa: BLE001 - keep serving; the store still has everything
                log.exception("background snapshot failed")

    def _follow_loop(self) -> None:
        next_heartbeat = 0.0
        while not self._stop.is_set():
            self.store.wait_for_commit(self.config.follow_interval)
            try:
                self.catch_up()
                if time.monotonic() >= next_heartbeat:
                    self.heartbeat()
                    next_heartbeat = time.monotonic() + self.config.follow_interval
            except Exception:  # noqa: BLE001 - keep serving what is applied; the next round retries
                log.exception("following the store failed; retrying in %.1fs", self.config.follow_interval)
                self._stop.wait(self.config.follow_interval)

    def heartbeat(self) -> None:
        """Reports this replica alive with what it serves, then takes up or lets go of moved categories."""
        self.store.heartbeat(Replica(self.replica_id, self.group, self.config.advertise, time.time(),
                                     tuple(sorted(self.shards))))
        placements = self.store.placements()
        locks = self.store.shard_locks()
        pruned = self.store.pruned_to()
        with self._apply_mutex:
            self.placements = placements
            now = time.time()
            for category, placement in sorted(placements.items()):
                mine = self.group in (placement.group, placement.moving_to)
                if mine and category not in self.shards and category in locks:
                    # Moving here: build it from the store up to where this replica is; the log after
                    # that reaches it like any other shard's.
                    log.info("category %r moves to group %r: building it from the store", category, self.group)
                    self.shards[category], _ = self._build(category, *locks[category], self.applied_seq,
                                                           pruned.get(category, 0))
                    self._leaving.pop(category, None)
                elif not mine and category in self.shards:
                    left = self._leaving.setdefault(category, now)
                    if now - left >= self.config.move_grace:
                        log.info("category %r now lives in group %r: dropping it here", category, placement.group)
                        del self.shards[category]
                        del self._leaving[category]
                        shutil.rmtree(self._snapshot_dir(category), ignore_errors=True)
                elif mine:
                    self._leaving.pop(category, None)

    def snapshot(self) -> int:
        """Writes a snapshot of every shard changed since its last one; returns how many were written."""
        written = 0
        # Replicas sharing a store may be behind this one: keep removals they may still need to read.
        older_than = time.time() - self.config.tombstone_retention if self.store.shared else 0.0
        for category, shard in list(self.shards.items()):
            if not shard.needs_snapshot:
                continue
            shard.save(self._snapshot_dir(category))
            self.store.prune_tombstones(category, shard.snapshot_seq, older_than)
            written += 1
        return written

    def close(self) -> None:
        """Stops the background work, takes a final snapshot (fast restarts) and closes the store."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.config.follow_interval + 5)
        self.snapshot()
        self.store.close()

    # -- the log -----------------------------------------------------------------------------------

    def catch_up(self, at_least: int = 0) -> int:
        """Applies the store's log after applied_seq (at least up to `at_least`); returns applied_seq."""
        with self._apply_mutex:
            while True:
                if at_least and self.applied_seq >= at_least:
                    return self.applied_seq
                batch = self.store.changes(self.applied_seq)
                self._saw(batch.store_head)
                self._apply(batch)
                if batch.head >= batch.store_head:
                    return self.applied_seq

    def _saw(self, head: int) -> None:
        if head > max(self.applied_seq, self._unapplied[-1][0] if self._unapplied else 0):
            self._unapplied.append((head, time.time()))

    def _apply(self, batch: LogBatch) -> None:
        for category, pruned_to in batch.pruned.items():
            shard = self.shards.get(category)
            if shard is not None and shard.applied_seq < pruned_to:
                # Removals this shard never saw were pruned (it fell behind the retention): rebuild.
                log.warning("shard %r is behind pruned removals (%d < %d); rebuilding it from the store",
                            category, shard.applied_seq, pruned_to)
                self.shards[category], _ = self._build(category, shard.model_id, shard.dimension, batch.head,
                                                       pruned_to)
        removed: dict[str, list[str]] = defaultdict(list)
        for removal in batch.removals:
            removed[removal.category].append(removal.id)
        placed: dict[str, list[StoredItem]] = defaultdict(list)
        for item in batch.items:
            placed[item.category].append(item)
        # The items table holds each id's latest write, so within a batch a category's removals come
        # before its puts: removals first, then puts, is the log's order.
        if self.store.shared and any(c not in self.placements for c in placed):
            self.placements = self.store.placements()  # new categories: placed in the same transaction
        for category in sorted(set(removed) | set(placed)):
            shard = self.shards.get(category)
            entries = placed.get(category, [])
            if shard is None:
                if not entries or not self.serves(category):
                    continue
                shard = Shard(category, entries[0].model_id, entries[0].vector.shape[0], self.settings)
                self.shards[category] = shard
            self._put(shard, entries, removed.get(category, []))
        for shard in list(self.shards.values()):
            shard.advance(batch.head)
        self.applied_seq = max(self.applied_seq, batch.head)
        while self._unapplied and self._unapplied[0][0] <= self.applied_seq:
            self._unapplied.popleft()

    # -- writes ------------------------------------------------------------------------------------

    def upsert(self, items: Sequence[ItemWrite], names: Sequence[str] = ()) -> tuple[list[ItemOutcome], int]:
        """Stores items durably and serves them before returning; items whose shard is locked to another
        model or dimension are refused one by one. `names` are the items' fields in error messages."""
        outcome = self.store.upsert(items, self.group)
        outcomes = [ItemOutcome() for _ in items]
        for position, (category, (model_id, dimension)) in outcome.refused.items():
            item = items[position]
            name = names[position] if names else f"items[{position}]"
            outcomes[position] = ItemOutcome(FailedPrecondition(
                f"{name} is a {item.vector.shape[0]}-d vector from model {item.model_id!r}, but shard {category!r} "
                f"holds {dimension}-d vectors from model {model_id!r}; re-embed it with {model_id!r} or use a "
                f"separate searcher for the new model"))
        self.catch_up(outcome.seq)
        return outcomes, outcome.seq

    def delete(self, ids: Sequence[str]) -> tuple[int, list[str], int]:
        """Removes ids durably; returns (removed, ids that were not stored, sequence number)."""
        removed, seq = self.store.delete(ids)
        self.catch_up(seq)
        return len(removed), [item_id for item_id in dict.fromkeys(ids) if item_id not in removed], seq

    # -- the shard map -----------------------------------------------------------------------------

    def shard_map(self) -> tuple[list[tuple[str, str, int]], dict[str, Placement], dict[str, tuple[str, int]]]:
        """(groups as (name, target, live replicas), placements, shard locks)."""
        locks = self.store.shard_locks()
        if not self.store.shared:
            return ([(self.group, self.config.advertise, 1)], {c: Placement(self.group) for c in locks}, locks)
        groups: dict[str, list] = {}
        for replica in self.store.live_replicas():
            entry = groups.setdefault(replica.group, [replica.group, replica.target, 0])
            entry[1] = entry[1] or replica.target
            entry[2] += 1
        placements = self.store.placements()
        return [tuple(g) for _, g in sorted(groups.items())], placements, locks  # type: ignore[misc]

    def move(self, category: str, group: str) -> Placement:
        """Starts moving `category` to `group` (see the MoveCategory RPC)."""
        if not category or not group:
            raise InvalidArgument("category and group must both be non-empty")
        if not self.store.shared:
            raise FailedPrecondition("this searcher keeps its items in SQLite: there are no replica groups to move "
                                     "a category between (use --store postgresql://...)")
        if group not in {replica.group for replica in self.store.live_replicas()}:
            raise NotFound(f"group {group!r} has no live replica")
        placement = self.store.move(category, group)
        if placement is None:
            raise NotFound(f"category {category!r} has no shard")
        return placement

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

    def stats(self) -> CatalogueStats:
        rows = []
        now = time.time()
        for category, shard in sorted(self.shards.items()):
            stats = shard.stats()
            rows.append({"category": category, "model_id": shard.model_id, "dimension": shard.dimension,
                         "snapshot_sequence": shard.snapshot_seq,
                         "snapshot_age_seconds": now - shard.snapshot_time if shard.snapshot_time else -1.0,
                         **stats})
        head = self.store.head()
        with self._apply_mutex:
            self._saw(head)
            lag = now - self._unapplied[0][1] if self._unapplied else 0.0
            applied = self.applied_seq
        return CatalogueStats(rows, sum(r["items"] for r in rows), applied, head, max(lag, 0.0))
