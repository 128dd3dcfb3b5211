"""The source of truth for items: SQLite (the embedded default) or PostgreSQL (replicas share it).

One schema and one log in both. Every write gets a sequence number under a writers' lock (SQLite:
BEGIN IMMEDIATE; PostgreSQL: a transaction-level advisory lock), so numbers commit in order and a
reader that sees number N committed has every write up to N. `items` holds each id's latest write,
`tombstones` the removals (a delete, or an item moving category), `shards` each category's model lock.
Index snapshots record the number they contain; every searcher applies the log after it, at start-up
and then as it follows new commits (lookalike.searcher.catalogue).
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lookalike.routing import rendezvous_owner
from lookalike.serving.errors import Unavailable

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    vector {blob} NOT NULL,
    attributes TEXT NOT NULL,
    model_id TEXT NOT NULL,
    seq {integer} NOT NULL,
    product TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS items_by_category_seq ON items (category, seq);
CREATE INDEX IF NOT EXISTS items_by_seq ON items (seq);
CREATE TABLE IF NOT EXISTS tombstones (
    seq {integer} PRIMARY KEY,
    id TEXT NOT NULL,
    category TEXT NOT NULL,
    written_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tombstones_by_category_seq ON tombstones (category, seq);
CREATE TABLE IF NOT EXISTS shards (
    category TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    pruned_to {integer} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value {integer} NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    category TEXT NOT NULL,
    part INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    group_name TEXT NOT NULL,
    moving_to TEXT NOT NULL DEFAULT '',
    building INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (category, parts, part)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    group_name TEXT NOT NULL,
    target TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    serving TEXT NOT NULL
);
"""
# Created after the migrations, which add the column to databases written before products.
_PRODUCT_INDEX = "CREATE INDEX IF NOT EXISTS items_by_product ON items (product) WHERE product <> ''"
_CHUNK = 500  # ids per IN (...) list


class StoreUnavailable(Unavailable):
    """The store cannot be reached; the request may succeed on a retry (UNAVAILABLE)."""


@dataclass(frozen=True)
class ItemWrite:
    """A validated item to store: unit-length float32 vector."""

    id: str
    category: str
    vector: np.ndarray
    attributes: dict[str, str]
    model_id: str
    # Product key; empty: the item is a product of its own.
    product: str = ""


@dataclass(frozen=True)
class StoredItem(ItemWrite):
    """An item as stored, with the sequence number of its last write."""

    seq: int = 0


@dataclass(frozen=True)
class Removal:
    id: str
    category: str
    seq: int


@dataclass
class LogBatch:
    """The log after a sequence number, up to `head`, read in one consistent snapshot."""

    head: int
    # The last committed write when it was read: past `head` when the batch was capped.
    store_head: int
    items: list[StoredItem] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    # Categories whose tombstones were pruned past the reader's position: their shards must be rebuilt.
    pruned: dict[str, int] = field(default_factory=dict)


ShardKey = tuple[str, int, int]  # (category, part, parts): parts 1 is the whole category


@dataclass(frozen=True)
class Placement:
    """Where one shard (a category, or one part of a split category) lives."""

    category: str
    group: str
    part: int = 0
    parts: int = 1
    # The group the shard is moving to, while a move is under way; empty otherwise.
    moving_to: str = ""
    # A part of a split still being built: its category is served whole until every part is built.
    building: bool = False

    @property
    def key(self) -> ShardKey:
        return (self.category, self.part, self.parts)


@dataclass(frozen=True)
class Replica:
    id: str
    group: str
    target: str
    seen_at: float
    # Shards it has built and serves.
    serving: tuple[ShardKey, ...]


@dataclass(frozen=True)
class UpsertOutcome:
    # Position in the request -> (category, (model_id, dimension) the shard is locked to) for refused items.
    refused: dict[int, tuple[str, tuple[str, int]]]
    seq: int
    # Positions of items naming a new category past max_categories, refused too.
    over_category_limit: tuple[int, ...] = ()


class Store(ABC):
    """The SQL both engines share; subclasses give the connection, the writers' lock and the dialect."""

    blob, integer, placeholder = "BLOB", "INTEGER", "?"
    # True where other searcher processes write to the same store (so this one must follow it).
    shared = False

    # -- what an engine provides -------------------------------------------------------------------

    @abstractmethod
    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """A connection inside a write transaction that holds the writers' lock; commits on exit."""

    @abstractmethod
    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """A connection inside a read transaction with one consistent snapshot."""

    def _notify(self, conn: Any, seq: int) -> None:
        """Wakes followers once the write commits (PostgreSQL only)."""

    def wait_for_commit(self, timeout: float) -> bool:
        """Blocks until another writer commits or `timeout` passes; False where the engine cannot tell."""
        time.sleep(timeout)
        return False

    @abstractmethod
    def close(self) -> None: ...

    # -- shared SQL --------------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)

    def _run(self, conn: Any, text: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self._sql(text), params)

    def _create_schema(self, conn: Any) -> None:
        for statement in _SCHEMA.format(blob=self.blob, integer=self.integer).split(";"):
            if statement.strip():
                conn.execute(statement)
        self._run(conn, "INSERT INTO counters (name, value) VALUES ('seq', 0) ON CONFLICT (name) DO NOTHING")
        # Which database this is: a snapshot names the one it was taken from (see store_id).
        self._run(conn, "INSERT INTO counters (name, value) VALUES ('store_id', ?) ON CONFLICT (name) DO NOTHING",
                  (secrets.randbits(62) + 1,))

    def store_id(self) -> int:
        """A number drawn when the database was created: a database created again (a PostgreSQL cluster
        re-created under replicas that keep their disks) starts its sequence again, and snapshots of the old
        one would pass for current once its log grew past them."""
        with self._reading() as conn:
            return self._counter(conn, "store_id")

    def head(self) -> int:
        """The sequence number of the last committed write."""
        with self._reading() as conn:
            return self._head(conn)

    def _head(self, conn: Any) -> int:
        return self._counter(conn, "seq")

    def _counter(self, conn: Any, name: str) -> int:
        return int(self._run(conn, "SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    def shard_locks(self) -> dict[str, tuple[str, int]]:
        """category -> (model_id, dimension) for every shard ever created."""
        with self._reading() as conn:
            return self._locks(conn)

    def _locks(self, conn: Any) -> dict[str, tuple[str, int]]:
        return {c: (m, int(d)) for c, m, d in self._run(conn, "SELECT category, model_id, dimension FROM shards")}

    def pruned_to(self) -> dict[str, int]:
        """category -> the last sequence number whose tombstones were pruned."""
        with self._reading() as conn:
            return {c: int(p) for c, p in self._run(conn, "SELECT category, pruned_to FROM shards")}

    def _placed(self, conn: Any, column: str, values: Sequence[str]) -> list[tuple[str, str, str]]:
        """(id, category, product) of the stored items whose `column` ("id" or "product") is in `values`."""
        # The product index leaves out items without a product; saying so lets SQLite use it.
        extra = " AND product <> ''" if column == "product" else ""
        rows: list[tuple[str, str, str]] = []
        for start in range(0, len(values), _CHUNK):
            chunk = list(values[start:start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows += self._run(conn, f"SELECT id, category, product FROM items WHERE {column} IN ({marks}){extra}",
                              chunk).fetchall()
        return rows

    def _categories_of(self, conn: Any, ids: Sequence[str]) -> dict[str, str]:
        return {item_id: category for item_id, category, _ in self._placed(conn, "id", ids)}

    _ITEM_COLUMNS = "id, category, vector, attributes, model_id, product, seq"

    @staticmethod
    def _item(row: Sequence[Any]) -> StoredItem:
        item_id, category, vector, attributes, model_id, product, seq = row
        return StoredItem(item_id, category, np.frombuffer(bytes(vector), dtype="<f4"), json.loads(attributes),
                          model_id, product, int(seq))

    def items_after(self, category: str, after: int, up_to: int, page: int = 4096) -> Iterator[StoredItem]:
        """A category's items written in (after, up_to], in write order; read `page` at a time, each page in its
        own read transaction, so that a slow reader (a shard of millions of items built into hnswlib) holds up
        no writer (SQLite's one connection is locked while a transaction is open). Pages agree with each other:
        a write after the first page gets a sequence past up_to, so rows can only leave the pages still to read
        (rewritten or deleted later), and the log after up_to, which the caller reads next, carries them."""
        while True:
            with self._reading() as conn:
                rows = list(self._run(conn, f"SELECT {self._ITEM_COLUMNS} FROM items WHERE category = ? AND seq > ? "
                                            f"AND seq <= ? ORDER BY seq LIMIT {int(page)}", (category, after, up_to)))
            for row in rows:
                yield self._item(row)
            if len(rows) < page:
                return
            after = int(rows[-1][-1])

    def removals_after(self, category: str, after: int, up_to: int) -> list[Removal]:
        """A category's removals in (after, up_to], in write order."""
        with self._reading() as conn:
            return [Removal(i, category, int(s)) for i, s in self._run(
                conn, "SELECT id, seq FROM tombstones WHERE category = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (category, after, up_to))]

    def changes(self, after: int, limit: int = 20_000) -> LogBatch:
        """The log in (after, after + limit], capped at the last committed write."""
        with self._reading() as conn:
            head = self._head(conn)
            up_to = min(head, after + limit)
            batch = LogBatch(head=up_to, store_head=head)
            if up_to > after:
                batch.items = [self._item(row) for row in self._run(
                    conn, f"SELECT {self._ITEM_COLUMNS} FROM items WHERE seq > ? AND seq <= ? ORDER BY seq",
                    (after, up_to))]
                batch.removals = [Removal(i, c, int(s)) for i, c, s in self._run(
                    conn, "SELECT id, category, seq FROM tombstones WHERE seq > ? AND seq <= ? ORDER BY seq",
                    (after, up_to))]
            batch.pruned = {c: int(p) for c, p in self._run(
                conn, "SELECT category, pruned_to FROM shards WHERE pruned_to > ?", (after,))}
            return batch

    # -- writes (one transaction each, durable when they return) -----------------------------------

    def upsert(self, items: Sequence[ItemWrite], home_group: str = "default",
               replace_products: Sequence[str] = (), carried: Sequence[str] = (),
               max_categories: int = 0) -> UpsertOutcome:
        """Stores items (replacing by id) unless their shard is locked to another model or dimension, or
        they name a new category when max_categories (0: no limit) exist.

        An item that changes category leaves a tombstone in its old category. A repeated id in one
        request: the last write wins, and the earlier ones have no effect (the caller reports its outcome). A new category is placed on a live replica group by rendezvous
        hashing (on `home_group` when none is live), in the same transaction. The stored photos of
        `replace_products` that `items` does not write again are removed in the same transaction, except the
        ids in `carried` (a request's items refused before they got here: the request still carries them).
        """
        with self._writing() as conn:
            locks = self._locks(conn)
            previous = self._categories_of(conn, list(dict.fromkeys(item.id for item in items)))
            seq = self._head(conn)
            refused: dict[int, tuple[str, tuple[str, int]]] = {}
            over_category_limit: list[int] = []
            new_shards, rows, tombstones = [], [], []
            now = time.time()
            rewritten = {item.id for item in items} | set(carried)
            replaced = {item_id: category for item_id, category, _ in self._placed(conn, "product", replace_products)
                        if item_id not in rewritten}
            for item_id, category in replaced.items():
                seq += 1
                tombstones.append((seq, item_id, category, now))
            # A repeated id: only its last write is stored, so only it may create or lock a category (an earlier
            # one, dropped, left an empty category behind, locked to its model).
            last = {item.id: position for position, item in enumerate(items)}
            for position, item in enumerate(items):
                if last[item.id] != position:
                    continue
                wanted = (item.model_id, int(item.vector.shape[0]))
                lock = locks.get(item.category)
                if lock is None and max_categories and len(locks) >= max_categories:
                    over_category_limit.append(position)
                    continue
                if lock is None:
                    locks[item.category] = wanted
                    new_shards.append((item.category, *wanted))
                elif lock != wanted:
                    refused[position] = (item.category, lock)
                    continue
                old_category = previous.get(item.id)
                if old_category is not None and old_category != item.category:
                    seq += 1
                    tombstones.append((seq, item.id, old_category, now))
                seq += 1
                rows.append((item.id, item.category, item.vector.astype("<f4").tobytes(), json.dumps(item.attributes),
                             item.model_id, item.product, seq))
            if replaced:
                self._executemany(conn, "DELETE FROM items WHERE id = ?", [(item_id,) for item_id in replaced])
            if rows or replaced:
                self._executemany(conn, "INSERT INTO shards (category, model_id, dimension) VALUES (?, ?, ?)",
                                  new_shards)
                groups = self._live_groups(conn) or [home_group]
                self._executemany(conn, "INSERT INTO placements (category, part, parts, group_name) VALUES (?, 0, 1, ?) "
                                        "ON CONFLICT (category, parts, part) DO NOTHING",
                                  [(category, rendezvous_owner(category, groups)) for category, _, _ in new_shards])
                self._executemany(conn, "INSERT INTO tombstones (seq, id, category, written_at) VALUES (?, ?, ?, ?)",
                                  tombstones)
                self._executemany(
                    conn, "INSERT INTO items (id, category, vector, attributes, model_id, product, seq) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT (id) DO UPDATE SET category = excluded.category, vector = excluded.vector, "
                          "attributes = excluded.attributes, model_id = excluded.model_id, "
                          "product = excluded.product, seq = excluded.seq", rows)
                self._save_seq(conn, seq)
            return UpsertOutcome(refused, seq, tuple(over_category_limit))

    def delete(self, ids: Sequence[str], products: Sequence[str] = ()) -> tuple[dict[str, str], set[str], int]:
        """Deletes the ids, and every photo of the products, that are stored; returns (id -> category
        removed, the products that had photos, last sequence number)."""
        with self._writing() as conn:
            found = self._categories_of(conn, list(dict.fromkeys(ids)))
            photos = self._placed(conn, "product", products)
            found.update((item_id, category) for item_id, category, _ in photos)
            found_products = {product for _, _, product in photos}
            seq = self._head(conn)
            if not found:
                return found, found_products, seq
            now = time.time()
            tombstones = []
            for item_id, category in found.items():
                seq += 1
                tombstones.append((seq, item_id, category, now))
            self._executemany(conn, "DELETE FROM items WHERE id = ?", [(item_id,) for item_id in found])
            self._executemany(conn, "INSERT INTO tombstones (seq, id, category, written_at) VALUES (?, ?, ?, ?)",
                              tombstones)
            self._save_seq(conn, seq)
            return found, found_products, seq

    def prune_tombstones(self, category: str, up_to_seq: int, older_than: float = 0.0) -> None:
        """Forgets a category's removals up to `up_to_seq` written before `older_than` (unix time; 0: any).

        Records how far it pruned: a snapshot older than that is stale and its shard is rebuilt.
        """
        with self._writing() as conn:
            clause = " AND written_at < ?" if older_than else ""
            params = (category, up_to_seq, older_than) if older_than else (category, up_to_seq)
            row = self._run(conn, f"SELECT MAX(seq) FROM tombstones WHERE category = ? AND seq <= ?{clause}",
                            params).fetchone()
            if row[0] is None:
                return
            self._run(conn, "DELETE FROM tombstones WHERE category = ? AND seq <= ?", (category, int(row[0])))
            self._run(conn, "UPDATE shards SET pruned_to = ? WHERE category = ? AND pruned_to < ?",
                      (int(row[0]), category, int(row[0])))

    # -- the shard map -----------------------------------------------------------------------------

    # A replica that has not reported for this long is taken as gone.
    LIVE_SECONDS = 15.0

    def _live_groups(self, conn: Any) -> list[str]:
        return [g for (g,) in self._run(conn, "SELECT DISTINCT group_name FROM replicas WHERE seen_at > ?",
                                        (time.time() - self.LIVE_SECONDS,))]

    def placements(self) -> list[Placement]:
        with self._reading() as conn:
            return self._placements(conn)

    def _placements(self, conn: Any, category: str | None = None) -> list[Placement]:
        where, params = (" WHERE category = ?", (category,)) if category is not None else ("", ())
        return [Placement(c, g, int(p), int(n), m, bool(b)) for c, p, n, g, m, b in self._run(
            conn, f"SELECT category, part, parts, group_name, moving_to, building FROM placements{where} "
                  "ORDER BY category, parts, part", params)]

    def live_replicas(self) -> list[Replica]:
        with self._reading() as conn:
            return [Replica(i, g, t, float(s), tuple(tuple(k) for k in json.loads(v))) for i, g, t, s, v in self._run(
                conn, "SELECT id, group_name, target, seen_at, serving FROM replicas WHERE seen_at > ? ORDER BY id",
                (time.time() - self.LIVE_SECONDS,))]

    def heartbeat(self, replica: Replica) -> None:
        """Records that a replica is alive, where its group is reached and what it serves; then completes
        the moves and splits whose new shards every live replica of their group now serves."""
        with self._writing() as conn:
            self._run(conn, "INSERT INTO replicas (id, group_name, target, seen_at, serving) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (id) DO UPDATE SET group_name = excluded.group_name, target = excluded.target, "
                            "seen_at = excluded.seen_at, serving = excluded.serving",
                      (replica.id, replica.group, replica.target, replica.seen_at,
                       json.dumps([list(key) for key in replica.serving])))
            # Forget replicas long gone, so the table does not grow with every restart.
            self._run(conn, "DELETE FROM replicas WHERE seen_at < ?", (time.time() - 100 * self.LIVE_SECONDS,))
            serving: dict[str, list[set[ShardKey]]] = {}
            for group, keys in self._run(conn, "SELECT group_name, serving FROM replicas WHERE seen_at > ?",
                                         (time.time() - self.LIVE_SECONDS,)):
                serving.setdefault(group, []).append({tuple(key) for key in json.loads(keys)})

            def ready(key: ShardKey, group: str) -> bool:
                return bool(serving.get(group)) and all(key in held for held in serving[group])

            placements = self._placements(conn)
            for placement in placements:
                if placement.moving_to and ready(placement.key, placement.moving_to):
                    self._run(conn, "UPDATE placements SET group_name = moving_to, moving_to = '' WHERE category = ? "
                                    "AND part = ? AND parts = ?", placement.key)
            splitting = {p.category for p in placements if p.building}
            for category in splitting:
                parts = [p for p in placements if p.category == category and p.building]
                if all(ready(p.key, p.group) for p in parts):
                    self._run(conn, "DELETE FROM placements WHERE category = ? AND building = 0", (category,))
                    self._run(conn, "UPDATE placements SET building = 0 WHERE category = ?", (category,))

    def move(self, category: str, group: str) -> Placement | None:
        """Starts moving a whole category to `group` (None: the category has no placement). A category being
        split is not moved: one of its new parts is returned, for the caller to refuse."""
        with self._writing() as conn:
            current = self._placements(conn, category)
            building = [p for p in current if p.building]
            if building:
                return building[0]
            if len(current) != 1 or current[0].parts != 1:
                return None if not current else current[0]
            moving_to = "" if current[0].group == group else group
            self._run(conn, "UPDATE placements SET moving_to = ? WHERE category = ? AND parts = 1", (moving_to, category))
            return dataclasses.replace(current[0], moving_to=moving_to)

    def split(self, category: str, parts: int) -> list[Placement]:
        """Starts splitting a whole category into `parts` sub-shards by hash of id, each placed on a live
        group by rendezvous hashing; the whole category keeps serving until every part is built."""
        with self._writing() as conn:
            current = self._placements(conn, category)
            if len(current) == 1 and current[0].parts == 1 and not current[0].moving_to and parts > 1:
                groups = self._live_groups(conn) or [current[0].group]
                self._executemany(conn, "INSERT INTO placements (category, part, parts, group_name, building) "
                                        "VALUES (?, ?, ?, ?, 1)",
                                  [(category, part, parts, rendezvous_owner(f"{category}#{part}", groups))
                                   for part in range(parts)])
            return self._placements(conn, category)

    def _executemany(self, conn: Any, text: str, rows: list[tuple]) -> None:
        if rows:
            conn.cursor().executemany(self._sql(text), rows)

    def _save_seq(self, conn: Any, seq: int) -> None:
        # Persisted, not derived from MAX(seq): deleting the newest item must never let a number be reused.
        self._run(conn, "UPDATE counters SET value = ? WHERE name = 'seq'", (seq,))
        self._notify(conn, seq)


class SqliteStore(Store):
    """An embedded SQLite file (WAL, synchronous=FULL): one searcher process owns it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's threads, so every use holds this lock.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before Upsert/Delete acknowledge it, even if the machine dies.
        self._db.execute("PRAGMA synchronous=FULL")
        with self._writing() as conn:
            self._create_schema(conn)
            self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # Databases written before replication lack these columns; the defaults are what they meant.
        columns = {row[1] for row in conn.execute("PRAGMA table_info(shards)")}
        if "pruned_to" not in columns:
            conn.execute("ALTER TABLE shards ADD COLUMN pruned_to INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tombstones)")}
        if "written_at" not in columns:
            conn.execute("ALTER TABLE tombstones ADD COLUMN written_at DOUBLE PRECISION NOT NULL DEFAULT 0")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
        if "product" not in columns:  # databases written before products
            conn.execute("ALTER TABLE items ADD COLUMN product TEXT NOT NULL DEFAULT ''")
        conn.execute(_PRODUCT_INDEX)

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


# libpq settings of every connection to the store. A database host that vanishes (a failover, a partition)
# leaves connections that neither answer nor close: a replica's follower waited on one for as long as the
# kernel keeps retrying (about 15 minutes; 2 hours on an idle one), holding the lock every write waits for.
# With these a silent connection fails within about 30 s and the next try takes a new one.
CONNECTION_SETTINGS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                       "tcp_user_timeout": 30_000}


# What the server says when it refuses a connection that no retry will make: libpq gives a refused connection
# no SQLSTATE, only the server's message. (Not "too many clients" or "starting up": those pass.)
REFUSALS_FOR_GOOD = ("does not exist", "authentication failed", "no pg_hba.conf entry", "permission denied")


class PostgresStore(Store):
    """A PostgreSQL database shared by every searcher replica (psycopg 3 with a connection pool)."""

    blob, integer, placeholder = "BYTEA", "BIGINT", "%s"
    shared = True
    # pg_advisory_xact_lock key of the writers' lock (any constant; "lkal" in ASCII).
    WRITERS_LOCK = 0x6C6B616C
    CHANNEL = "lookalike_log"

    def __init__(self, dsn: str, pool_size: int = 4, connect_timeout: float = 30.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._psycopg = psycopg
        self._failures = (psycopg.OperationalError, PoolTimeout)
        self.dsn = dsn
        first_try = self._refuse_at_once(dsn, connect_timeout)
        # check: a connection the server closed while it sat in the pool (a restart of the database) is
        # replaced before it is handed out, rather than failing the request that got it.
        self._pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=True, name="lookalike-store",
                                    timeout=connect_timeout, check=ConnectionPool.check_connection,
                                    kwargs={**CONNECTION_SETTINGS, "connect_timeout": max(2, round(connect_timeout))})
        self._listener: Any = None
        try:
            self._pool.wait(timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(f"could not connect to the PostgreSQL store at {_where(dsn)} within "
                                   f"{connect_timeout:.0f}s (first try: {first_try})") from None
        try:
            with self._writing() as conn:
                # Under the writers' lock: replicas starting together must not race to create the tables.
                # The product index is the schema's last change, made in the same transaction as the rest:
                # where it exists the schema is current, and nothing is created or altered, so a role with
                # only SELECT, INSERT, UPDATE and DELETE on the tables can run the searcher (CREATE ... IF NOT
                # EXISTS and ALTER still need the privileges to create and own them).
                if conn.execute("SELECT to_regclass('items_by_product')").fetchone()[0] is None:
                    self._create_schema(conn)
                    conn.execute("ALTER TABLE items ADD COLUMN IF NOT EXISTS product TEXT NOT NULL DEFAULT ''")
                    conn.execute(_PRODUCT_INDEX)
        except psycopg.Error as error:  # a role that may not create tables in the database, say
            self._pool.close()
            raise StoreUnavailable(f"cannot set up the tables of the PostgreSQL store at {_where(dsn)}: "
                                   f"{_first_line(error)}") from None

    def _refuse_at_once(self, dsn: str, connect_timeout: float) -> str:
        """Connects once, directly: what the server refuses (a wrong password, a database or role that does not
        exist) and a DSN libpq cannot read fail here at once with their own message, where the pool would retry
        them for the whole timeout and then say only that it timed out. A server not reachable yet (starting
        beside the searcher) is left to the pool's retries; returns what this try met."""
        try:
            # 2 s, libpq's least: a host that does not answer is the pool's to wait for, within connect_timeout.
            self._psycopg.connect(dsn, connect_timeout=2, **CONNECTION_SETTINGS).close()
        except self._psycopg.OperationalError as error:
            if any(reason in str(error) for reason in REFUSALS_FOR_GOOD):
                raise StoreUnavailable(f"the PostgreSQL store at {_where(dsn)} refused the connection: "
                                       f"{_first_line(error)}") from None
            return _first_line(error)
        except self._psycopg.Error as error:  # a DSN libpq cannot read (an unknown parameter, say)
            raise ValueError(f"store: {_first_line(error)}") from None
        return "connected"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._failures as error:
            # Not the caller's fault and possibly brief (a failover of the database): retryable.
            raise StoreUnavailable(f"the PostgreSQL store at {_where(self.dsn)} is unreachable: "
                                   f"{_first_line(error)}") from error
        except self._psycopg.errors.UndefinedTable as error:
            # Was INTERNAL on every call: the database was dropped and created again, or restored empty, under
            # running searchers. Only a start sets the tables up (and rebuilds from what the store then holds).
            raise StoreUnavailable(f"the PostgreSQL store at {_where(self.dsn)} has lost its tables "
                                   f"({_first_line(error)}): was the database created again? Restart the "
                                   "searchers to set it up") from error

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        with self._connection() as conn, conn.transaction():
            # Read committed whatever the database's default: each statement after the lock must see the
            # writes committed before it was granted (a repeatable-read default took its snapshot at the lock's
            # statement, and concurrent writers read a stale counter and failed or collided).
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.WRITERS_LOCK,))
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        with self._connection() as conn, conn.transaction():
            # One snapshot for the whole read: the head and the rows below it agree.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    def _notify(self, conn: Any, seq: int) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self.CHANNEL, str(seq)))

    def wait_for_commit(self, timeout: float) -> bool:
        """Waits for a NOTIFY from any replica's commit (LISTEN on its own connection)."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._psycopg.connect(self.dsn, autocommit=True, **CONNECTION_SETTINGS)
                self._listener.execute(f"LISTEN {self.CHANNEL}")
            return any(True for _ in self._listener.notifies(timeout=timeout, stop_after=1))
        except self._psycopg.Error as error:
            # A lost notification only delays: the caller polls anyway after `timeout`.
            log.warning("LISTEN connection failed (%s); polling until it is back", error)
            self._listener = None
            time.sleep(timeout)
            return False

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._pool.close()


def _where(dsn: str) -> str:
    """host:port/database of a DSN, never its password."""
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Error:  # a DSN libpq cannot read: named by its scheme alone (its password may be anywhere in it)
        return "(a postgresql:// DSN that does not parse)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def _first_line(error: Exception) -> str:
    """An error's message, first line: libpq's carry DETAIL and HINT lines after it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def open_store(location: str, data_dir: Path, database_file: str, timeout: float = 30.0) -> Store:
    """PostgreSQL for a postgresql:// DSN, else the SQLite file in the data folder."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresStore(location, connect_timeout=timeout)
    if location:
        raise ValueError(f"store {location!r}: expected a postgresql:// DSN, or nothing for SQLite in the data folder")
    return SqliteStore(Path(data_dir) / database_file)
