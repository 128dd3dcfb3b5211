"""The PostgreSQL fixtures start a real server: a fresh database takes a table, a row, and reads it back."""
from __future__ import annotations

import pytest

psycopg = pytest.importorskip("psycopg")  # the extra `postgresql`; without it the test skips, saying so


def test_fresh_database_is_a_real_postgres(fresh_database: str) -> None:
    with psycopg.connect(fresh_database) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        assert version[:1].isdigit(), version
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, label text NOT NULL)")
        conn.execute("INSERT INTO items (id, label) VALUES (%s, %s)", (1, "jeans"))
        conn.commit()
    # A second connection sees the committed row: it was stored by the server, not buffered in the client.
    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT id, label FROM items").fetchall() == [(1, "jeans")]
        assert conn.execute("SELECT current_database()").fetchone()[0] == fresh_database.rsplit("/", 1)[1]
