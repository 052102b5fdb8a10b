"""The documentation site: the config reference is generated from the code and covers every key and
registry; `mkdocs build --strict` builds the site (a warning fails it), and headless Chromium renders the
config reference page with its tables; the README stays a short guide whose Quick start is two commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedepic.config_reference import keys_table, markdown, schema_rows
from report_pages import chromium, chromium_binary
from test_domains import all_keys

REPO = Path(__file__).resolve().parent.parent


def test_the_config_reference_covers_every_key_of_the_schema() -> None:
    rows = dict(schema_rows())
    expected = {key for key, _, _ in all_keys() if key != "sweep"}  # "sweep" itself: its axes and settings
    assert expected <= rows.keys(), sorted(expected - rows.keys())
    assert rows["log.tensorboard"][1:3] == ["bool", "false"]
    assert rows["figures.dpi"][1:4] == ["int", "`150`", "[50, 600]"]
    assert rows["mode"][3] == "one of `centralized`, `federated`, `decentralized`"
    assert rows["train.lr"][3] == "> 0" and rows["data.root"][1:3] == ["str or null", "null"]
    assert "PNG resolution, dots per inch" in rows["figures.dpi"][4]  # the comment beside the field
    table = keys_table()
    assert all(f"| `{key}` |" in table for key in expected)


def test_the_page_holds_the_marker_the_hook_replaces() -> None:
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(REPO / "docs"))
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    assert hooks.MARKER in page
    assert hooks.on_page_markdown(page, page=None) == page.replace(hooks.MARKER, markdown())


def test_the_readme_is_a_short_guide_with_a_two_command_quick_start() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quick, re.S)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "fedepic.simulate config=noniid.yaml" in commands[0] and "pytest" in commands[1]
    assert all("uv run --locked" in c for c in commands)  # the environment comes from uv.lock each time
    assert "FEDEPIC_DATA" in quick
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):  # every link to the docs names a file that exists
        assert (REPO / link).is_file(), link


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (uv run installs it)")
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_the_generated_reference(site: Path) -> None:
    html = (site / "reference" / "config" / "index.html").read_text()
    assert "generated: fedepic.config_reference" not in html  # the hook replaced the marker
    for key, _ in schema_rows():
        assert f"<code>{key}</code>" in html, key
    assert (site / "reference" / "api" / "index.html").read_text().count("fedepic.config_reference") >= 1
    for page in ("results/defenses", "guides/tensorboard", "install"):
        assert (site / page / "index.html").is_file()


def test_chromium_shows_the_config_reference(site: Path, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y --no-install-recommends chromium; "
                    ".ci/run installs it)")
    page = site / "reference" / "config" / "index.html"
    dom = chromium(binary, page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1" in dom.stdout and "Config reference" in dom.stdout
    assert dom.stdout.count("<tr") > len(schema_rows())  # the keys' rows and the registries' rows, drawn
    assert "<code>log.tensorboard</code>" in dom.stdout
