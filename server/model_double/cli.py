"""``agentplane-server model-double``: serve the model double until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

from .script import load_scripts
from .server import SandboxServer

DESCRIPTION = "Serve a scripted Anthropic Messages API (point ANTHROPIC_BASE_URL at it)."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentplane-server model-double", description=DESCRIPTION)
    add_options(parser)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    """The sandbox model's options (also those of `agentplane-server model-double`)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8787, help="port (default: %(default)s)")
    parser.add_argument(
        "--scripts", metavar="FILE", help='JSON file: {"name": {"steps": [...]}, ...}'
    )


async def serve(host: str, port: int, scripts_file: str | None) -> None:
    """Run the server until SIGINT or SIGTERM."""
    scripts = load_scripts(scripts_file) if scripts_file else {}
    server = SandboxServer(scripts=scripts, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"sandbox model listening on {server.base_url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Serve with the parsed options until a signal; the exit code."""
    try:
        asyncio.run(serve(args.host, args.port, args.scripts))
    except (OSError, TypeError, ValueError) as exc:
        print(f"agentplane-server model-double: {exc}", flush=True)
        return 1
    return 0
