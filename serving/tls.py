"""TLS for both servers: certificates re-read when their files change, and optional client certificates (mTLS).

cert-manager renews a certificate by rewriting the Secret, which kubelet swaps into the pod's mount
atomically. gRPC asks `TlsFiles.fetch` for a configuration before each new connection's handshake, so
renewed files take effect for new connections without a restart; connections already open keep the
certificate they were set up with.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a TLS port serves: certificate chain, private key and, for mTLS, the client CA bundle."""

    cert: Path
    key: Path
    # When set, clients must present a certificate signed by one of these CAs.
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> "TlsFiles | None":
        """The files of a server's tls_cert / tls_key / tls_client_ca settings; None for plaintext."""
        if (cert is None) != (key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if cert is None or key is None:
            if client_ca is not None:
                raise ValueError("tls_client_ca needs TLS: give tls_cert and tls_key too")
            return None
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)

    def paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])


class RotatingCertificates:
    """The current certificate configuration of a TlsFiles, reloaded when any of its files changes."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        # Files that failed to load are not retried (nor logged again) on every handshake until they change.
        self._refused: tuple[tuple[int, int, int], ...] | None = None
        # A missing or mismatched pair fails at start-up, not at the first handshake.
        self.current = self._load()

    def _file_stamp(self) -> tuple[tuple[int, int, int], ...]:
        # Inode too: kubelet swaps a whole folder of new files in, which may keep sizes and mtimes.
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (os.stat(p) for p in self.files.paths()))

    def _load(self) -> grpc.ServerCertificateConfiguration:
        # ssl checks the key belongs to the certificate: a half-written rotation (new certificate, old key)
        # is refused here rather than served, and the previous configuration stays in use.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.files.cert, self.files.key)
        client_ca = self.files.client_ca.read_bytes() if self.files.client_ca else None
        if client_ca is not None:
            ssl.create_default_context(cadata=client_ca.decode("ascii"))
        pair = (self.files.key.read_bytes(), self.files.cert.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed and load cleanly, else None (keep)."""
        with self._lock:
            stamp = self._stamp_if_present()
            if stamp is None or stamp in (self._stamp, self._refused):
                return None  # unchanged, already refused, or a file missing mid-swap
            try:
                configuration = self._load()
            except (OSError, ssl.SSLError, ValueError) as error:
                self._refused = stamp
                log.warning("TLS: keeping the previous certificate; the files do not load: %s", error)
                return None
            if self._stamp_if_present() != stamp:
                return None  # changed while being read: load the settled files at the next handshake
            self._stamp, self.current = stamp, configuration
        log.info("TLS: loaded renewed certificate files %s", ", ".join(map(str, self.files.paths())))
        return configuration

    def _stamp_if_present(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return self._file_stamp()
        except OSError:
            return None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that follow certificate renewals and, given a client CA, require client certificates."""
    certificates = RotatingCertificates(files)
    return grpc.dynamic_ssl_server_credentials(certificates.current, certificates.fetch,
                                               require_client_authentication=files.client_ca is not None)
