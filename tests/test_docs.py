"""The README and the docs pages: every relative link and anchor resolves in the checkout, the
README stays short, and the site builds with warnings as errors (as `make lint` builds it)."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from tests.procs import BIN, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code: a link written inside a code block is an example, not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """A heading's anchor as the site (Python-Markdown's toc) and GitHub both make it for the
    headings these pages use: markup dropped, lower case, punctuation gone, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not the checkout's
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or not resolved.is_relative_to(root):
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves_in_the_checkout(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: {broken_links(page)}"


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## The life of an event\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#the-life-of-an-event) [self](#page) `[code](nowhere.md)`\n"
        "[gone](missing.md) [wrong](other.md#no-such-heading) [up](../nothing.md)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "missing.md: no such file",
        "other.md#no-such-heading: no heading with that anchor",
        "../nothing.md: no such file",
    ]


def test_the_readme_fits_on_a_screen_and_names_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 12 * 1024 and len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    # What the hub is comes before any command.
    assert text.index("self-hosted inbound webhook hub") < text.index("```")
    for setting in ("HUB_PORT", "HUB_ALLOW_PRIVATE_TARGETS"):
        assert setting in text.split("## What it does")[0], f"the tour does not name {setting}"


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    done = subprocess.run(
        [BIN / "mkdocs", "build", "--strict", "--site-dir", tmp_path / "site"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The pages the tests read are in the site, their tested code blocks rendered as code.
    connector = (tmp_path / "site" / "writing-a-connector" / "index.html").read_text()
    assert "SlackConnector" in connector and "<p>```" not in connector
    assert (tmp_path / "site" / "screenshots" / "overview.png").exists()
