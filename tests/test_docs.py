"""The documents hang together: the README is a front page that links to everything else, and
every relative link in the project's Markdown (file and #anchor) resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "deploy" / "README.md",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def links(path: Path) -> list[str]:
    return [m for m in LINK.findall(FENCE.sub("", path.read_text())) if "://" not in m]


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    linked = {(ROOT / target.split("#")[0]).resolve() for target in links(ROOT / "README.md")}
    for doc in DOCS[1:]:
        assert doc.resolve() in linked, f"README.md does not link to {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_every_alert_runbook_url_resolves() -> None:
    import yaml

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alignd-rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            file, _, anchor = rule["annotations"]["runbook_url"].partition("#")
            assert anchor in anchors(ROOT / file), rule["alert"]
