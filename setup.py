"""Package discovery; everything else is in pyproject.toml.

The source roots are installed under other names ([tool.setuptools.package-dir]: client/
is `agentplane`, server/ `agentplane.server`, migrations/ `agentplane.server.migrations`),
and setuptools' `packages.find` cannot put a root's name in front of what it finds below
it. So each root's sub-packages are found here and named from the root: a new
sub-package is in the wheel without being listed (scripts/smoke_wheel.py checks it).
"""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def packages() -> list[str]:
    """Every package of every source root, named as installed."""
    with (HERE / "pyproject.toml").open("rb") as f:
        roots: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    found = []
    for name, folder in roots.items():
        found.append(name)
        found.extend(f"{name}.{sub}" for sub in find_packages(str(HERE / folder)))
    return sorted(found)


setup(packages=packages())
