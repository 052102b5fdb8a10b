"""report.html: one self-contained page that shows what a run (or a sweep) compared, who won, at what
cost, and how it ended.

The page holds everything it shows: tables as HTML, figures as embedded PNG (base64 ``data:`` URIs),
the resolved config, versions, the lock's hash, wall time and status. It loads nothing (no external
stylesheet, font, image or script; no JavaScript at all: collapsed parts are ``<details>``); the
only links are relative ones to files beside it (the vector copies of the figures, the data files).

Two layers:

- a generic page, :class:`Page` of :class:`Section` s, each with paragraphs, :class:`Table` s,
  :class:`Figure` s, key/value facts, code and sub-sections, rendered by :func:`render_page` through
  one Jinja2 template (``fedepic/templates/report.html.j2``, autoescaped). The template is a file
  shipped as package data rather than a string constant: it is a page of HTML and CSS that reads,
  diffs and is checked as HTML (editors, linters), and Jinja2 loads it from the package by name;
- the run report, :func:`run_page` (from what a run folder holds: summary.json, config.yaml,
  comparison.csv and comparison.md, the members' summary.json and every PNG), written by
  :func:`write_run_report` (atomically, through fedepic.outputs.RunWriter) when the run ends
  (fedepic.lifecycle), whatever its status.

A sweep's report (fedepic.sweep.page) builds its page from the same parts (:class:`Page`,
:class:`Section`, :class:`Table` with :class:`Cell` s, :func:`embed_figure`, :func:`link`,
:func:`config_section`, :func:`environment_section`) and writes it the same way.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jinja2
from PIL import Image  # pillow: matplotlib's own dependency

from fedepic.outputs import RunWriter
from fedepic.quantities import HIGHER, axis_label, display, quantity, with_unit

REPORT = "report.html"
TEMPLATE = "report.html.j2"  # in fedepic/templates (package data)
STATUS_WORDS = {"completed": "completed", "interrupted": "interrupted (SIGINT or SIGTERM)",
                "failed": "failed", "running": "running"}
# root figures: (file stem, caption); a PNG of the folder not named here still gets embedded ("Other figures")
RUN_FIGURES = (
    ("comparison", "One panel per measure, one line per member (the same line style in every figure)."),
    ("per_class", "Per-class test accuracy of each member at its last evaluation: where a defense keeps "
                  "or loses a class."),
    ("per_class_rounds", "Per-class test accuracy over time, one heatmap per member, on one colour scale."),
)
MEMBER_FIGURES = (("curves", "the member's curves, one panel per measure."),)
NOT_SHOWN = ("versions", "lock", "rows", "members", "curves", "trials_detail", "finished")  # shown elsewhere


# ------------------------------------------------------------------------------------- the page


@dataclass
class Cell:
    """A table cell: ``text`` shown (or a :class:`Link`), ``value`` the raw value (the CSV's;
    ``data-value``), ``best`` in bold."""

    text: Any
    value: str = ""
    best: bool = False


@dataclass
class Table:
    """``header``: (label shown, column key); ``rows`` of cells; the first column heads its row."""

    header: list[tuple[str, str]]
    rows: list[list[Cell]]
    caption: str = ""
    css_id: str = ""
    numeric: bool = True  # numbers right-aligned; False: text, left-aligned


@dataclass
class Figure:
    """A PNG embedded as a data URI; ``vector``: the relative name of its PDF or SVG copy, if any;
    ``width``: CSS pixels (the figure's size in inches at 96 per inch, so every figure's print is the
    same size on screen), None for the image's own."""

    name: str
    caption: str
    data_uri: str
    vector: Optional[str] = None
    width: Optional[int] = None


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    facts: list[tuple[str, Any]] = field(default_factory=list)  # key/value rows; a value may be a Link
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: Optional[str] = None
    subsections: list["Section"] = field(default_factory=list)
    collapsed: bool = False  # shown as a <details> the reader opens
    badge: Optional[str] = None  # a status shown beside the title

    @property
    def anchor(self) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in self.title.lower()).strip("-")


@dataclass
class Page:
    title: str
    status: str
    facts: list[tuple[str, Any]] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)  # what was compared, in a sentence or two
    notes: list[str] = field(default_factory=list)  # what the reader must know first (a run cut short)
    sections: list[Section] = field(default_factory=list)


def render_page(page: Page) -> str:
    """The page as one HTML document (autoescaped: every text is shown as text)."""
    env = jinja2.Environment(loader=template_loader(), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(page=page, status_words=STATUS_WORDS)


def template_loader() -> jinja2.BaseLoader:
    """``templates/`` of the fedepic package in use, else of the installed fedepic distribution.

    The fallback is for `flwr run`: Flower imports the app's packages from its bundle (unpacked under
    ``$FLWR_HOME/apps/``), and a bundle carries only .py, .toml, .md, .yaml, .yml, .json and .jsonl files
    (flwr/common/constant.py, FAB_INCLUDE_PATTERNS; `fab-include` may not widen it), so the template is
    not there. The environment the app runs in (the README's: runtime dependency installation off) has
    fedepic installed, template included. The error names both places when neither has it.
    """
    try:
        return jinja2.PackageLoader("fedepic", "templates")
    except ValueError as err:  # no templates/ beside this copy of the package
        folder = installed_templates()
        if folder is None:
            raise ValueError(f"{err} (nor has an installed fedepic distribution; `pip install -e .`)") from None
        return jinja2.FileSystemLoader(str(folder))


def installed_templates() -> Optional[Path]:
    """The installed fedepic distribution's ``fedepic/templates`` folder (the checkout's, for an editable
    install), or None where it has no template."""
    import importlib.metadata
    from urllib.parse import unquote, urlparse

    try:
        dist = importlib.metadata.distribution("fedepic")
    except importlib.metadata.PackageNotFoundError:
        return None
    folders = [Path(str(dist.locate_file("fedepic/templates")))]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")  # PEP 610: where it was installed from
    url = urlparse(direct.get("url", ""))
    if direct.get("dir_info", {}).get("editable") and url.scheme == "file":
        folders.insert(0, Path(unquote(url.path)) / "fedepic" / "templates")
    return next((folder for folder in folders if (folder / TEMPLATE).is_file()), None)


@dataclass(frozen=True)
class Link:
    """A fact's value that links to a file beside the report (the template draws it as <a>)."""

    href: str
    text: str


def link(href: str, text: Optional[str] = None) -> Link:
    """A relative link to a file beside the report (never an absolute URL: the page stays offline)."""
    if ":" in href or href.startswith("/"):
        raise ValueError(f"report links are relative to the report's folder, not {href!r}")
    return Link(href, text or href)


def embed_figure(folder: Path, name: str, caption: str) -> Figure:
    """``folder/name`` (a PNG; ``name`` relative to the report's folder, e.g. ``gp/curves.png``) as a
    figure, with a link to its PDF or SVG copy when one lies beside it."""
    path = folder / name
    vector = next((str(Path(name).with_suffix(s)) for s in (".pdf", ".svg") if path.with_suffix(s).is_file()), None)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return Figure(name, caption, f"data:image/png;base64,{data}", vector, _css_width(path))


def _css_width(path: Path) -> Optional[int]:
    """The PNG's width in CSS pixels (96 per inch) from its pixels and the dpi it states (pHYs)."""
    with Image.open(path) as image:
        dpi = image.info.get("dpi")
        return round(image.width * 96 / float(dpi[0])) if dpi and dpi[0] else None


def csv_table(path: Path, caption: str = "", css_id: str = "") -> Table:
    """A CSV file (a header row, then one row per member) as a table: values in their quantity's unit
    (fedepic.quantities), the raw CSV text in ``data-value``, the best value of a ranked column in bold."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        columns = next(reader, [])
        raw = [row for row in reader]
    best = {c: _best_rows(c, [r[i] if i < len(r) else "" for r in raw]) for i, c in enumerate(columns)}
    rows = [[Cell(display(c, _number(row[i]) if i < len(row) else ""), row[i] if i < len(row) else "",
                  j in best[c]) for i, c in enumerate(columns)] for j, row in enumerate(raw)]
    return Table([(axis_label(c), c) for c in columns], rows, caption, css_id)


def _number(text: str) -> Any:
    """A CSV cell as a number where it is one (ints stay ints), else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _best_rows(column: str, cells: Sequence[str]) -> set[int]:
    """The rows a reader sees as best in a ranked column: every row whose value, as shown (``display``),
    equals the best one's (56.8 and 56.8 are both bold, whatever their last digits), none when that is
    every row or there is a single row (the sweep's tables mark the same way)."""
    better = quantity(column).better
    values = {j: v for j, c in enumerate(cells) if isinstance(v := _number(c), (int, float)) and math.isfinite(v)}
    if better is None or len(values) < 2:
        return set()
    top = display(column, max(values.values()) if better == HIGHER else min(values.values()))
    best = {j for j, v in values.items() if display(column, v) == top}
    return best if len(best) < len(values) else set()


# ------------------------------------------------------------------------------------ the run report


def write_run_report(writer: RunWriter, members: Optional[Sequence[str]] = None, title: Optional[str] = None) -> None:
    """report.html of the run folder ``writer.dir`` (see :func:`run_page`), written atomically."""
    writer.write_text(REPORT, render_page(run_page(writer.dir, members, title)))


def run_page(folder: Path, members: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Page:
    """The report of a run folder, from what it holds.

    ``members``: the run's members in order (a member without a folder never started; the default is
    the finished members, then the other member folders); ``title``: the setting (default:
    comparison.md's title, else the run's name).
    """
    summary = _read_json(folder / "summary.json")
    config = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    members = list(members) if members is not None else _member_folders(folder, summary)
    status = str(summary.get("status", "unknown"))
    finished = list(summary.get("finished", []))
    page = Page(title or _comparison_title(folder) or folder.name, status, _run_facts(folder, summary, members),
                [f"Compared: {', '.join(members)}."] if members else [], _notes(summary, members, finished))
    page.sections = [
        _outcome_section(folder, summary),
        _comparison_section(folder),
        _members_section(folder, members, finished),
        _details_section(summary),
        config_section(config),
        environment_section(summary),
        _files_section(folder),
    ]
    page.sections.append(_other_figures(folder, page.sections))
    page.sections = [s for s in page.sections if _has_content(s)]
    return page


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _member_folders(folder: Path, summary: Mapping[str, Any]) -> list[str]:
    finished = list(summary.get("finished", []))
    others = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "summary.json").is_file()
                    and p.name not in finished)
    return finished + others


def _comparison_title(folder: Path) -> Optional[str]:
    path = folder / "comparison.md"
    first = path.read_text().splitlines()[0] if path.is_file() else ""
    return first[2:].strip() if first.startswith("# ") else None


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    minutes, rest = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes} min {rest:.0f} s"
    return f"{minutes} min {rest:.1f} s" if minutes else f"{rest:.1f} s"


def _run_facts(folder: Path, summary: Mapping[str, Any], members: Sequence[str]) -> list[tuple[str, Any]]:
    lock = summary.get("lock") or {}
    return [
        ("status", STATUS_WORDS.get(summary.get("status", ""), summary.get("status", "unknown"))),
        ("mode", summary.get("mode", "")),
        ("run folder", folder.name.removeprefix(".").removesuffix(".partial")),
        ("members finished", f"{len(summary.get('finished', []))} of {len(members)}"),
        ("wall time", _duration(summary.get("wall_seconds"))),
        ("resumed", "yes" if summary.get("resumed") else "no"),
        ("lock sha256", (lock.get("sha256") or "no lock file")[:16]),
    ]


def _notes(summary: Mapping[str, Any], members: Sequence[str], finished: Sequence[str]) -> list[str]:
    status = summary.get("status")
    if status == "completed":
        return []
    left = [m for m in members if m not in finished]
    what = f"The run ended {STATUS_WORDS.get(status, status)}"
    done = f"{len(finished)} of {len(members)} members finished" if members else "no member started"
    tail = f"; not finished: {', '.join(left)}" if left else ""
    return [f"{what}: {done}{tail}. The comparison covers the finished members only."]


def _outcome_section(folder: Path, summary: Mapping[str, Any]) -> Section:
    """Who won each ranked measure (ties: every member) and at what cost: the winners' time, and the
    fastest member's."""
    rows = list(summary.get("rows", []))
    section = Section("Outcome")
    if not rows:
        section.paragraphs.append("No member finished, so there is nothing to compare.")
        return section
    columns = _comparison_columns(folder) or list(rows[0])
    key = columns[0]  # the member's name (strategy, defense)
    table = Table([("measure", "measure"), ("best member", "best"), ("its value", "value"),
                   ("its time", "seconds")], [], "The best member of each ranked measure of the comparison.",
                  "outcome", numeric=False)
    for column in (c for c in columns if c != "seconds" and quantity(c).better is not None):
        best = sorted(_best_rows(column, [_csv_text(r.get(column)) for r in rows]))
        if best:
            way = "higher" if quantity(column).better == HIGHER else "lower"
            winners = ", ".join(str(rows[j][key]) for j in best)
            table.rows.append([Cell(f"{axis_label(column)}, {way} is better", column), Cell(winners, winners),
                               Cell(with_unit(column, rows[best[0]][column]), _csv_text(rows[best[0]][column])),
                               Cell(", ".join(with_unit("seconds", rows[j].get("seconds")) for j in best))])
    if not table.rows:
        section.paragraphs.append("No ranked measure separates the members: they tie on every one.")
    else:
        lead = table.rows[0]
        section.paragraphs.append(f"Best {quantity(lead[0].value).label}: {lead[1].text} with {lead[2].text}, "
                                  f"in {lead[3].text}.")
        section.tables.append(table)
    timed = [(r["seconds"], r[key]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    if timed:
        fastest = min(timed)
        section.paragraphs.append(f"Fastest member: {fastest[1]}, {with_unit('seconds', fastest[0])}.")
    return section


def _comparison_columns(folder: Path) -> list[str]:
    path = folder / "comparison.csv"
    return next(csv.reader(path.read_text().splitlines()), []) if path.is_file() else []


def _csv_text(value: Any) -> str:
    return "" if value is None else str(value)


def _comparison_section(folder: Path) -> Section:
    section = Section("Comparison")
    if (folder / "comparison.csv").is_file():
        section.tables.append(csv_table(folder / "comparison.csv", "One row per finished member: the rows of "
                                        "comparison.csv, in the units of the header; the best value of each "
                                        "ranked column in bold.", "comparison"))
    section.figures = [embed_figure(folder, f"{stem}.png", caption) for stem, caption in RUN_FIGURES
                       if (folder / f"{stem}.png").is_file()]
    return section


def _members_section(folder: Path, members: Sequence[str], finished: Sequence[str]) -> Section:
    section = Section("Members", [f"{len(members)} members, in run order; open one for its curves and "
                                  "final figures."])
    for name in members:
        member_dir = folder / name
        summary = _read_json(member_dir / "summary.json")
        status = summary.get("status", "not started" if not member_dir.is_dir() else "unknown")
        sub = Section(name, collapsed=True, badge=str(status))
        if "error" in summary:
            sub.paragraphs.append(f"Stopped by: {summary['error']}")
        sub.facts = _facts(summary)
        sub.figures = [embed_figure(folder, f"{name}/{stem}.png", f"{name}: {caption}")
                       for stem, caption in MEMBER_FIGURES if (member_dir / f"{stem}.png").is_file()]
        section.subsections.append(sub)
    return section


def _facts(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Key/value rows of a summary: numbers in their units, short lists of numbers joined, the rest
    (long lists, records) named with where they are."""
    out = []
    for key, value in values.items():
        if key in NOT_SHOWN or key == "status" or key == "error":
            continue
        numbers = isinstance(value, list) and all(isinstance(v, (int, float)) or v is None for v in value)
        if numbers and len(value) <= 20:
            shown = ", ".join(display(key, v) or "n/a" for v in value) or "none"
        elif isinstance(value, (list, dict)):
            shown = _structure(value)
        else:
            shown = display(key, value) if value is not None else "n/a"
        unit = quantity(key).unit
        out.append((axis_label(key) if unit else key.replace("_", " "), shown))
    return out


def _structure(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 160 else f"{len(value)} entries (in summary.json)"


def _details_section(summary: Mapping[str, Any]) -> Section:
    return Section("Run details", ["The root summary's own figures (summary.json)."], _facts(
        {k: v for k, v in summary.items() if k not in ("mode", "resumed", "wall_seconds")}), collapsed=True)


def config_section(config_text: str) -> Section:
    """The resolved config (config.yaml) as written when the run started."""
    return Section("Resolved config", ["config.yaml: every key, defaults included."], code=config_text or None,
                   collapsed=True)


def environment_section(summary: Mapping[str, Any]) -> Section:
    """Versions, the lock's file, hash and differences, wall time."""
    lock = summary.get("lock") or {}
    differs = lock.get("differs")
    wall = summary.get("wall_seconds")
    facts: list[tuple[str, Any]] = [(k, v) for k, v in (summary.get("versions") or {}).items()]
    facts += [("lock file", lock.get("file") or "n/a"), ("lock sha256", lock.get("sha256") or "n/a"),
              ("packages differing from the lock", "; ".join(differs) if differs else
               "none" if differs is not None else "not checked"),
              ("wall time", f"{_duration(wall)} ({with_unit('seconds', wall)})")]
    return Section("Environment", facts=facts, collapsed=True)


def _files_section(folder: Path) -> Section:
    """Links to the run's data files beside the report (tables, summaries, metrics, JSON, poisons)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix not in (".png", ".pdf", ".svg", ".html", ".pt"))
    return Section("Files", ["The run's data files, beside this page (each member's are in its folder)."],
                   facts=[(name, link(name)) for name in names], collapsed=True)


def _other_figures(folder: Path, sections: Sequence[Section]) -> Section:
    """Every PNG of the folder (root and members) that no section shows: a report leaves none out."""
    shown = {f.name for s in sections for part in (s, *s.subsections) for f in part.figures}
    rest = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if not p.name.startswith("."))
    return Section("Other figures", figures=[embed_figure(folder, name, name) for name in rest if name not in shown])


def _has_content(section: Section) -> bool:
    return bool(section.paragraphs or section.facts or section.tables or section.figures or section.code
                or section.subsections)
