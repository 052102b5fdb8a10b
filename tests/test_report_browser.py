"""The report of a real smoke run (dfl_smoke, engine=local), read as a person sees it: headless Chromium
loads report.html with every host name unresolvable, the DOM it built holds the comparison table and
every figure of the folder, and its screenshot shows the page drawn (the status badge, the heatmaps)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from report_pages import EXTERNAL, ReportPage, chromium, chromium_binary, data_uri, read_report, run_pngs

WINDOW = (1280, 2600)
COMPLETED_GREEN = (0x2E, 0x7D, 0x32)  # the "completed" badge (report.html.j2)
VIRIDIS_TOP = (0xFD, 0xE7, 0x25)  # 100 % in a heatmap


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The smallest decentralized run with every kind of figure: 2 members, 2 rounds, in this process."""
    from fedepic.simulate import main

    out = tmp_path_factory.mktemp("smoke")
    args = ["config=dfl_smoke.yaml", "engine=local", f"output_dir={out}", "progress=false", "figures.dpi=80",
            "data.synthetic_train=200", "data.synthetic_test=100"]
    assert main(args) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def test_the_smoke_run_report_shows_its_table_and_every_figure(smoke_run):
    text, page = read_report(smoke_run)
    assert not EXTERNAL.search(text) and page.scripts == 0
    pngs = run_pngs(smoke_run)
    assert {str(p.relative_to(smoke_run)) for p in pngs} == {
        "comparison.png", "per_class.png", "per_class_rounds.png", "gossip/curves.png", "gp/curves.png"}
    assert all(data_uri(p) in page.images and p.with_suffix(".pdf").is_file() for p in pngs)
    for png in pngs:  # no figure wider than 3:1, each at the stated dpi
        image = Image.open(png)
        assert image.width / image.height <= 3.0 and image.info["dpi"] == pytest.approx((80, 80), abs=0.01)
    with open(smoke_run / "comparison.csv", newline="") as handle:
        assert [row for row in page.tables["comparison"] if row] == list(csv.reader(handle))[1:]
    assert page.status == json.loads((smoke_run / "summary.json").read_text())["status"] == "completed"


def test_chromium_renders_the_report_with_the_table_and_every_figure(smoke_run, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y --no-install-recommends chromium; "
                    ".ci/run installs it)")
    report = smoke_run / "report.html"
    dom = chromium(binary, report, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = ReportPage()
    page.feed(dom.stdout)
    figures = {str(p.relative_to(smoke_run)) for p in run_pngs(smoke_run)}
    assert page.status == "completed" and set(page.figures) == figures and len(page.images) == len(figures)
    assert [row[0] for row in page.tables["comparison"] if row] == ["gossip", "gp"]

    shot = tmp_path / "report.png"
    drawn = chromium(binary, report, tmp_path / "profile-shot", f"--screenshot={shot}",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert drawn.returncode == 0 and shot.is_file(), drawn.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colours = {colour for _, colour in image.getcolors(maxcolors=WINDOW[0] * WINDOW[1])}
    assert COMPLETED_GREEN in colours  # the stylesheet applied
    assert any(all(abs(a - b) <= 6 for a, b in zip(c, VIRIDIS_TOP)) for c in colours)  # an embedded heatmap drawn
    assert len(colours) > 1000  # figures, not a blank or error page
