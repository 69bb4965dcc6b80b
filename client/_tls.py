"""TLS and mTLS for the client's channel: grpc's SSL channel credentials from PEM bytes."""

from __future__ import annotations

from typing import Any

import grpc


def make_credentials(
    secure: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (any certificate or key given implies TLS), else None
    (plaintext). ``root_certificates``: the CA(s) to verify the server with (None: the
    system's); ``certificate_chain`` and ``private_key``: the client certificate (mTLS),
    both or neither (ValueError)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError(
            "a client certificate needs its private key and the key its "
            "certificate: give both certificate_chain and private_key"
        )
    if not secure and root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def tls_options(server_name: str | None, credentials: object) -> list[tuple[str, Any]]:
    """The channel options that make a TLS channel check the server's certificate for
    ``server_name`` instead of the target's host (e.g. dialling 127.0.0.1 of a pod whose
    certificate names its Service). ValueError without TLS."""
    if server_name is None:
        return []
    if credentials is None:
        raise ValueError("server_name applies to TLS only: pass secure=True or a certificate")
    return [("grpc.ssl_target_name_override", server_name)]
