"""The README and docs/ stay true to the tree: every relative link reaches a file and its #anchor a heading of it,
and the README's params table names every key of every params section."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from qlorapipe.params.sections import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings, a repeated heading numbered as GitHub numbers it."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#+ (.*)", line)
        if heading:
            slug = _slug(heading.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file is missing or whose anchor is no heading there."""
    broken = []
    for link in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no such heading)")
    return broken


def test_the_checker_finds_a_broken_anchor_and_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Speed on a GPU (`lean_recompute`)\n## Speed on a GPU (`lean_recompute`)\n"
                    "[a](#speed-on-a-gpu-lean_recompute) [b](#speed-on-a-gpu-lean_recompute-1) "
                    "[c](#speed) [d](other.md) [e](https://example.com/x#y)\n")
    assert broken_links(page) == ["#speed (no such heading)", "other.md (no such file)"]


def test_every_link_of_the_readme_and_docs_resolves():
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page) for page in PAGES}
    assert {page: links for page, links in broken.items() if links} == {}


def params_table(readme: str) -> dict[str, set[str]]:
    """The README's params table: each section's row and the names it quotes in backticks."""
    table = readme[readme.index("| section | keys |"):].split("\n\n")[0]
    rows = (re.match(r"\| `(\w+)` \| (.*) \|$", line) for line in table.splitlines()[2:])
    return {row.group(1): set(re.findall(r"`(\w+)`", row.group(2))) for row in rows if row}


def test_the_readme_params_table_names_every_key():
    table = params_table((ROOT / "README.md").read_text())
    assert set(table) == set(SECTIONS)
    missing = {name: sorted({f.name for f in fields(section)} - table[name]) for name, section in SECTIONS.items()}
    assert {name: keys for name, keys in missing.items() if keys} == {}
