"""The source of truth: an embedded SQLite database (WAL, synchronous=FULL) of items and tombstones.

Every write gets a sequence number. Index snapshots record the number they contain, and start-up
replays only the rows after it: upserted items from `items`, removals from `tombstones` (a removal is
a delete, or an item moving to another category).
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    vector BLOB NOT NULL,
    attributes TEXT NOT NULL,
    model_id TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_category_seq ON items (category, seq);
CREATE TABLE IF NOT EXISTS tombstones (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    category TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_by_category_seq ON tombstones (category, seq);
CREATE TABLE IF NOT EXISTS shards (
    category TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    dimension INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class ItemWrite:
    """A validated item to store: unit-length float32 vector."""

    id: str
    category: str
    vector: np.ndarray
    attributes: dict[str, str]
    model_id: str


@dataclass(frozen=True)
class StoredItem(ItemWrite):
    """An item as stored, with the sequence number of its last write."""

    seq: int


class Store:
    """Single-writer access to the database; the caller serialises writes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before Upsert/Delete acknowledge it, even if the machine dies.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        self.seq = row[0] if row else 0

    def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------------------------

    def shard_locks(self) -> dict[str, tuple[str, int]]:
        """category -> (model_id, dimension) for every shard ever created."""
        return {c: (m, d) for c, m, d in self._db.execute("SELECT category, model_id, dimension FROM shards")}

    def categories_of(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> category for the ids that are stored."""
        found: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT id, category FROM items WHERE id IN ({marks})", chunk))
        return found

    def items_after(self, category: str, seq: int) -> Iterator[StoredItem]:
        """Items of a category written after sequence number `seq`, in write order."""
        rows = self._db.execute("SELECT id, category, vector, attributes, model_id, seq FROM items "
                                "WHERE category = ? AND seq > ? ORDER BY seq", (category, seq))
        for item_id, cat, vector, attributes, model_id, item_seq in rows:
            yield StoredItem(item_id, cat, np.frombuffer(vector, dtype="<f4"), json.loads(attributes), model_id, item_seq)

    def removals_after(self, category: str, seq: int) -> list[tuple[str, int]]:
        """(id, seq) removed from a category after `seq`."""
        return list(self._db.execute("SELECT id, seq FROM tombstones WHERE category = ? AND seq > ? ORDER BY seq",
                                     (category, seq)))

    # -- writes (one transaction each, durable when they return) -----------------------------------

    def upsert(self, items: Sequence[ItemWrite], new_shards: dict[str, tuple[str, int]],
               previous: dict[str, str]) -> int:
        """Stores items (replacing by id) and returns the last sequence number.

        `previous` maps ids already stored to their category (it is updated as items are written, so a
        repeated id sees its earlier write). An item that changes category leaves a tombstone in its old
        category.
        """
        seq = self.seq
        with self._transaction():
            for category, (model_id, dimension) in new_shards.items():
                self._db.execute("INSERT INTO shards (category, model_id, dimension) VALUES (?, ?, ?)",
                                 (category, model_id, dimension))
            for item in items:
                old_category = previous.get(item.id)
                if old_category is not None and old_category != item.category:
                    seq += 1
                    self._db.execute("INSERT INTO tombstones (seq, id, category) VALUES (?, ?, ?)",
                                     (seq, item.id, old_category))
                seq += 1
                self._db.execute(
                    "INSERT INTO items (id, category, vector, attributes, model_id, seq) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET category = excluded.category, vector = excluded.vector, "
                    "attributes = excluded.attributes, model_id = excluded.model_id, seq = excluded.seq",
                    (item.id, item.category, item.vector.astype("<f4").tobytes(), json.dumps(item.attributes),
                     item.model_id, seq))
                previous[item.id] = item.category
            self._save_seq(seq)
        self.seq = seq
        return seq

    def delete(self, removals: dict[str, str]) -> int:
        """Deletes id -> category pairs (all known to exist); returns the last sequence number."""
        seq = self.seq
        with self._transaction():
            for item_id, category in removals.items():
                seq += 1
                self._db.execute("DELETE FROM items WHERE id = ?", (item_id,))
                self._db.execute("INSERT INTO tombstones (seq, id, category) VALUES (?, ?, ?)", (seq, item_id, category))
            self._save_seq(seq)
        self.seq = seq
        return seq

    def prune_tombstones(self, category: str, up_to_seq: int) -> None:
        """Forgets a category's removals that its snapshot already contains."""
        with self._transaction():
            self._db.execute("DELETE FROM tombstones WHERE category = ? AND seq <= ?", (category, up_to_seq))

    def _save_seq(self, seq: int) -> None:
        # Persisted, not derived from MAX(seq): deleting the newest item must never let a number be reused.
        self._db.execute("INSERT INTO counters (name, value) VALUES ('seq', ?) "
                         "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (seq,))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
