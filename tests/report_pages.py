"""What the report tests read out of a report.html: its tables, figures, links and status (stdlib parser)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)


class ReportPage(HTMLParser):
    """The parts of a report page the tests check."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}  # table id -> its rows, as their cells' data-value
        self.images: list[str] = []  # every <img src>
        self.figures: list[str] = []  # every <figure data-file>
        self.links: list[str] = []  # every href
        self.status = ""
        self.scripts = 0
        self._table = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table and "data-value" in a:
            self.tables[self._table][-1].append(a["data-value"])
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "figure":
            self.figures.append(a.get("data-file", ""))
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        if a.get("id") == "run-status":
            self.status = a.get("data-status", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = ""


def read_report(folder: Path) -> tuple[str, ReportPage]:
    text = (folder / "report.html").read_text()
    page = ReportPage()
    page.feed(text)
    return text, page


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def run_pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND")  # and no name resolves: the page must need none


def chromium_binary() -> str | None:
    """Debian's chromium (``apt-get install chromium``; .ci/run installs it), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(binary: str, page: Path, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with a fresh profile folder; ``args``: --screenshot=..., --dump-dom."""
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=timeout)
