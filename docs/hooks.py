"""MkDocs hook: the CLI reference's usage lines are not cross-references.

Typer writes an optional argument in brackets (``mil extract tiles [OPTIONS] [INPUT]``), which
Markdown reads as a reference link ``[OPTIONS][INPUT]`` and mkdocs-autorefs then reports as an
unresolved target. This puts the brackets back before autorefs resolves references.
"""

from __future__ import annotations

import re

# <autoref identifier="INPUT" …>OPTIONS</autoref>, the form autorefs gives `[OPTIONS] [INPUT]`
_USAGE_REF = re.compile(r'<autoref [^>]*identifier="(INPUT)"[^>]*>(OPTIONS)</autoref>')


def on_page_content(html: str, page, **kwargs) -> str:
    if page.file.src_uri != "cli.md":
        return html
    return _USAGE_REF.sub(r"[\2] [\1]", html)
