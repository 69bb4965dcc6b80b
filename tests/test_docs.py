"""The README and docs/ stay true: their links lead somewhere, and the tenants page lists
the keys the tenants file takes. (The settings table is checked in test_config.py, the
clients' service config in test_client_channel.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from agentplane.server.tenants import _KEYS, TenantRegistry, hash_token

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """The fragments GitHub gives the page's headings."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        words = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(words.replace(" ", "-"))
    return found


def test_every_link_of_the_readme_and_docs_leads_somewhere() -> None:
    broken = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if link.startswith(("http://", "https://")):
                continue
            target, _, fragment = link.partition("#")
            dest = (page.parent / target).resolve() if target else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {link}: no such heading")
    assert not broken, "\n".join(broken)


def documented_tenant_keys() -> list[str]:
    """The first column of docs/tenants.md's keys table."""
    lines = (ROOT / "docs" / "tenants.md").read_text().splitlines()
    start = lines.index("| key | default | meaning |") + 2  # past the header and |---|
    keys = []
    for row in lines[start:]:
        if not row.startswith("|"):
            break
        keys.append(row.split("|")[1].strip().strip("`"))
    return keys


def test_the_tenants_page_lists_every_key_of_the_tenants_file() -> None:
    keys = documented_tenant_keys()
    assert len(keys) == len(set(keys)), "a key is listed twice"
    assert set(keys) == set(_KEYS), (
        f"docs/tenants.md lists {sorted(set(keys) - set(_KEYS))} that the parser does not "
        f"take and misses {sorted(set(_KEYS) - set(keys))}"
    )


def test_the_smallest_tenant_of_the_tenants_page_needs_nothing_else(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "tenants.md").read_text()
    smallest = re.search(r"```toml\n(.*?)```", page, re.DOTALL)
    assert smallest is not None
    text = smallest.group(1).replace("<hex sha256 of a caller token>", hash_token("t0ken"))
    (tmp_path / "tenants.toml").write_text(text)
    registry = TenantRegistry.load(tmp_path / "tenants.toml")
    assert list(registry.tenants) == ["acme"]
