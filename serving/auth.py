"""Bearer-token auth with roles for both servers, in one interceptor.

A tokens file (a Kubernetes Secret mount) holds one `ROLE SHA256_HEX` line per token, the hex being the
SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`), so the file never holds a token itself. Roles
nest: `read` (Embed, GetModelInfo, Search, SearchBatch, GetStats, GetShardMap) < `write` (Upsert, Delete) < `admin`
(anything that changes layout: MoveCategory). Health and reflection need no token, so probes keep
working. A call without a known token is UNAUTHENTICATED; with too small a role, PERMISSION_DENIED;
neither message ever echoes the token. The file is re-read when it changes (a rotated Secret).
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
                "GetShardMap": "read", "Upsert": "write", "Delete": "write", "MoveCategory": "admin"}
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class TokenFile:
    """The hashed tokens of a file, re-read whenever its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._roles: list[tuple[bytes, str]] = []
        self.roles()  # a missing or malformed file fails at start-up, not at the first call

    def roles(self) -> list[tuple[bytes, str]]:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._roles = self._parse(self.path.read_text(encoding="utf-8"))
                self._stamp = stamp
                log.info("read %d tokens from %s", len(self._roles), self.path)
            return self._roles

    def _parse(self, text: str) -> list[tuple[bytes, str]]:
        roles = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ROLES or len(parts[1]) != 64:
                raise ValueError(f"{self.path}:{number}: expected 'ROLE SHA256_HEX' with ROLE one of {ROLES}")
            roles.append((bytes.fromhex(parts[1]), parts[0]))
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
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through when its `authorization: Bearer <token>` carries a role high enough."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
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
        return continuation(handler_call_details)
