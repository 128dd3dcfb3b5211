"""Bearer-token auth with roles for both servers, in one interceptor.

A tokens file (a Kubernetes Secret mount) holds one `ROLE SHA256_HEX` line per token, the hex being the
SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`), so the file never holds a token itself. Roles
nest: `read` (Embed, GetModelInfo, Search, SearchBatch, GetStats, GetShardMap) < `write` (Upsert, Delete) < `admin`
(anything that changes layout: MoveCategory). Health needs no token, so probes keep working; reflection
needs `read`. A call without a known token is UNAUTHENTICATED; with too small a role, PERMISSION_DENIED;
neither message ever echoes the token. The file is re-read when it changes (a rotated Secret); a rewrite
that does not load leaves the last good tokens in use (logged once), while a bad file at start-up stops it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)

ROLES = ("read", "write", "admin")
# The role each method needs; methods not listed need admin, so a new RPC is closed until classified.
METHOD_ROLES = {"Embed": "read", "GetModelInfo": "read", "Search": "read", "SearchBatch": "read", "GetStats": "read",
                "GetShardMap": "read", "Upsert": "write", "Delete": "write", "MoveCategory": "admin",
                # Reflection's stream holds a handler thread while it stays open: open to anyone, a few idle
                # streams froze the server. Health's Watch streams hold none, so probes stay open (its
                # unary Check, like any unary call, holds one until its request arrives: see README).
                "ServerReflectionInfo": "read"}
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


# The stamp of a tokens file that cannot be read (missing, unreadable).
_UNREADABLE = (0, 0, -1)


class TokenFile:
    """The hashed tokens of a file, re-read whenever it changes (inode, modification time or size).

    A file that does not load at start-up stops the start. One rewritten later that does not load (a typo in
    a role, a truncated hash, a file gone) leaves the last good tokens in use, with one error in the log per
    change, like renewed certificates that do not load (serving/tls.py): a bad rotation must not refuse every
    caller, and the next good rewrite is read as usual."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # A missing or malformed file fails at start-up, not at the first call.
        self._stamp = self._file_stamp()
        self._roles = self._parse(self.path.read_text(encoding="utf-8"))
        # A rewrite that failed to load is not re-read (nor logged again) on every call until it changes.
        self._refused: tuple[int, int, int] | None = None
        log.info("read %d tokens from %s", len(self._roles), self.path)

    def _file_stamp(self) -> tuple[int, int, int]:
        # Inode too: kubelet swaps a whole folder of new files in, which may keep sizes and mtimes.
        stat = os.stat(self.path)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def roles(self) -> list[tuple[bytes, str]]:
        """The (SHA-256 digest, role) pairs of the file's last contents that loaded."""
        with self._lock:
            try:
                stamp = self._file_stamp()
            except OSError:
                stamp = _UNREADABLE
            if stamp in (self._stamp, self._refused):
                return self._roles  # unchanged, or a rewrite already refused
            try:
                roles = self._parse(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
                self._refused = stamp
                log.error("auth: keeping the %d tokens read before; the rewritten tokens file does not load: %s",
                          len(self._roles), error)
                return self._roles
            self._stamp, self._roles = stamp, roles
            log.info("read %d tokens from %s", len(roles), self.path)
            return roles

    def _parse(self, text: str) -> list[tuple[bytes, str]]:
        roles = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                role, digest = line.split()
                if role not in ROLES or len(digest) != 64:
                    raise ValueError(role)
                roles.append((bytes.fromhex(digest), role))  # ValueError when not hexadecimal
            except ValueError:
                raise ValueError(f"{self.path}:{number}: expected 'ROLE SHA256_HEX' with ROLE one of {ROLES}") from None
        return roles

    def role_of(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, role in self.roles():
            # Every entry is compared, in constant time, so timing tells nothing about which matched.
            if hmac.compare_digest(stored, digest):
                found = role
        return found


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    # A stream of requests, whatever the method's shape, so the refusal reads none: for a unary handler gRPC
    # holds a handler thread until the request arrives, and streams without a token that sent nothing held
    # every thread, freezing the server.
    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through when its `authorization: Bearer <token>` carries a role high enough."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICES):
            # A method the server does not have gets gRPC's UNIMPLEMENTED, as without auth: nothing of it runs,
            # and a refusal of its own per made-up name would grow the per-method metrics without bound.
            return handler
        name = method.rsplit("/", 1)[-1]
        needed = METHOD_ROLES.get(name, "admin")
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        role = self.tokens.role_of(token) if token else None
        if role is None:
            return _refusal(grpc.StatusCode.UNAUTHENTICATED,
                            f"{name} needs a known token in the metadata 'authorization: Bearer <token>' "
                            f"({'none was sent' if not token else 'the one sent is not known'})")
        if ROLES.index(role) < ROLES.index(needed):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED,
                            f"{name} needs role {needed!r}; this token has role {role!r}")
        return handler
