"""Every relative link in README.md, docs/*.md and benchmarks/README.md resolves.

A link is markdown's ``[text](target)`` or ``![alt](target)`` (also a reference definition ``[name]: target``) outside
code blocks and code spans. Links with a scheme (``https:``, ``mailto:``) are not followed. A relative target must
name a file or directory inside the repository; ``path#anchor`` (or ``#anchor`` on the same page) into a markdown
file must also name one of its headings, as GitHub makes heading anchors. README's map of docs/ must list every page.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """The text without fenced code blocks and with code spans reduced to their content's letters (no links)."""
    text = FENCE.sub("", text)
    return CODE_SPAN.sub(lambda m: re.sub(r"[\[\]()]", "", m.group(2)), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation but '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    """The anchors GitHub makes for the headings of ``page`` (repeated ones get -1, -2, ...)."""
    found, counts = set(), {}
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list:
    text = _prose(page.read_text(encoding="utf-8"))
    return [target for _, target in LINK.findall(text)] + REFERENCE.findall(text)


def _broken(page: Path, root: Path = ROOT) -> list:
    """What is wrong with each relative link of ``page`` (a repository at ``root``)."""
    problems = []
    for target in links(page):
        if not target or SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        path = unquote(path)
        if path.startswith("/"):  # GitHub: from the repository's root
            dest = (root / path.lstrip("/")).resolve()
        else:
            dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file or directory ({dest.relative_to(root)})")
        elif anchor and dest.suffix == ".md" and dest.is_file() and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{target}: {dest.relative_to(root)} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), page
    problems = _broken(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_readme_maps_every_docs_page():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(ROOT / "README.md") if not SCHEME.match(t)}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no pages"
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs/ pages: {missing}"


def test_the_checker_finds_what_it_checks(tmp_path):
    """The extraction and the anchor rules on a page written here: links in code are ignored, broken ones found."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Memory plan: `slm plan`\n\n## 1. Convert the base\n\n## Notes\n## Notes\n")
    page.write_text(
        "# Title\n\n"
        "[a](other.md) [b](other.md#memory-plan-slm-plan) [c](other.md#1-convert-the-base) [d](other.md#notes-1)\n"
        "[`code text`](other.md) ![img](missing.png) [e](other.md#nowhere) [f](#title) [g](https://example.com/x)\n"
        "`[not a link](nowhere.md)`\n\n```bash\n# [also not](nowhere.md)\n```\n\n[ref]: gone.md\n"
    )
    assert links(page).count("other.md") == 2 and "nowhere.md" not in links(page)
    problems = _broken(page, root=tmp_path.resolve())
    assert [p.split(":")[0] for p in problems] == ["missing.png", "other.md#nowhere", "gone.md"], problems
