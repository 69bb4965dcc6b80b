"""`agentplane-server`: serve, migrate, check-config, hash-token, model-double, dev."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agentplane import DEFAULT_TARGET
from agentplane._version import package_version

from .config import Settings, settings_help
from .config_warnings import tenants_file_warnings, unknown_variables
from .errors import ConfigError
from .mcp.servers import problem as mcp_problem
from .model_double import cli as model_double_cli
from .telemetry.logs import configure_logging
from .tenants import TenantRegistry

if TYPE_CHECKING:
    from .app import App

EXIT_CONFIG = 2

log = logging.getLogger("agentplane.server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentplane-server",
        description="agentplane: a gRPC control plane for Claude agent sessions.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in [
        ("serve", "run the gRPC server (configured by the environment below)"),
        ("migrate", "apply database migrations to AGENTPLANE_DATABASE_URL"),
        ("check-config", "validate the configuration and the tenants file, then exit"),
        ("dev", "serve for local use: with no ANTHROPIC_API_KEY, a sandbox model runs beside it"),
    ]:
        sub.add_parser(
            name,
            help=text,
            epilog=settings_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    hash_cmd = sub.add_parser(
        "hash-token", help="print the SHA-256 of a caller token for the tenants file"
    )
    hash_cmd.add_argument("token", nargs="?", help="the token (prompted for when omitted)")
    double = sub.add_parser(
        "model-double",
        aliases=["sandbox"],  # its old name, deprecated: kept for one release
        help="run the scripted Anthropic Messages API server (the model double)",
        description=model_double_cli.DESCRIPTION,
    )
    model_double_cli.add_options(double)
    return parser


def _settings() -> Settings:
    settings = Settings.from_env()
    configure_logging(settings.log_level)  # JSON lines on stderr
    return settings


async def _migrate(settings: Settings) -> None:
    """Apply the migrations; ConfigError (one line: the cause, what to do) when the
    database cannot be reached or refuses them."""
    from sqlalchemy.exc import DBAPIError

    from .store.diagnosis import LISTEN_SETTING, SETTING, explain, remedy, shown, sqlite_folder
    from .store.engine import create_engine, migrate

    # Straight to PostgreSQL when the pools go through a pooler (DDL needs no pooling).
    url = settings.direct_url
    setting = LISTEN_SETTING if settings.pooled else SETTING
    folder = sqlite_folder(url)
    if folder is not None and not folder.is_dir():
        # Said before connecting: a failed connect leaves aiosqlite's thread to report
        # into a closed event loop (a traceback after the line).
        reason = "unable to open database file"
        raise ConfigError(setting, f"cannot migrate {shown(url)}: {reason}; {remedy(reason, url)}")
    engine = create_engine(url, purpose="migrate")
    try:
        await migrate(engine)
    except (DBAPIError, OSError) as exc:
        raise ConfigError(
            setting, f"cannot migrate {shown(url)}: {explain(exc, url, setting)}"
        ) from None
    finally:
        await engine.dispose()


def _client_command() -> str:
    """How to call the `agentplane` CLI installed beside this server: its name when PATH
    finds it, else its path (relative to the current folder when under it: .venv/bin/...)."""
    cli = Path(sys.executable).parent / "agentplane"
    found = shutil.which("agentplane")
    if found is not None and Path(found).resolve() == cli.resolve():
        return "agentplane"
    return str(cli.relative_to(Path.cwd())) if cli.is_relative_to(Path.cwd()) else str(cli)


def next_step(app: App, tenants: TenantRegistry) -> str:
    """What `dev` prints once it is ready: the command to run a first session."""
    host = app.settings.listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):  # every address: this machine's loopback is one
        host = "127.0.0.1"
    target = f"{host}:{app.port}"
    options = "" if target == DEFAULT_TARGET else f" --target {target}"
    if app.certificates is not None:
        options += " --ca-file <the CA that signed AGENTPLANE_TLS_CERT_FILE>"
        if app.certificates.mutual:
            options += " --cert-file <a client certificate> --key-file <its key>"
    if not tenants.dev_mode:
        options += " --token <a caller token of the tenants file>"
    return f'next: in another terminal: {_client_command()}{options} run "hello"'


async def _dev(settings: Settings, tenants: TenantRegistry) -> int:
    """Serve; without an API key, start the sandbox model first and point the CLI at it.
    Once ready, say what to type next."""
    from .app import serve

    def on_ready(app: App) -> None:
        print(next_step(app, tenants), flush=True)

    if not os.environ.get("ANTHROPIC_API_KEY") and settings.anthropic_base_url is None:
        from dataclasses import replace

        from .model_double import SandboxServer

        sandbox = SandboxServer()
        await sandbox.start()
        os.environ["ANTHROPIC_API_KEY"] = "sandbox"
        # The sandbox model takes any key: tenants of a tenants file need no real one.
        for tenant in tenants.tenants.values():
            if tenant.api_key() is None and tenant.anthropic_api_key_file is None:
                os.environ[tenant.anthropic_api_key_env] = "sandbox"
        settings = replace(settings, anthropic_base_url=sandbox.base_url)
        print(
            f"no ANTHROPIC_API_KEY: agents talk to the offline sandbox model at {sandbox.base_url}",
            flush=True,
        )
        try:
            return await serve(settings, tenants, on_ready)
        finally:
            await sandbox.stop()
    return await serve(settings, tenants, on_ready)


def _missing_keys(tenants: TenantRegistry) -> list[str]:
    """A line per tenant whose Anthropic API key is not there now (its sessions would be
    refused FAILED_PRECONDITION, except under `dev` with the sandbox model), and per tenant
    with an MCP server's secret missing (refused too)."""
    lines = []
    for tenant in tenants.tenants.values():
        if tenant.api_key() is not None:
            continue
        where = (
            f"the file {tenant.anthropic_api_key_file} is missing, unreadable or empty"
            if tenant.anthropic_api_key_file is not None
            else f"the environment variable {tenant.anthropic_api_key_env} is not set"
        )
        lines.append(f"warning: tenant {tenant.name!r} has no Anthropic API key: {where}")
    for tenant in tenants.tenants.values():
        missing = mcp_problem(tenant.mcp_servers)
        if missing is not None:  # its sessions using that server would be refused
            lines.append(f"warning: tenant {tenant.name!r}: {missing}")
    return lines


def _warnings(settings: Settings, tenants: TenantRegistry) -> list[str]:
    """What is accepted but likely a mistake: unknown AGENTPLANE_* variables, tools the
    CLI does not have, amounts written as strings (see config_warnings.py)."""
    lines = unknown_variables(os.environ, tenants.key_env_names())
    if settings.tenants_file is not None and not tenants.dev_mode:
        lines += tenants_file_warnings(settings.tenants_file)
    return lines


def _sandbox_tools(settings: Settings) -> str:
    """The sandbox's tools found on PATH (a line); ConfigError naming a missing one."""
    from .app import sandbox_unavailable
    from .sandbox.sandboxes import SandboxUnavailable, find_tools

    if not settings.sandbox:
        return (
            "warning: AGENTPLANE_SANDBOX=none: agents run unsandboxed (unsafe with more than "
            "one tenant)"
        )
    try:
        tools = find_tools()
    except SandboxUnavailable as exc:
        raise sandbox_unavailable(exc) from None
    return f"sandbox: bwrap {tools.bwrap}, socat {tools.socat}, setpriv {tools.setpriv}"


def _check_config(settings: Settings, tenants: TenantRegistry) -> int:
    """What `serve` would refuse, without starting anything: the settings, the tenants
    file, the TLS certificate, key and client CA, the sandbox's tools, the database and
    its migrations. Raises ConfigError; prints what it found, then warnings."""
    from .app import price_table, tenant_checks
    from .store.diagnosis import check as check_database
    from .tls import certificate_files

    settings.check_exposure(tenants.dev_mode)
    certificates = certificate_files(settings)
    prices = price_table(settings)
    tenant_checks(settings, prices.price)(tenants)
    sandbox = _sandbox_tools(settings)
    database = asyncio.run(
        check_database(
            settings.database_url,
            migrated_at_start=settings.migrate_at_start,
            listen_url=settings.database_listen_url,
        )
    )
    print(
        f"configuration ok: {len(tenants.tenants)} tenant(s)"
        + (" (dev mode)" if tenants.dev_mode else "")
    )
    if certificates is not None and certificates.material is not None:
        material = certificates.material
        print(
            f"tls: {material.subject}, valid until {material.not_after:%Y-%m-%d %H:%M} UTC"
            + ("; client certificates required (mTLS)" if certificates.mutual else "")
        )
    print(sandbox)
    print(database)
    for line in _missing_keys(tenants):
        print(line)
    for line in _warnings(settings, tenants):
        print(f"warning: {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "hash-token":
        from .tenants import hash_token

        # From a pipe, quietly: getpass would warn that it cannot hide what is typed.
        if args.token:
            token = args.token
        elif sys.stdin.isatty():
            token = getpass.getpass("token: ")
        else:
            token = sys.stdin.readline().rstrip("\r\n")
        if not token:
            print("agentplane-server hash-token: no token given", file=sys.stderr)
            return EXIT_CONFIG
        print(hash_token(token))
        return 0
    if command in ("model-double", "sandbox"):
        if command == "sandbox":
            print(
                "agentplane-server: `sandbox` is deprecated (it starts the model double, not a "
                "sandbox): use `agentplane-server model-double`",
                file=sys.stderr,
            )
        return model_double_cli.run(args)
    try:
        settings = _settings()
        if command == "migrate":
            asyncio.run(_migrate(settings))
            print("database migrated")
            return 0
        from .app import load_tenants, serve

        tenants = load_tenants(settings)  # a bad tenants file stops us before anything starts
        if command == "check-config":
            return _check_config(settings, tenants)
        for line in _warnings(settings, tenants):
            log.warning(line)
        return asyncio.run(
            _dev(settings, tenants) if command == "dev" else serve(settings, tenants)
        )
    except ConfigError as exc:
        print(f"agentplane-server: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
