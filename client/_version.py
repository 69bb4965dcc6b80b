"""The installed distribution's version, for the CLIs' ``--version``."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "agentplane"


def package_version() -> str:
    """The version pip installed (the one in pyproject.toml); ``unknown`` when agentplane
    runs from a source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
