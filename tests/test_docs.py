"""The README and docs/ stay true: their links lead somewhere, and the tenants and webhooks
pages' keys tables are the ones the schema generates. (The settings table is checked in test_config.py, the
clients' service config in test_client_channel.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from agentplane.server.tenants import TenantRegistry, hash_token, tenant_keys_table
from agentplane.server.tenants.webhooks import webhook_keys_table

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


def generated_table(page: str) -> list[str]:
    """The keys table of a docs/ page, as lines."""
    lines = (ROOT / "docs" / page).read_text().splitlines()
    start = lines.index("| key | default | meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), None)
    return lines[start:end]


@pytest.mark.parametrize(
    ("page", "table", "function"),
    [
        ("tenants.md", tenant_keys_table, "agentplane.server.tenants import tenant_keys_table"),
        (
            "webhooks.md",
            webhook_keys_table,
            "agentplane.server.tenants.webhooks import webhook_keys_table",
        ),
    ],
)
def test_the_keys_tables_are_the_schemas(page: str, table: Any, function: str) -> None:
    """docs/tenants.md's and docs/webhooks.md's keys tables are generated from the
    declarations the parser reads: every key it takes, which is required, its default and
    meaning."""
    assert generated_table(page) == table().splitlines(), (
        f"docs/{page}'s keys table differs from the schema: paste the output of python -c "
        f"'from {function}; print({function.split()[-1]}())'"
    )


def test_the_smallest_tenant_of_the_tenants_page_needs_nothing_else(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "tenants.md").read_text()
    smallest = re.search(r"```toml\n(.*?)```", page, re.DOTALL)
    assert smallest is not None
    text = smallest.group(1).replace("<hex sha256 of a caller token>", hash_token("t0ken"))
    (tmp_path / "tenants.toml").write_text(text)
    registry = TenantRegistry.load(tmp_path / "tenants.toml")
    assert list(registry.tenants) == ["acme"]
