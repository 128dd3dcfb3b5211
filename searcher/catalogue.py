"""The searcher's core: a store (SQLite or PostgreSQL) as the source of truth, one HNSW shard per
category (or per part of a category split by a hash of item id) derived from its log.

Shards change only by applying the store's log in order, so one path serves every case: a write is
committed (durable), then this searcher applies the log up to it before acknowledging (it serves its
own writes at once); a replica sharing a PostgreSQL store follows other replicas' commits the same way
(woken by NOTIFY, polling when none comes); start-up loads each shard's snapshot and applies the log
after it. A searcher killed at any moment comes back with every acknowledged write and nothing deleted.
Searches never touch the store.

With a shared store, replicas run in groups: the shard map (store placements) says which group serves
each shard; a replica holds its group's shards, builds those moving to it or being split into it, and
lets go of those that left after a grace period.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TextIO, TypeVar

import numpy as np

from lookalike.routing import PlannedProbe, Routing, merge_hits, merge_products, part_of, plan
from lookalike.serving.cpus import available_cpus
from lookalike.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.filters import AttributeFilter
from lookalike.searcher.shard_metrics import SHARD_PROBES
from lookalike.searcher.shard import IndexSettings, Shard
from lookalike.searcher.store import (ItemWrite, LogBatch, Placement, Removal, Replica, ShardKey, StoredItem,
                                      open_store)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DATABASE = "catalogue.sqlite3"
SNAPSHOTS = "snapshots"
# Photos each shard returns per product wanted at first (distinct_products searches), and the most it returns
# however the products crowd it: a bound on one request's work, documented in the proto.
PRODUCT_DEPTH = 4
MAX_PRODUCT_DEPTH = 4096
# A shard is rebuilt with labels for its live items only once it has given out more than twice as many labels
# as it holds items, plus this many (labels are never reused, and the exact-search table, the id list and
# the filter columns are sized by label: without it, memory grew with every item ever added).
COMPACT_SLACK_LABELS = 1024


def _lock_data_dir(data_dir: Path) -> TextIO:
    """The data folder's lock, held while the catalogue is open: two searchers over one folder would write each
    other's snapshots and each miss the other's writes. OSError naming the folder when another holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "LOCK", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OSError(f"another searcher is using the data folder {data_dir} (its LOCK file is held): give each "
                      "searcher its own --data") from None
    return handle


def in_lanes(pool: Executor | None, lanes: int, items: Sequence[T], work: Callable[[T], R]) -> list[R]:
    """[work(item) for item in items], the items dealt into `lanes` lanes run by `pool` (None: in this thread).
    `work` must not itself wait on the pool (its threads may all be running lanes).

    hnswlib and numpy release the GIL while they search, so lanes use every core one request alone would
    leave idle. A lane per thread rather than a task per item: handing a 0.2 ms search to another thread
    costs a good part of it (measured: 20 shards at ef 64, 3.2 ms a query one task each, 2.5 ms in two
    lanes). The request's own thread waits rather than running a lane itself: measured through gRPC
    (global search over 20 shards), alike with one client, 0-10% slower with eight.
    """
    def lane(part: Sequence[T]) -> list[R]:
        return [work(item) for item in part]

    lanes = min(lanes, len(items))
    if pool is None or lanes < 2:
        return lane(items)
    by_lane = list(pool.map(lane, [items[number::lanes] for number in range(lanes)]))
    # Back in the order of `items`: lane n holds items n, n + lanes, n + 2 * lanes, ...
    return [by_lane[position % lanes][position // lanes] for position in range(len(items))]


@dataclass(frozen=True)
class SearchQuery:
    """A validated search."""

    vector: np.ndarray
    model_id: str
    k: int
    ef: int = 0
    routing: Routing = Routing()
    where: AttributeFilter | None = None
    distinct_products: bool = False


# Hit and ProbeReport are made for every answer (a search of k makes k hits): not frozen, since a frozen
# dataclass sets each field through object.__setattr__ (6x the time of a slotted one's plain assignment).
@dataclass(slots=True)
class Hit:
    id: str
    score: float
    similarity: float
    category: str
    attributes: Mapping[str, str]
    product: str = ""
    # With distinct_products: how many of the product's photos were among the candidates.
    product_matches: int = 0


@dataclass(slots=True)
class ProbeReport:
    category: str
    probability: float
    k: int
    ef: int
    items: int
    seconds: float
    part: int = 0
    parts: int = 1
    filter_matches: int = 0
    filter_exact: bool = False


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
        self.settings = IndexSettings(m=config.m, ef_construction=config.ef_construction,
                                      initial_capacity=config.initial_capacity, exact_below=config.exact_below,
                                      numeric_attributes=config.numeric_attribute_names,
                                      filter_exact_factor=config.filter_exact_factor)
        self.routing = config.routing_defaults()
        self._data_lock = _lock_data_dir(self.data_dir)
        try:
            self.store = open_store(config.store, self.data_dir, DATABASE, config.store_timeout)
        except BaseException:
            self._data_lock.close()
            raise
        self.store_id = self.store.store_id()
        self.shards: dict[ShardKey, Shard] = {}
        # Every category's model lock this replica knows of, served here or not: a category missing
        # from it is new, so its first items need no earlier ones to be built from.
        self.locks: dict[str, tuple[str, int]] = {}
        self.applied_seq = 0
        self.group = config.group
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.placements: list[Placement] = []
        # Shards no longer this group's, still served until move_grace passes (clients with an old map).
        self._leaving: dict[ShardKey, float] = {}
        # One applier of the log at a time; searches never wait for it (shards have their own locks).
        self._apply_mutex = threading.Lock()
        # (sequence, when first seen committed) of writes not yet applied: what lag_seconds reports.
        self._unapplied: deque[tuple[int, float]] = deque()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        # One snapshot pass at a time: two saving one shard would delete each other's files (shutdown's
        # final pass waits here for a background pass that outlasted its join).
        self._snapshot_lock = threading.Lock()
        self._probe_lanes = config.probe_threads or available_cpus()
        self._probe_pool = (ThreadPoolExecutor(self._probe_lanes, thread_name_prefix="probe")
                            if self._probe_lanes > 1 else None)
        # Told (started, stopped) whenever the categories this replica serves change: the server's per-shard
        # health names follow them. Told outside _apply_mutex (a health update may wait on its watchers'
        # streams, which must never hold up writes), one announcement at a time so they arrive in order.
        self.on_categories: Callable[[set[str], set[str]], None] | None = None
        self._announced: set[str] = set()
        self._announce_lock = threading.Lock()
        self._load()

    # -- which shards are held here ----------------------------------------------------------------

    def _snapshot_dir(self, key: ShardKey) -> Path:
        category, part, parts = key
        # Names are arbitrary strings; folder names must not be. A whole category keeps its old folder.
        name = category if parts == 1 else json.dumps([category, part, parts])
        return self.data_dir / SNAPSHOTS / hashlib.sha256(name.encode()).hexdigest()[:24]

    def _wanted(self) -> set[ShardKey]:
        """The shards this replica should hold: all of them over SQLite; else its group's, and those
        moving to it or being built in it (a category with no placement yet is held everywhere)."""
        if not self.store.shared:
            return {(category, 0, 1) for category in self.locks}
        placed = {placement.category for placement in self.placements}
        wanted = {p.key for p in self.placements if self.group in (p.group, p.moving_to)}
        return wanted | {(category, 0, 1) for category in self.locks if category not in placed}

    def _search_keys(self, shards: Iterable[ShardKey]) -> dict[str, list[ShardKey]]:
        """category -> the shards among `shards` that a search of it probes: those of its serving layout
        (the whole category, or the parts of a finished split), never parts still being built."""
        serving = {p.category: p.parts for p in self.placements if not p.building}
        keys: dict[str, list[ShardKey]] = defaultdict(list)
        for key in sorted(shards):
            if key[2] == serving.get(key[0], 1):
                keys[key[0]].append(key)
        return keys

    # -- start-up and shutdown ---------------------------------------------------------------------

    def _load(self) -> None:
        started = time.perf_counter()
        head = self.store.head()
        self.locks = self.store.shard_locks()
        self.placements = self.store.placements()
        replayed = 0
        for key in sorted(self._wanted()):
            if key[0] in self.locks:
                self.shards[key], rows = self._build(key, head)
                replayed += rows
        self.applied_seq = head
        # Snapshots of shards not built here are of categories the store does not know (a database restored
        # from a backup, or replaced): left, one would pass for current once its category's log grows past it.
        kept = {self._snapshot_dir(key).name for key in self.shards}
        for folder in (self.data_dir / SNAPSHOTS).glob("*"):
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)
        log.info("loaded %d shards, %d items (%d rows replayed after snapshots) in %.2fs, at sequence %d",
                 len(self.shards), sum(len(s) for s in self.shards.values()), replayed, time.perf_counter() - started,
                 head)

    def _build(self, key: ShardKey, up_to: int) -> tuple[Shard, int]:
        """The shard as of log position `up_to`: its snapshot when usable, plus the log after it."""
        category, part, parts = key
        model_id, dimension = self.locks[category]
        shard = None
        try:
            shard = Shard.load(self._snapshot_dir(key), self.settings)
        except Exception:  # noqa: BLE001 - a bad snapshot is rebuilt from the store
            log.exception("snapshot of shard %r is unreadable; rebuilding it from the store", key)
        if shard is not None and not ((shard.category, shard.part, shard.parts) == key and shard.model_id == model_id
                                      and shard.dimension == dimension and shard.applied_seq <= up_to
                                      and shard.store_id == self.store_id):
            # Another shard's, model's or database's, or newer than the store (a database restored from an
            # older backup): the store is the truth, so rebuild.
            log.info("snapshot of shard %r (sequence %d) does not fit the store (at %d); rebuilding", key,
                     shard.applied_seq, up_to)
            shard = None
        if shard is None:
            shard = Shard(category, model_id, dimension, self.settings, part=part, parts=parts)
        return self._replay(shard, key, up_to)

    def _replay(self, shard: Shard, key: ShardKey, up_to: int) -> tuple[Shard, int]:
        """`shard` brought from its applied sequence to `up_to` from the store (removals, then items), and the rows
        replayed. A shard older than its category's pruned removals is replaced by one filled from the items."""
        category, part, parts = key
        since = shard.applied_seq
        removals = self.store.removals_after(category, since, up_to)
        pruned_to = self.store.pruned_to().get(category, 0)  # read after the removals: covers any pruned before
        if 0 < since < pruned_to:
            # Removals after the snapshot are gone (pruned before this build read them, perhaps by another
            # replica meanwhile): the snapshot could keep deleted items, so build from the items alone.
            log.info("snapshot of shard %r (sequence %d) is older than its pruned removals (%d); rebuilding", key,
                     since, pruned_to)
            shard = Shard(category, shard.model_id, shard.dimension, self.settings, part=part, parts=parts)
            since, removals = 0, []
        if removals:  # removing an id the shard does not hold is a no-op, so no need to filter by part
            self._put(shard, [], [removal.id for removal in removals], removals[-1].seq)
        replayed = len(removals)
        batch: list[StoredItem] = []
        for item in self.store.items_after(category, since, up_to):
            if part_of(item.id, parts) != part:
                continue
            batch.append(item)
            if len(batch) == 4096:
                self._put(shard, batch)
                replayed += len(batch)
                batch = []
        self._put(shard, batch)
        shard.advance(up_to)
        return shard, replayed + len(batch)

    @staticmethod
    def _put(shard: Shard, items: list[StoredItem], removed: Sequence[str] = (), seq: int = 0,
             short_of: int | None = None) -> None:
        """Applies removals then items; `seq` is the log position they reach (default: the last item's). With
        `short_of`, the position of a removal still to be applied to the shard, they reach just before it: a
        snapshot taken before that removal must not claim it (the removal would be lost for good), and a
        replay from there puts the items again, which changes nothing."""
        if items or removed:
            reached = max([seq, *(i.seq for i in items)]) if short_of is None else short_of - 1
            shard.apply(reached, removed=removed, ids=[i.id for i in items],
                        vectors=np.stack([i.vector for i in items]) if items else None,
                        attributes=[i.attributes for i in items], products=[i.product for i in items])

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
            self._workers.append(threading.Thread(target=self._alive_loop, name="heartbeat", daemon=True))
        for worker in self._workers:
            worker.start()

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_interval):
            try:
                self.compact()
                self.snapshot()
            except Exception:  # noqa: BLE001 - keep serving; the store still has everything
                log.exception("background snapshot failed")

    def _follow_loop(self) -> None:
        next_placements = 0.0
        while not self._stop.is_set():
            self.store.wait_for_commit(self.config.follow_interval)
            try:
                self.catch_up()
                if time.monotonic() >= next_placements:
                    self.follow_placements()
                    next_placements = time.monotonic() + self.config.follow_interval
            except Exception:  # noqa: BLE001 - keep serving what is applied; the next round retries
                log.exception("following the store failed; retrying in %.1fs", self.config.follow_interval)
                self._stop.wait(self.config.follow_interval)

    def _alive_loop(self) -> None:
        # Its own thread: the follower waits on the apply lock, which a burst of writes holds for tens of
        # seconds on 2 cores (measured: heartbeats 38-93 s apart under 24 bulk writers, past
        # Store.LIVE_SECONDS), and the shard map took a busy, healthy group's replicas for gone.
        while not self._stop.wait(self.config.follow_interval):
            try:
                self.report_alive()
            except Exception:  # noqa: BLE001 - the next round retries; the map drops a replica silent too long
                log.exception("reporting this replica alive failed; retrying in %.1fs", self.config.follow_interval)

    def heartbeat(self) -> None:
        """Reports this replica alive, then follows the placements (see follow_placements)."""
        self.report_alive()
        self.follow_placements()

    def report_alive(self) -> None:
        """Records this replica alive with what it serves; the store completes the moves and splits every live
        replica of their group now serves. Takes no lock of this catalogue."""
        self.store.heartbeat(Replica(self.replica_id, self.group, self.config.advertise, time.time(),
                                     tuple(sorted(self.shards))))

    def follow_placements(self) -> None:
        """Takes up shards moving or split into this group, lets go of those that left it; splits a category of
        its group that outgrew max_shard_items."""
        placements = self.store.placements()
        locks = self.store.shard_locks()
        with self._apply_mutex:
            self.placements = placements
            self.locks.update(locks)
            arriving = [key for key in sorted(self._wanted() - set(self.shards)) if key[0] in self.locks]
            built_at = self.applied_seq
        # Built outside the apply lock (a whole category read from the store: minutes for a large one), so
        # this replica keeps applying the log, acknowledging writes and reporting alive meanwhile.
        built: dict[ShardKey, Shard] = {}
        for key in arriving:
            log.info("building shard %r for group %r from the store", key, self.group)
            built[key], _ = self._build(key, built_at)
        with self._apply_mutex:
            wanted = self._wanted()
            for key, shard in built.items():
                if key in wanted and key not in self.shards:
                    # The log applied while it was built; after this, the log reaches it like any other shard.
                    self.shards[key], _ = self._replay(shard, key, self.applied_seq)
            now = time.time()
            for key in sorted(set(self.shards) - wanted):
                if now - self._leaving.setdefault(key, now) >= self.config.move_grace:
                    log.info("shard %r is no longer group %r's: dropping it", key, self.group)
                    del self.shards[key]
                    del self._leaving[key]
                    shutil.rmtree(self._snapshot_dir(key), ignore_errors=True)
            for key in wanted & set(self._leaving):
                del self._leaving[key]
        self.announce_categories()
        self._split_oversized()

    def _split_oversized(self) -> None:
        limit = self.config.max_shard_items
        if not limit:
            return
        splitting = {p.category for p in self.placements if p.building}
        for placement in self.placements:
            shard = self.shards.get(placement.key)
            if (placement.parts == 1 and placement.group == self.group and not placement.moving_to
                    and placement.category not in splitting and shard is not None and len(shard) > limit):
                parts = math.ceil(2 * len(shard) / limit)  # each part about half full, room to grow
                log.info("category %r holds %d items, over %d: splitting it into %d parts", placement.category,
                         len(shard), limit, parts)
                self.store.split(placement.category, parts)

    def compact(self) -> int:
        """Rebuilds from the store each shard whose labels are mostly of removed items, with labels for its live
        items only; returns how many. Built outside the apply lock, then brought up to the log applied meanwhile
        and swapped in, so searches and writes go on."""
        compacted = 0
        for key, shard in list(self.shards.items()):
            if shard.next_label <= 2 * len(shard) + COMPACT_SLACK_LABELS:
                continue
            with self._apply_mutex:
                built_at = self.applied_seq
            fresh = Shard(key[0], shard.model_id, shard.dimension, self.settings, part=key[1], parts=key[2])
            fresh, _ = self._replay(fresh, key, built_at)
            with self._apply_mutex:
                if self.shards.get(key) is shard:
                    log.info("shard %r: %d labels given for %d items; rebuilt with %d", key, shard.next_label,
                             len(shard), len(fresh))
                    self.shards[key], _ = self._replay(fresh, key, self.applied_seq)
                    compacted += 1
        return compacted

    def snapshot(self) -> int:
        """Writes a snapshot of every shard changed since its last one; returns how many were written."""
        written = 0
        # Replicas sharing a store may be behind this one: keep removals they may still need to read.
        older_than = time.time() - self.config.tombstone_retention if self.store.shared else 0.0
        with self._snapshot_lock:
            for key, shard in list(self.shards.items()):
                if not shard.needs_snapshot:
                    continue
                shard.save(self._snapshot_dir(key), self.store_id)
                self.store.prune_tombstones(key[0], shard.snapshot_seq, older_than)
                written += 1
        return written

    def close(self) -> None:
        """Stops the background work, takes a final snapshot (fast restarts) and closes the store."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.config.follow_interval + 5)
        try:
            self.snapshot()
        finally:  # a snapshot that cannot be written costs a slower start, not the store's orderly close
            self.store.close()
            if self._probe_pool is not None:
                self._probe_pool.shutdown(wait=True)
            self._data_lock.close()

    # -- the log -----------------------------------------------------------------------------------

    def catch_up(self, at_least: int = 0) -> int:
        """Applies the store's log after applied_seq (at least up to `at_least`); returns applied_seq."""
        with self._apply_mutex:
            while True:
                if at_least and self.applied_seq >= at_least:
                    break
                batch = self.store.changes(self.applied_seq)
                if batch.store_head < self.applied_seq:
                    self._rebuild_all(batch.store_head)
                    continue
                self._saw(batch.store_head)
                self._apply(batch)
                if batch.head >= batch.store_head:
                    break
            applied = self.applied_seq
        self.announce_categories()
        return applied

    def _rebuild_all(self, store_head: int) -> None:
        """The store's log ends before what this replica applied: its later writes are gone (a failover that
        lost commits, a database restored under a running searcher), and the next writes will reuse their
        sequence numbers. Every shard is rebuilt from the store's items, its snapshots deleted (they hold
        the lost writes, and would pass for current once the log grows past them)."""
        log.error("the store's log ends at sequence %d, before this replica's %d: writes after it were lost by the "
                  "store; rebuilding every shard from it", store_head, self.applied_seq)
        with self._snapshot_lock:  # a snapshot pass under way would write a deleted folder back
            for key in list(self.shards):
                shutil.rmtree(self._snapshot_dir(key), ignore_errors=True)
                self.shards[key], _ = self._build(key, store_head)
        self.applied_seq = store_head
        self._unapplied.clear()

    def announce_categories(self) -> None:
        """Tells on_categories every category served now that it has not been told of yet (and any it was
        told of that is no longer served). Not to be called holding _apply_mutex."""
        with self._announce_lock:
            with self._apply_mutex:
                serving = {category for category, _, _ in self.shards}
            if self.on_categories is not None and serving != self._announced:
                self.on_categories(serving - self._announced, self._announced - serving)
                self._announced = serving

    def _saw(self, head: int) -> None:
        if head > max(self.applied_seq, self._unapplied[-1][0] if self._unapplied else 0):
            self._unapplied.append((head, time.time()))

    def _apply(self, batch: LogBatch) -> None:
        for key, shard in list(self.shards.items()):
            pruned_to = batch.pruned.get(key[0], 0)
            if shard.applied_seq < pruned_to:
                # Removals this shard never saw were pruned (it fell behind the retention): rebuild.
                log.warning("shard %r is behind pruned removals (%d < %d); rebuilding it from the store",
                            key, shard.applied_seq, pruned_to)
                self.shards[key], _ = self._build(key, batch.head)
        new = {item.category: (item.model_id, int(item.vector.shape[0])) for item in batch.items
               if item.category not in self.locks}
        if new:
            self.locks.update(new)
            if self.store.shared:
                self.placements = self.store.placements()  # placed in the same transaction as their first items
            for key in self._wanted():
                if key[0] in new and key not in self.shards:
                    # New in this batch: nothing before it to build from.
                    self.shards[key] = Shard(key[0], *self.locks[key[0]], self.settings, part=key[1], parts=key[2])
        placed: dict[str, list[StoredItem]] = defaultdict(list)
        for item in batch.items:
            placed[item.category].append(item)
        # An id moved to another category leaves its old shard only once it is in the new one: a search
        # between the two finds it twice (merge_hits keeps one) rather than nowhere (searches in flight missed
        # it about once in a thousand while it moved back and forth).
        category_of = {item.id: item.category for item in batch.items}
        removed: dict[str, list[str]] = defaultdict(list)
        moved_away: dict[str, list[Removal]] = defaultdict(list)
        for removal in batch.removals:
            if category_of.get(removal.id, removal.category) != removal.category:
                moved_away[removal.category].append(removal)
            else:
                removed[removal.category].append(removal.id)
        # The items table holds each id's latest write, so within a batch a category's removals come
        # before its puts: removals first, then puts, is the log's order.
        for key, shard in sorted(self.shards.items()):
            category, part, parts = key
            if category in removed or category in placed:
                entries = [item for item in placed.get(category, []) if part_of(item.id, parts) == part]
                later = moved_away.get(category)
                self._put(shard, entries, removed.get(category, []), batch.head,
                          short_of=min(r.seq for r in later) if later else None)
        for key, shard in sorted(self.shards.items()):
            if key[0] in moved_away:
                self._put(shard, [], [r.id for r in moved_away[key[0]]], batch.head)
        for shard in list(self.shards.values()):
            shard.advance(batch.head)
        self.applied_seq = max(self.applied_seq, batch.head)
        while self._unapplied and self._unapplied[0][0] <= self.applied_seq:
            self._unapplied.popleft()

    # -- writes ------------------------------------------------------------------------------------

    def upsert(self, items: Sequence[ItemWrite], names: Sequence[str] = (),
               replace_products: Sequence[str] = (), carried: Sequence[str] = ()) -> tuple[list[ItemOutcome], int]:
        """Stores items durably and serves them before returning; items whose shard is locked to another
        model or dimension, or that name a new category past max_categories, are refused one by one. `names`
        are the items' fields in error messages. The stored photos of `replace_products` that `items` does not
        write again are removed in the same write, except the ids in `carried` (items of the request refused
        before they got here)."""
        outcome = self.store.upsert(items, self.group, replace_products, carried, self.config.max_categories)
        outcomes = [ItemOutcome() for _ in items]
        names = names or [f"items[{position}]" for position in range(len(items))]
        for position, (category, (model_id, dimension)) in outcome.refused.items():
            item, name = items[position], names[position]
            outcomes[position] = ItemOutcome(FailedPrecondition(
                f"{name} is a {item.vector.shape[0]}-d vector from model {item.model_id!r}, but shard {category!r} "
                f"holds {dimension}-d vectors from model {model_id!r}; re-embed it with {model_id!r} or use a "
                f"separate searcher for the new model"))
        for position in outcome.over_category_limit:
            outcomes[position] = ItemOutcome(ResourceExhausted(
                f"{names[position]}.category {items[position].category!r} would be a new category, but this searcher "
                f"holds its limit of {self.config.max_categories} (max_categories); use an existing category"))
        # An id written again later in the request (only that write was stored or refused) shares its outcome.
        last = {item.id: position for position, item in enumerate(items)}
        for position, item in enumerate(items):
            error = outcomes[last[item.id]].error
            if last[item.id] != position and error is not None:
                outcomes[position] = ItemOutcome(type(error)(
                    f"{names[position]}.id {item.id!r} is written again by {names[last[item.id]]}, refused: {error}"))
        self.catch_up(outcome.seq)
        return outcomes, outcome.seq

    def delete(self, ids: Sequence[str], products: Sequence[str] = ()) -> tuple[int, list[str], int]:
        """Removes ids, and every photo of `products`, durably; returns (removed, the ids and products that
        were not stored, sequence number)."""
        removed, found_products, seq = self.store.delete(ids, products)
        self.catch_up(seq)
        missing = [item_id for item_id in dict.fromkeys(ids) if item_id not in removed]
        return len(removed), missing + [p for p in dict.fromkeys(products) if p not in found_products], seq

    # -- the shard map -----------------------------------------------------------------------------

    def shard_map(self) -> tuple[list[tuple[str, str, int]], list[Placement], dict[str, tuple[str, int]]]:
        """(groups as (name, target, live replicas), placements, shard locks)."""
        locks = self.store.shard_locks()
        if not self.store.shared:
            return [(self.group, self.config.advertise, 1)], [Placement(c, self.group) for c in sorted(locks)], locks
        groups: dict[str, list] = {}
        for replica in self.store.live_replicas():
            entry = groups.setdefault(replica.group, [replica.group, replica.target, 0])
            entry[1] = entry[1] or replica.target
            entry[2] += 1
        return [tuple(g) for _, g in sorted(groups.items())], self.store.placements(), locks  # type: ignore[misc]

    def move(self, category: str, group: str) -> Placement:
        """Starts moving a whole `category` to `group` (see the MoveCategory RPC)."""
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
        if placement.parts != 1 or placement.building:
            raise FailedPrecondition(f"category {category!r} is split (or being split) into parts that live in "
                                     "several groups; only a whole category moves")
        return placement

    # -- reads -------------------------------------------------------------------------------------

    def search(self, query: SearchQuery) -> SearchOutcome:
        """The query's best k over the shards its routing picks, its shards searched in the probe lanes."""
        shards = dict(self.shards)  # a consistent view while the log adds shards
        return self._search(query, shards, self._search_keys(shards), spread=True)

    def _search(self, query: SearchQuery, shards: Mapping[ShardKey, Shard], keys: Mapping[str, list[ShardKey]],
                spread: bool) -> SearchOutcome:
        """search() over this view of the shards; `spread` False: the shards one after another, in this thread."""
        ef = max(query.ef, self.config.ef)  # a request may widen the search, never narrow it
        routed = plan(query.routing, keys, self.routing.threshold, self.routing.max_shards, self.routing.prior_weight)
        for probe in routed.probes:
            for key in keys[probe.category]:
                shard = shards[key]
                if (shard.model_id, shard.dimension) != (query.model_id, query.vector.shape[0]):
                    raise FailedPrecondition(
                        f"model_id {query.model_id!r} with a {query.vector.shape[0]}-d vector: shard "
                        f"{probe.category!r} holds {shard.dimension}-d vectors from model {shard.model_id!r}, "
                        "expected a query from that model")
        # Distinct products: each shard returns PRODUCT_DEPTH times k photos, deeper while some shard may
        # hold more and fewer than k products were found (a product's photos crowd the top).
        depth = query.k * PRODUCT_DEPTH if query.distinct_products else query.k
        while True:
            outcome = SearchOutcome(unknown_categories=list(routed.unknown_categories))
            candidates: list[Hit] = []
            may_hold_more = False
            tasks = [(shards[key], probe) for probe in routed.probes for key in keys[probe.category]]
            screen = self.config.screen_from_shards
            if not query.distinct_products and screen and len(tasks) >= screen:
                results = self._screened_probes(tasks, query, ef, spread)
            else:
                results = self._probes(tasks, query, ef, depth, spread)
            for found, report in results:
                outcome.probes.append(report)
                candidates.extend(found)
                may_hold_more |= len(found) == depth
            if not query.distinct_products:
                # One shard's answer is already best first, each id once.
                outcome.hits = candidates if len(results) == 1 else merge_hits(candidates, query.k)
                return outcome
            products = merge_products(candidates, query.k)
            if len(products) == query.k or not may_hold_more or depth >= MAX_PRODUCT_DEPTH:
                outcome.hits = [dataclasses.replace(hit, product_matches=photos) for hit, photos in products]
                return outcome
            depth = min(depth * 4, MAX_PRODUCT_DEPTH)

    def search_many(self, queries: Sequence[SearchQuery]) -> list[SearchOutcome | ServiceError]:
        """Each query's outcome, or the error that ended it. The queries are spread over the probe lanes (each
        searching its own shards one after another): a batch of one-shard queries uses every core, as one
        query over many shards does."""
        shards = dict(self.shards)  # one view for the whole batch
        keys = self._search_keys(shards)

        def outcome(query: SearchQuery) -> SearchOutcome | ServiceError:
            try:
                return self._search(query, shards, keys, spread=False)
            except ServiceError as error:
                return error

        return self._in_lanes(queries, outcome)

    def _in_lanes(self, items: Sequence[T], work: Callable[[T], R]) -> list[R]:
        """in_lanes over the probe pool: a lane per probe thread."""
        return in_lanes(self._probe_pool, self._probe_lanes, items, work)

    def _probes(self, tasks: list[tuple[Shard, PlannedProbe]], query: SearchQuery, ef: int,
                depth: int, spread: bool = True) -> list[tuple[list[Hit], ProbeReport]]:
        def probe(task: tuple[Shard, PlannedProbe]) -> tuple[list[Hit], ProbeReport]:
            return self._probe(*task, query, ef, depth)

        return self._in_lanes(tasks, probe) if spread else [probe(task) for task in tasks]

    def _screened_probes(self, tasks: list[tuple[Shard, PlannedProbe]], query: SearchQuery,
                         ef: int, spread: bool) -> list[tuple[list[Hit], ProbeReport]]:
        """Many shards for one query's k: most of them hold none of its best k, yet each would be searched at
        full ef. Every shard is first searched at screen_ef_fraction of ef; the shards holding any of the
        merged best k are then searched again at full ef (their screening may have missed their other
        good items), and the rest keep their screening answer, whose best is already below the k-th."""
        screen_ef = max(query.k, round(ef * self.config.screen_ef_fraction))
        results = self._probes(tasks, query, screen_ef, query.k, spread)
        best = {id(hit) for hit in merge_hits([hit for found, _ in results for hit in found], query.k)}
        # (A shard small enough to be searched exactly has nothing more to give.)
        holders = [position for position, (found, _) in enumerate(results)
                   if len(tasks[position][0]) > self.config.exact_below and any(id(hit) in best for hit in found)]
        for position, (found, report) in zip(holders, self._probes([tasks[p] for p in holders], query, ef, query.k,
                                                                    spread)):
            results[position] = found, dataclasses.replace(report, seconds=report.seconds + results[position][1].seconds)
        return results

    def _probe(self, shard: Shard, probe: PlannedProbe, query: SearchQuery, ef: int,
               depth: int) -> tuple[list[Hit], ProbeReport]:
        SHARD_PROBES.labels(shard.category).inc()
        started = time.perf_counter()
        found = shard.search(query.vector, depth, ef, query.where)
        # hnswlib never searches with an ef below k.
        report = ProbeReport(probe.category, probe.probability, depth, max(ef, depth), len(shard),
                             time.perf_counter() - started, shard.part, shard.parts, found.filter_matches,
                             found.filter_exact)
        return [Hit(item_id, similarity + probe.prior, similarity, shard.category, attributes, product)
                for item_id, similarity, attributes, product in found.hits], report

    def stats(self) -> CatalogueStats:
        rows = []
        now = time.time()
        for (category, part, parts), shard in sorted(self.shards.items()):
            stats = shard.stats()
            rows.append({"category": category, "part": part, "parts": parts, "model_id": shard.model_id,
                         "dimension": shard.dimension, "snapshot_sequence": shard.snapshot_seq,
                         "snapshot_age_seconds": now - shard.snapshot_time if shard.snapshot_time else -1.0,
                         **stats})
        head = self.store.head()
        with self._apply_mutex:
            self._saw(head)
            lag = now - self._unapplied[0][1] if self._unapplied else 0.0
            applied = self.applied_seq
        return CatalogueStats(rows, sum(r["items"] for r in rows), applied, head, max(lag, 0.0))
