"""The PostgreSQL fixtures start a real server: a fresh database takes a table, a row, and reads it back."""
from __future__ import annotations

import os
import pwd
import subprocess
from concurrent import futures

import grpc
import pytest

from lookalike.tools.postgres import run_as_prefix

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


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user (CI runs as root)")
def test_commands_run_as_the_server_user_start_cleanly_beside_live_grpc() -> None:
    """Dropping root used to fork() a child that ran gRPC's at-fork handlers and died (SIGSEGV) about 1 time in 20
    when the test process held gRPC servers and channels; CI lost every PostgreSQL test to one such initdb."""
    user = pwd.getpwnam("nobody")
    servers, channels = [], []
    try:
        for _ in range(4):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers.append(server)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=10)
            channels.append(channel)
        results = [subprocess.run([*run_as_prefix(user), "id", "-u"], capture_output=True, text=True)
                   for _ in range(200)]
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(None)
    failures = [(r.returncode, r.stderr[-200:]) for r in results if r.returncode != 0]
    assert failures == []
    assert {r.stdout.strip() for r in results} == {str(user.pw_uid)}
