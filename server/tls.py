"""TLS (and mTLS) on the gRPC port, with certificates re-read when their files change.

grpc calls `CertificateFiles.fetch` before the handshake of every new connection; it
stats the three files (cheap) and, when one changed, reads and checks them whole
(`certs.load_server_material`) before handing grpc the new set. A set that does not check
out (a key written before its certificate, say) is not used: connections keep the last
good one, and the problem is logged once per version of the files. Connections already
open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc

from .certs import CertificateProblem, ServerMaterial, load_server_material
from .config import Settings
from .errors import ConfigError

log = logging.getLogger(__name__)

# What identifies one version of a file: a replaced file (cert-manager's and Kubernetes'
# atomic symlink swap, `mv`) has a new inode, an edited one a new mtime or size.
_Stamp = tuple[int, int, int, int] | None


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data link shows the new file
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class CertificateFiles:
    """The server's certificate chain, key and (mTLS) client CA, as files that may change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()  # grpc may call fetch from several threads
        self._seen: tuple[_Stamp, ...] = ()
        self.material: ServerMaterial | None = None
        self.reloads = 0  # certificate sets taken since the first (for tests and logs)

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate the client CA signed."""
        return self.client_ca_file is not None

    def _stamps(self) -> tuple[_Stamp, ...]:
        paths = [self.cert_file, self.key_file]
        if self.client_ca_file is not None:
            paths.append(self.client_ca_file)
        return tuple(_stamp(p) for p in paths)

    def load(self) -> ServerMaterial:
        """Read and check the files now; raises CertificateProblem."""
        with self._lock:
            self._seen = self._stamps()
            self.material = load_server_material(self.cert_file, self.key_file, self.client_ca_file)
            return self.material

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The current set as grpc takes it (after `load`)."""
        material = self.material
        assert material is not None, "load() first"
        return grpc.ssl_server_certificate_configuration(
            [(material.private_key, material.certificate_chain)],
            root_certificates=material.client_ca,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-configuration fetcher: a new set when the files changed and
        check out, else None (keep the current one). Never raises."""
        try:
            with self._lock:
                stamps = self._stamps()
                if stamps == self._seen:
                    return None
                self._seen = stamps  # whatever the verdict: one log line per version
                try:
                    material = load_server_material(
                        self.cert_file, self.key_file, self.client_ca_file
                    )
                except CertificateProblem as exc:
                    log.error(
                        "tls_reload_failed",
                        extra={"detail": f"{exc}; connections keep the previous certificate"},
                    )
                    return None
                self.material = material
                self.reloads += 1
            log.info(
                "tls_reloaded",
                extra={"subject": material.subject, "not_after": material.not_after.isoformat()},
            )
            return self.configuration()
        except Exception:  # an exception here would fail the handshake
            log.exception("tls_reload_failed")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files as they change (after `load`)."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self.fetch, require_client_authentication=self.mutual
        )


def certificate_files(settings: Settings) -> CertificateFiles | None:
    """The TLS files the settings name, read and checked (None: plaintext). Raises
    ConfigError naming the setting of the file at fault."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    try:
        files.load()
    except CertificateProblem as exc:
        setting = {
            settings.tls_cert_file: "AGENTPLANE_TLS_CERT_FILE",
            settings.tls_key_file: "AGENTPLANE_TLS_KEY_FILE",
        }.get(exc.path, "AGENTPLANE_TLS_CLIENT_CA_FILE")
        raise ConfigError(setting, str(exc)) from None
    return files
