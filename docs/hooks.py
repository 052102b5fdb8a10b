"""MkDocs hook: the config reference page (docs/reference/config.md) gets its keys and registry tables
from the code at build time (fedepic.config_reference.markdown), so it cannot disagree with the schema."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- generated: fedepic.config_reference.markdown() -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the marker of the config reference page with the generated tables."""
    if MARKER not in markdown:
        return markdown
    if str(ROOT) not in sys.path:  # the checkout's fedepic, not whatever copy is installed
        sys.path.insert(0, str(ROOT))
    from fedepic.config_reference import markdown as generated

    return markdown.replace(MARKER, generated())
