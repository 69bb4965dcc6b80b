"""X.509 in PEM: checking the server's certificate, key and client CA, and who a client
certificate names. No grpc here (server/tls.py builds the credentials from these checks).

Errors are `CertificateProblem`s whose text names the file and what is wrong with it, never
any key material.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class CertificateProblem(ValueError):
    """A certificate, key or CA file (`path`) that cannot be used; the text says why."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class CertIdentity:
    """Who a client certificate names: its subject (RFC 4514, as `canonical_subject`
    writes it) and its subject alternative names (DNS names, URIs, e-mail addresses, IP
    addresses, as text)."""

    subject: str
    sans: frozenset[str]


def canonical_subject(text: str) -> str:
    """A distinguished name as RFC 4514 text in one spelling (`CN=a,O=b`), so that the
    tenants file and a certificate compare equal however spaces and case were written;
    ValueError when it is not a distinguished name."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an RFC 4514 distinguished name: {exc}") from None
    if not list(name):
        raise ValueError(f"{text!r} is an empty distinguished name")
    return name.rfc4514_string()


@functools.lru_cache(maxsize=1024)
def peer_identity(pem: bytes) -> CertIdentity:
    """The identity of a verified client certificate (cached: each call of a connection
    brings the same certificate)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans: frozenset[str] = frozenset()
    else:
        sans = frozenset(
            str(name.value) for name in names
            if isinstance(name, x509.DNSName | x509.UniformResourceIdentifier
                          | x509.RFC822Name | x509.IPAddress)
        )
    return CertIdentity(cert.subject.rfc4514_string(), sans)


@dataclass(frozen=True)
class ServerMaterial:
    """The PEM bytes the server presents (and verifies clients with), checked."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    subject: str  # of the leaf certificate, for the logs
    not_after: datetime


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateProblem(path, f"cannot read {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise CertificateProblem(path, f"{what} {path} is empty")
    return data


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateProblem(path, f"{what} {path} holds no PEM certificate") from None
    return certs


def load_server_material(
    cert_file: Path, key_file: Path, client_ca_file: Path | None, *,
    now: datetime | None = None,
) -> ServerMaterial:
    """Read and check the server's certificate chain, its key and the client CA: each
    parses, the key is unencrypted and belongs to the chain's first certificate, and that
    certificate is valid now. Raises CertificateProblem."""
    now = now or datetime.now(UTC)
    chain = _read(cert_file, "certificate file")
    key = _read(key_file, "key file")
    leaf = _certificates(chain, cert_file, "certificate file")[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:  # what cryptography raises for an encrypted key without a password
        raise CertificateProblem(
            key_file, f"key file {key_file} is encrypted; the server needs an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateProblem(key_file, f"key file {key_file} holds no PEM private key") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise CertificateProblem(
            key_file, f"key file {key_file} does not belong to the first certificate of {cert_file}"
        )
    if leaf.not_valid_after_utc <= now:
        raise CertificateProblem(
            cert_file, f"the certificate in {cert_file} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateProblem(
            cert_file, f"the certificate in {cert_file} is valid only from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    client_ca = None
    if client_ca_file is not None:
        client_ca = _read(client_ca_file, "client CA file")
        _certificates(client_ca, client_ca_file, "client CA file")
    return ServerMaterial(
        chain, key, client_ca, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc
    )
