"""Starting the services as child processes on free local ports (demo, benchmarks, CLI tests)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

_LISTENING = re.compile(r"listening on port (\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel picks as free, released at once, for a server that cannot take port 0 (PostgreSQL,
    Streamlit, a metrics endpoint, a replica that must come back on the same port). Another process could take
    it before the server binds: rare, and the server then fails to start, saying so."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def refuse_taken_port(host: str, port: int) -> None:
    """Raises ServiceStartError when a server already listens on host:port. Checked before a server that takes
    that port starts: a health check would pass for the other server, which would then be announced as ours."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port is free
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServiceStartError(f"port {port} on {host} is taken ({error.strerror}): stop what listens there "
                                    "or choose another port") from None


class ServiceStartError(RuntimeError):
    """A server (or the web app) that exited or never became ready: its last output is in the message."""


@contextmanager
def running_service(module: str, args: Sequence[str], startup_timeout: float = 180.0,
                    env: dict[str, str] | None = None,
                    address: str = "127.0.0.1:0",
                    log_lines: list[str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """Runs `python -m module args --address ADDRESS`, yields (process, port), terminates it after.

    The port is read from the server's "listening on port N" line, printed once it is ready. The server's
    output lines are appended to `log_lines` when given.
    """
    command = [sys.executable, "-m", module, *args, "--address", address]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    port: list[int] = []
    ready = threading.Event()
    log_lines = [] if log_lines is None else log_lines

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log_lines.append(line)
            match = _LISTENING.search(line)
            if match and not port:
                port.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    try:
        if not ready.wait(startup_timeout) or not port:
            try:  # its output ended without the line: it is exiting
                ended = process.wait(5) if ready.is_set() else None
            except subprocess.TimeoutExpired:
                ended = None
            what = f"exited with code {ended} before serving" if ended is not None else \
                f"did not start within {startup_timeout:.0f}s"
            raise ServiceStartError(f"{module} {what}:\n{''.join(log_lines[-30:])}")
        yield process, port[0]
    finally:
        stop_process(process, 30)


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
