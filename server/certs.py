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
    """Who a client certificate names: its subject (as `canonical_subject` writes it)
    and its subject alternative names (DNS names, URIs, e-mail addresses, IP
    addresses, as text)."""

    subject: str
    sans: frozenset[str]


# Attribute names people write for the same attribute (OpenSSL's and RFC 4514's).
_ALIASES = {
    "EMAILADDRESS": "1.2.840.113549.1.9.1",
    "E": "1.2.840.113549.1.9.1",
    "S": "ST",
    "SERIALNUMBER": "2.5.4.5",
}


def _split(text: str, separators: str) -> list[str]:
    """`text` split at the separators that no backslash escapes (escapes kept)."""
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in separators:
            parts.append(current)
            current = ""
        else:
            current += char
    if escaped:
        raise ValueError("ends in a lone backslash")
    return [*parts, current]


def _unescape(value: str) -> str:
    out, escaped = "", False
    for char in value:
        if escaped or char != "\\":
            out += char
            escaped = False
        else:
            escaped = True
    return out


def _canonical(pairs: list[tuple[str, str]]) -> str:
    """Attribute pairs in one spelling: names upper case, sorted, values escaped."""

    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")

    return ",".join(sorted(f"{name}={escape(value)}" for name, value in pairs))


def canonical_subject(text: str) -> str:
    """A distinguished name (`CN=billing,O=Acme`) in one spelling, so that the tenants
    file and a certificate compare equal however it was written: the order of its
    attributes, spaces around them and the case of their names do not matter, values
    compare exactly. ValueError when it is not a distinguished name."""
    pairs = []
    try:
        for part in _split(text, ",+;"):
            name, sep, value = part.partition("=")
            name, value = name.strip().upper(), value.strip()
            if not sep or not name or not value:
                raise ValueError(f"{part.strip()!r} is not NAME=value")
            pairs.append((_ALIASES.get(name, name), _unescape(value)))
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not a distinguished name such as 'CN=billing,O=Acme': {exc}"
        ) from None
    return _canonical(pairs)


def name_subject(name: x509.Name) -> str:
    """A certificate's subject as `canonical_subject` writes it."""
    return _canonical(
        [
            (
                _ALIASES.get(a.rfc4514_attribute_name.upper(), a.rfc4514_attribute_name.upper()),
                str(a.value),
            )
            for a in name
        ]
    )


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
            str(name.value)
            for name in names
            if isinstance(
                name,
                x509.DNSName | x509.UniformResourceIdentifier | x509.RFC822Name | x509.IPAddress,
            )
        )
    return CertIdentity(name_subject(cert.subject), sans)


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
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None,
    *,
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
        raise CertificateProblem(
            key_file, f"key file {key_file} holds no PEM private key"
        ) from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise CertificateProblem(
            key_file, f"key file {key_file} does not belong to the first certificate of {cert_file}"
        )
    if leaf.not_valid_after_utc <= now:
        raise CertificateProblem(
            cert_file,
            f"the certificate in {cert_file} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateProblem(
            cert_file,
            f"the certificate in {cert_file} is valid only from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )
    client_ca = None
    if client_ca_file is not None:
        client_ca = _read(client_ca_file, "client CA file")
        _certificates(client_ca, client_ca_file, "client CA file")
    return ServerMaterial(
        chain, key, client_ca, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc
    )
