"""TLS and mTLS on the gRPC port, with certificates this test makes: TLS clients work and
plaintext ones do not; tenants bound to client certificates, never another's; certificate
rotation on disk taken without a restart; check-config checks certificates and keys."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentplane import AsyncClient, HealthStatus, RPCError
from agentplane.server.model_double.script import Script, Step, Usage
from harness import MODEL, TOKENS, Harness, short_dir, start_harness, stop_harness, tenant_toml
from tls_certs import CertificateAuthority, KeyPair

# Test channels never share a connection (grpc pools subchannels across channels): each
# call of a test below makes its own handshake, with the certificates it names.
PRIVATE = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Pki:
    folder: Path
    ca: CertificateAuthority
    server: KeyPair
    cert_file: Path
    key_file: Path
    client_ca_file: Path


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    folder = short_dir("tls")
    ca = CertificateAuthority()
    server = ca.server()
    cert_file, key_file = server.write(folder, "server")
    client_ca_file = folder / "clients-ca.crt"
    client_ca_file.write_bytes(ca.pem)
    yield Pki(folder, ca, server, cert_file, key_file, client_ca_file)
    shutil.rmtree(folder, ignore_errors=True)


def client(
    h: Harness, *, ca: bytes | None, pair: KeyPair | None = None, token: str | None = None
) -> AsyncClient:
    """A client of `h` trusting `ca` (None: plaintext), with a client certificate."""
    return AsyncClient(
        f"127.0.0.1:{h.app.port}",
        token=token,
        timeout=10,
        options=PRIVATE,
        secure=ca is not None,
        root_certificates=ca,
        certificate_chain=pair.cert if pair else None,
        private_key=pair.key if pair else None,
    )


async def budget_tenant(c: AsyncClient) -> str:
    async with c:
        return (await c.get_budget()).tenant


async def refused(c: AsyncClient) -> RPCError:
    async with c:
        with pytest.raises(RPCError) as caught:
            await c.get_budget()
    return caught.value


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls(database_url: str, pki: Pki) -> AsyncIterator[Harness]:
    """A server with TLS (no client certificates), its files copied so a test may rotate
    them."""
    cert_file, key_file = pki.server.write(short_dir("tlsr"), "rotating")
    h = await start_harness(
        database_url,
        tls_cert_file=cert_file,
        tls_key_file=key_file,
        credentials=grpc.ssl_channel_credentials(pki.ca.pem),
    )
    yield h
    await stop_harness(h)
    shutil.rmtree(cert_file.parent, ignore_errors=True)


async def test_a_tls_client_runs_a_session_and_a_plaintext_one_is_refused(
    tls: Harness, pki: Pki
) -> None:
    tls.sandbox.add_script("tls_hi", Script(steps=[Step(text="over TLS", usage=Usage(100, 5))]))
    async with client(tls, ca=pki.ca.pem, token=TOKENS["acme"]) as c:
        assert await c.health() == HealthStatus.SERVING
        events = [e async for e in c.run("[[sandbox:tls_hi]] hi", model=MODEL)]
    assert events[-1].result.session.result == "over TLS"

    plain = await refused(client(tls, ca=None, token=TOKENS["acme"]))
    assert plain.code == grpc.StatusCode.UNAVAILABLE
    # TLS, but not trusting the server's CA: the handshake fails too.
    stranger = await refused(
        client(tls, ca=CertificateAuthority("other").pem, token=TOKENS["acme"])
    )
    assert stranger.code == grpc.StatusCode.UNAVAILABLE


async def test_certificates_rotated_on_disk_are_taken_without_a_restart(
    tls: Harness, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    certificates = tls.app.certificates
    assert certificates is not None
    assert await budget_tenant(client(tls, ca=pki.ca.pem, token=TOKENS["acme"])) == "acme"

    # A new CA and certificate, as cert-manager renews them: new files swapped in.
    new_ca = CertificateAuthority("renewed CA")
    new = new_ca.server()
    staged_cert, staged_key = new.write(short_dir("tlsn"), "new")
    os.replace(staged_key, certificates.key_file)
    os.replace(staged_cert, certificates.cert_file)

    assert await budget_tenant(client(tls, ca=new_ca.pem, token=TOKENS["acme"])) == "acme"
    old = await refused(client(tls, ca=pki.ca.pem, token=TOKENS["acme"]))
    assert old.code == grpc.StatusCode.UNAVAILABLE

    # A broken set (a key of another certificate) is not taken: the last good one serves.
    certificates.key_file.write_bytes(pki.server.key)
    caplog.clear()
    assert await budget_tenant(client(tls, ca=new_ca.pem, token=TOKENS["acme"])) == "acme"
    failures = [r for r in caplog.records if r.getMessage() == "tls_reload_failed"]
    assert len(failures) == 1 and "does not belong" in failures[0].detail
    assert pki.server.key.decode() not in caplog.text  # no key material in the logs

    certificates.key_file.write_bytes(new.key)  # fixed: taken again (the same set)
    assert await budget_tenant(client(tls, ca=new_ca.pem, token=TOKENS["acme"])) == "acme"


# -- mTLS -----------------------------------------------------------------------------------

BILLING_SAN = "billing.acme.internal"
AUDIT_SUBJECT = "CN=audit,O=Acme"
MTLS_TENANTS = "\n".join(
    [
        # Bound to a certificate alone (no token).
        tenant_toml(
            "billing",
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Read"],
            client_cert_sans=[BILLING_SAN],
        ),
        # Bound to a certificate (by its subject, written loosely) and a token.
        tenant_toml(
            "audit",
            "audit-token",
            anthropic_api_key_env="AGENTPLANE_TEST_ACME_KEY",
            allowed_tools=["Read"],
            client_cert_subjects=["o=Acme, cn=audit"],
        ),
    ]
)


@dataclass
class Clients:
    billing: KeyPair
    audit: KeyPair
    probe: KeyPair  # signed by the client CA, bound to no tenant
    rogue: KeyPair  # billing's name, from a CA the server does not trust


@pytest.fixture(scope="module")
def clients(pki: Pki) -> Clients:
    return Clients(
        billing=pki.ca.issue("billing", dns=(BILLING_SAN,)),
        audit=pki.ca.issue("audit", organization="Acme"),
        probe=pki.ca.issue("probe", dns=("probe.internal",)),
        rogue=CertificateAuthority("rogue").issue("billing", dns=(BILLING_SAN,)),
    )


@pytest.fixture(scope="module")
async def mtls(database_url: str, pki: Pki, clients: Clients) -> AsyncIterator[Harness]:
    h = await start_harness(
        database_url,
        extra_tenants=MTLS_TENANTS,
        tls_cert_file=pki.cert_file,
        tls_key_file=pki.key_file,
        tls_client_ca_file=pki.client_ca_file,
        credentials=grpc.ssl_channel_credentials(pki.ca.pem, clients.probe.key, clients.probe.cert),
    )
    yield h
    await stop_harness(h)


async def test_a_certificate_authenticates_its_tenant_only(
    mtls: Harness, pki: Pki, clients: Clients
) -> None:
    ca = pki.ca.pem
    assert await budget_tenant(client(mtls, ca=ca, pair=clients.billing)) == "billing"
    assert await budget_tenant(client(mtls, ca=ca, pair=clients.audit)) == "audit"
    assert (
        await budget_tenant(client(mtls, ca=ca, pair=clients.audit, token="audit-token")) == "audit"
    )
    # A certificate bound to no tenant: the token decides; alone it is no one.
    assert (
        await budget_tenant(client(mtls, ca=ca, pair=clients.probe, token=TOKENS["acme"])) == "acme"
    )
    nobody = await refused(client(mtls, ca=ca, pair=clients.probe))
    assert nobody.code == grpc.StatusCode.UNAUTHENTICATED and nobody.reason == "UNAUTHENTICATED"

    # One tenant's certificate with another's token: refused, whichever the token is.
    for token in (TOKENS["acme"], "audit-token"):
        mixed = await refused(client(mtls, ca=ca, pair=clients.billing, token=token))
        assert mixed.code == grpc.StatusCode.UNAUTHENTICATED
        assert "different tenants" in mixed.message and token not in mixed.message


async def test_a_session_of_a_certificate_tenant_is_hidden_from_another(
    mtls: Harness, pki: Pki, clients: Clients
) -> None:
    mtls.sandbox.add_script("mtls_hi", Script(steps=[Step(text="billed", usage=Usage(100, 5))]))
    async with client(mtls, ca=pki.ca.pem, pair=clients.billing) as c:
        events = [e async for e in c.run("[[sandbox:mtls_hi]] hi", model=MODEL)]
        session = events[-1].result.session
        assert session.tenant == "billing" and session.result == "billed"
        assert (await c.get_session(session.id)).id == session.id
    async with client(mtls, ca=pki.ca.pem, pair=clients.audit) as c:
        with pytest.raises(RPCError) as caught:
            await c.get_session(session.id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_without_a_trusted_client_certificate_no_connection_is_made(
    mtls: Harness, pki: Pki, clients: Clients
) -> None:
    for c in (
        client(mtls, ca=pki.ca.pem, token=TOKENS["acme"]),  # TLS, no certificate
        client(mtls, ca=None, token=TOKENS["acme"]),  # plaintext
        client(mtls, ca=pki.ca.pem, pair=clients.rogue),  # billing's name, untrusted CA
    ):
        assert (await refused(c)).code == grpc.StatusCode.UNAVAILABLE
    # Health needs no tenant: a probe's certificate is enough.
    async with client(mtls, ca=pki.ca.pem, pair=clients.probe) as c:
        assert await c.health("readiness") == HealthStatus.SERVING


async def test_the_cli_speaks_tls_and_mtls(mtls: Harness, pki: Pki, clients: Clients) -> None:
    folder = short_dir("tlscli")
    try:
        ca_file = folder / "ca.crt"
        ca_file.write_bytes(pki.ca.pem)
        billing_cert, billing_key = clients.billing.write(folder, "billing")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}

        async def cli(*argv: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agentplane.cli",
                "--target",
                f"localhost:{mtls.app.port}",
                *argv,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        mutual = (
            "--ca-file",
            str(ca_file),
            "--cert-file",
            str(billing_cert),
            "--key-file",
            str(billing_key),
        )
        code, out, err = await cli(*mutual, "budget", "--json")
        assert code == 0, err
        assert json.loads(out)["tenant"] == "billing"
        # The certificate names 127.0.0.1 and localhost; --server-name checks another name.
        code, _, err = await cli(*mutual, "--server-name", "agentplane.example", "health")
        assert code == 3 and "UNAVAILABLE" in err
        code, _, err = await cli("--tls", "--ca-file", str(ca_file), "health")  # no certificate
        assert code == 3 and "UNAVAILABLE" in err
        code, _, err = await cli("--cert-file", str(billing_cert), "health")
        assert code == 2 and "--cert-file and --key-file go together" in err
        code, _, err = await cli("--ca-file", str(folder / "missing.crt"), "health")
        assert code == 2 and "cannot read" in err and "missing.crt" in err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- check-config -----------------------------------------------------------------------------


def _check_config(tenants: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    return subprocess.run(
        [sys.executable, "-m", "agentplane.server", "check-config"],
        env={**clean, "AGENTPLANE_TENANTS_FILE": str(tenants), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_checks_certificates_and_keys(pki: Pki, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenant_toml("a", "tok"))
    good = {
        "AGENTPLANE_TLS_CERT_FILE": str(pki.cert_file),
        "AGENTPLANE_TLS_KEY_FILE": str(pki.key_file),
    }
    proc = _check_config(tenants, **good, AGENTPLANE_TLS_CLIENT_CA_FILE=str(pki.client_ca_file))
    assert proc.returncode == 0, proc.stderr
    assert "tls: CN=agentplane" in proc.stdout and "mTLS" in proc.stdout

    other_key = tmp_path / "other.key"
    other_key.write_bytes(pki.ca.server().key)
    expired_cert, expired_key = pki.ca.server(expired=True).write(tmp_path, "expired")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    bound = tmp_path / "bound.toml"
    bound.write_text(tenant_toml("b", client_cert_sans=["b.internal"]))
    cases = [
        (
            {**good, "AGENTPLANE_TLS_KEY_FILE": str(other_key)},
            tenants,
            "AGENTPLANE_TLS_KEY_FILE",
            "does not belong",
        ),
        (
            {
                "AGENTPLANE_TLS_CERT_FILE": str(expired_cert),
                "AGENTPLANE_TLS_KEY_FILE": str(expired_key),
            },
            tenants,
            "AGENTPLANE_TLS_CERT_FILE",
            "expired",
        ),
        (
            {**good, "AGENTPLANE_TLS_CERT_FILE": str(not_pem)},
            tenants,
            "AGENTPLANE_TLS_CERT_FILE",
            "no PEM certificate",
        ),
        (
            {**good, "AGENTPLANE_TLS_CLIENT_CA_FILE": str(not_pem)},
            tenants,
            "AGENTPLANE_TLS_CLIENT_CA_FILE",
            "no PEM certificate",
        ),
        (
            {"AGENTPLANE_TLS_CERT_FILE": str(pki.cert_file)},
            tenants,
            "AGENTPLANE_TLS_KEY_FILE",
            "both",
        ),
        (
            {"AGENTPLANE_TLS_CLIENT_CA_FILE": str(pki.client_ca_file)},
            tenants,
            "AGENTPLANE_TLS_CLIENT_CA_FILE",
            "mTLS needs TLS",
        ),
        (good, bound, "tenants.b.client_cert_sans", "AGENTPLANE_TLS_CLIENT_CA_FILE"),
    ]
    for env, tenants_file, setting, words in cases:
        proc = _check_config(tenants_file, **env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (env, proc.stderr)
        assert setting in lines[0] and words in lines[0], lines[0]
        assert "PRIVATE KEY" not in proc.stderr
