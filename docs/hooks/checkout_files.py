"""An mkdocs hook: the pages may link to files of the checkout outside docs/ (SECURITY.md,
bench/RESULTS.md, deploy/nginx.conf) as ``../path``, which is right on GitHub and in an
editor; the site copies each such file under ``checkout/`` and points the link there, so that
`mkdocs build --strict` still fails on every other link it cannot resolve.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(\.\./([^)#\s]+)")


def on_files(files: Files, config) -> Files:
    linked = set()
    for page in Path(config["docs_dir"]).glob("*.md"):
        linked.update(LINK.findall(page.read_text()))
    for path in sorted(linked):
        if (ROOT / path).is_file():
            files.append(
                File.generated(
                    config,
                    f"checkout/{path}",
                    abs_src_path=str(ROOT / path),
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    if page.file.src_uri.startswith("checkout/"):
        return markdown
    # Only the links whose target the hook copied; any other ../ link stays, and fails.
    return LINK.sub(
        lambda m: f"](checkout/{m[1]}" if files.get_file_from_path(f"checkout/{m[1]}") else m[0],
        markdown,
    )
