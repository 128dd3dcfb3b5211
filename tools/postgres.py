"""A real, throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary folder, pg_ctl start, stop on exit."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from lookalike.tools.processes import free_port

# initdb refuses to run as root, so as root the server runs as this user (Debian's package creates it).
SERVER_USER = "postgres"
# Created only where no `postgres` user exists (PostgreSQL built or unpacked without Debian's package).
FALLBACK_USER = "lookalike-postgres"


def _bin_dir() -> Path | None:
    """LOOKALIKE_PG_BIN, else the newest Debian /usr/lib/postgresql/N/bin, else whatever initdb is on PATH."""
    if os.environ.get("LOOKALIKE_PG_BIN"):
        candidates = [Path(os.environ["LOOKALIKE_PG_BIN"])]
    else:
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        # Numeric order, so that 10 sorts above 9.6.
        candidates = sorted(versions, key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
                            reverse=True)
        on_path = shutil.which("initdb")
        candidates += [Path(on_path).parent] if on_path else []
    return next((d for d in candidates if all((d / b).is_file() for b in ("initdb", "pg_ctl", "postgres"))), None)


def postgres_available() -> str | None:
    """None when running_postgres can work here, else why not (for pytest.skip)."""
    if _bin_dir() is None:
        where = os.environ.get("LOOKALIKE_PG_BIN") or "/usr/lib/postgresql/*/bin or PATH"
        return f"PostgreSQL binaries (initdb, pg_ctl, postgres) not found in {where}; `make setup` installs them"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install -e '.[postgresql]')"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "as root the server runs as another user through setpriv, which is missing (Debian's util-linux)"
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None means the current one (anyone but root may run initdb)."""
    if os.geteuid() != 0:
        return None
    for name in (SERVER_USER, FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
                   check=False, capture_output=True)  # a parallel run may have created it already
    return pwd.getpwnam(FALLBACK_USER)


def run_as_prefix(user: pwd.struct_passwd | None) -> list[str]:
    """The command prefix that runs a program as `user` with root dropped entirely (supplementary groups too).

    setpriv rather than subprocess's user=/group=: those make Python fork() instead of vfork(), and fork()
    runs gRPC's at-fork handlers in the child, which crash it (SIGSEGV, about 1 start in 20) once the calling
    process has gRPC channels or servers, as a test session does.
    """
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


@contextlib.contextmanager
def running_postgres(base_dir: Path) -> Iterator[str]:
    """Start a PostgreSQL server on 127.0.0.1 with a database `lookalike`, yield its DSN, stop it on exit."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError(postgres_available() or "PostgreSQL binaries not found")
    user = _server_user()
    as_user = run_as_prefix(user)

    def run(*args: str, check: bool = True) -> None:
        done = subprocess.run([*as_user, str(bin_dir / args[0]), *args[1:]], cwd=root, capture_output=True,
                              text=True)
        if check and done.returncode != 0:  # say why: initdb's and the server's own words
            server_log = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{server_log}")

    root, owned_temp = _own(base_dir / "postgres", user), False
    if user is not None:
        # pytest's basetemp (/tmp/pytest-of-root) is 0700, which the server user cannot traverse; then use
        # a private folder of its own under /tmp rather than loosening the permissions of pytest's tree.
        if subprocess.run([*as_user, "test", "-w", str(root)]).returncode != 0:
            root, owned_temp = _own(Path(tempfile.mkdtemp(prefix="lookalike-pg-")), user), True
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    started = False
    try:
        # trust: loopback only and throwaway. --no-sync: nothing here needs to survive a crash.
        # --locale=C: works without generated locales and sorts bytewise, the same on every machine.
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
        _own(sockets, user)
        port = free_port()
        # Settings go into postgresql.conf rather than `pg_ctl -o`, which passes them through a shell.
        # fsync=off (with synchronous_commit, full_page_writes) trades crash safety for speed: fine for tests.
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sockets}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n")
        started = True  # from here on a half-started server is still stopped in `finally`
        run("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", "60")
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waits for the socket; this also proves TCP on loopback answers
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("CREATE DATABASE lookalike")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"postgresql://postgres@127.0.0.1:{port}/lookalike"
    finally:
        if started:
            run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", check=False)  # the data is thrown away
        if owned_temp:
            shutil.rmtree(root, ignore_errors=True)


def _own(path: Path, user: pwd.struct_passwd | None) -> Path:
    """Make the folder (if missing) and give it to the server user."""
    path.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path
