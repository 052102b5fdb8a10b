"""report.html (fedepic.html_report): one self-contained page per run, written by the lifecycle on every
exit path, that shows the comparison table as comparison.csv has it, every figure of the folder, the
config, versions, lock hash, wall time and the true status."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import pytest

from fedepic import html_report
from fedepic.config import load_config
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle
from fedepic.report import setting_title
from report_pages import EXTERNAL, data_uri, read_report, run_pngs

MEMBERS = ["gossip", "gp", "upper"]
COLUMNS = ["strategy", "mean_accuracy", "exclusive_accuracy", "attack_success", "seconds"]
PANELS = ["mean_accuracy", "exclusive_accuracy"]
ROUNDS = 3


def lifecycle(out: Path, members=MEMBERS) -> RunLifecycle:
    cfg = load_config("dfl_smoke.yaml", [f"output_dir={out}", "name=r", "progress=false", "figures.dpi=60",
                                         "figures.vector=svg"])
    labels = [f"{c} (exclusive)" if c in (7, 8) else str(c) for c in range(10)]
    return RunLifecycle(cfg, members, Comparison(COLUMNS, PANELS, setting_title(cfg), class_labels=labels))


def play(life: RunLifecycle, name: str, skill: float, rounds: int = ROUNDS, complete: bool = True) -> None:
    """A member that logs ``rounds`` rounds with per-class accuracies, as the decentralized runner does."""
    records: list[dict] = []

    def report() -> MemberReport:
        last = records[-1] if records else {}
        row = {"strategy": name, "mean_accuracy": last.get("mean_accuracy"), "exclusive_accuracy": last.get(
            "exclusive_accuracy"), "attack_success": 0.1 / (1 + skill), "seconds": 2.0 + skill}
        curves = {k: [r[k] for r in records] for k in PANELS}
        return MemberReport({**row, "rounds": len(records)}, row, curves)

    writer = life.open_member(name, report)
    for r in range(1, rounds + 1):
        per_class = [min(1.0, 0.3 * r + 0.1 * skill)] * 7 + [skill * r / rounds] * 2 + [None]
        record = {"round": r, "mean_accuracy": 0.5 + 0.1 * skill + 0.05 * r, "exclusive_accuracy": skill * r / rounds,
                  "per_class": per_class}
        writer.log(record)
        records.append(record)
    if complete:
        life.complete(name)


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory) -> Path:
    with lifecycle(tmp_path_factory.mktemp("report")) as life:
        for skill, name in enumerate(MEMBERS):
            play(life, name, skill / 2)
    return life.path


def test_the_report_is_self_contained(completed_run):
    text, page = read_report(completed_run)
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert page.scripts == 0 and "<link" not in text and "@import" not in text and "url(" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(not link.startswith(("/", "file:")) and ":" not in link for link in page.links)
    assert not list(completed_run.glob(".*.tmp")) and not completed_run.name.startswith(".")


def test_the_report_embeds_every_figure_of_the_run_with_its_vector_copy(completed_run):
    text, page = read_report(completed_run)
    pngs = run_pngs(completed_run)
    names = {str(p.relative_to(completed_run)) for p in pngs}
    assert names == {"comparison.png", "per_class.png", "per_class_rounds.png"} | {f"{m}/curves.png" for m in MEMBERS}
    assert set(page.figures) == names  # each once, under its file name
    for png in pngs:
        assert data_uri(png) in page.images  # the bytes of the file itself
        vector = png.with_suffix(".svg")
        assert vector.is_file() and str(vector.relative_to(completed_run)) in page.links


def test_a_figure_no_section_knows_is_embedded_too(completed_run, tmp_path):
    import shutil

    folder = tmp_path / completed_run.name
    shutil.copytree(completed_run, folder)
    shutil.copy(folder / "comparison.png", folder / "gp" / "extra.png")
    page = html_report.run_page(folder)
    other = next(s for s in page.sections if s.title == "Other figures")
    assert [f.name for f in other.figures] == ["gp/extra.png"]
    assert other.figures[0].data_uri == data_uri(folder / "gp" / "extra.png")


def test_the_comparison_table_holds_the_rows_of_comparison_csv(completed_run):
    _, page = read_report(completed_run)
    with open(completed_run / "comparison.csv", newline="") as handle:
        expected = list(csv.reader(handle))[1:]
    shown = [row for row in page.tables["comparison"] if row]
    assert shown == expected and [row[0] for row in shown] == MEMBERS


def test_the_report_states_status_setting_winner_config_and_environment(completed_run):
    text, page = read_report(completed_run)
    summary = json.loads((completed_run / "summary.json").read_text())
    assert page.status == summary["status"] == "completed"
    assert html.escape(setting_title(load_config("dfl_smoke.yaml", ["name=r"]))) in text
    outcome = [row for row in page.tables["outcome"] if row]
    assert outcome[0][:2] == ["mean_accuracy", "upper"] and outcome[0][2] == str(summary["rows"][2]["mean_accuracy"])
    assert ["attack_success", "upper"] in [row[:2] for row in outcome]
    assert "mean accuracy of benign nodes (%), higher is better" in text
    assert html.escape((completed_run / "config.yaml").read_text()) in text
    assert summary["lock"]["sha256"] in text and summary["versions"]["torch"] in text
    assert {"comparison.csv", "summary.json", "config.yaml", "metrics.jsonl"} <= set(page.links)  # the data files
    assert f"{summary['wall_seconds']:.1f} s" in text


def test_an_interrupted_run_reports_interrupted_and_what_did_not_finish(tmp_path):
    with pytest.raises(KeyboardInterrupt), lifecycle(tmp_path) as life:
        play(life, "gossip", 0.0)
        play(life, "gp", 1.0, rounds=2, complete=False)
        raise KeyboardInterrupt
    text, page = read_report(life.path)
    assert page.status == json.loads((life.path / "summary.json").read_text())["status"] == "interrupted"
    assert "The run ended interrupted (SIGINT or SIGTERM): 1 of 3 members finished; not finished: gp, upper." in text
    assert [row[0] for row in page.tables["comparison"] if row] == ["gossip"]
    assert "gp/curves.png" in page.figures  # the member cut short shows what it did
    assert ">interrupted</span>" in text and ">not started</span>" in text


def test_a_failed_run_with_no_finished_member_still_gets_its_report(tmp_path):
    with pytest.raises(RuntimeError), lifecycle(tmp_path) as life:
        raise RuntimeError("data vanished")
    text, page = read_report(life.path)
    assert page.status == "failed" and "No member finished" in text and "comparison" not in page.tables


def test_a_report_or_figure_that_cannot_be_written_changes_no_status(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(html_report, "render_page", broken)
    monkeypatch.setattr("fedepic.plots.heatmap_figure", broken)
    with lifecycle(tmp_path, ["gossip"]) as life:
        play(life, "gossip", 0.5)
    folder = life.path
    assert not folder.name.startswith(".")
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    assert not (folder / "report.html").exists() and (folder / "comparison.png").is_file()
    err = capsys.readouterr().err
    assert "fedepic: warning: report.html not written: OSError: no space left on device" in err
    assert "fedepic: warning: per-class figures not written" in err


def test_the_page_escapes_text_and_links_only_beside_itself():
    section = html_report.Section("s", ["<script>x</script>"], facts=[("run", html_report.link("a/report.html", "a"))])
    text = html_report.render_page(html_report.Page("<b>t</b>", "completed", sections=[section]))
    assert "<script>" not in text and "&lt;script&gt;x&lt;/script&gt;" in text and "&lt;b&gt;t&lt;/b&gt;" in text
    assert '<a href="a/report.html">a</a>' in text
    for href in ("https://cdn.example/x.js", "//cdn.example/x.js", "/etc/passwd", "javascript:alert(1)"):
        with pytest.raises(ValueError):
            html_report.link(href)


@pytest.mark.parametrize("config, words", [
    ("noniid.yaml", ["noniid:", "decentralized MNIST", "20 nodes (4 malicious)", "small_world (k=4, p=0.2)",
                     "attack label_flip", "seed 0"]),
    ("server_noniid.yaml", ["federated MNIST", "20 clients (4 malicious)", "dirichlet (alpha=0.5)", "seed 0"]),
    ("centralized_smoke.yaml", ["centralized cifar10-jpeg (3 classes)", "cnn", "attack gradient_matching", "2 trials",
                                "seed 0"]),
    ("centralized_mnist.yaml attack.data=label_flip attack.targets=3", ["attack label_flip", "3 trials"]),
])
def test_every_mode_states_its_setting_in_its_titles(config, words):
    name, *overrides = config.split()  # every attack trains attack.targets trials, not gradient matching alone
    title = setting_title(load_config(name, overrides))
    assert all(word in title for word in words), title


def test_a_column_marks_in_bold_what_a_reader_sees_as_best():
    """Values that show alike (56.8 and 56.8) are both best, whatever their last digits; a column where
    every row shows alike marks none; lower is better where the quantity says so."""
    assert html_report._best_rows("mean_accuracy", ["0.5681", "0.5683", "0.30"]) == {0, 1}
    assert html_report._best_rows("mean_accuracy", ["0.5681", "0.5683"]) == set()
    assert html_report._best_rows("attack_success", ["0.5", "0.1", ""]) == {1}
    assert html_report._best_rows("consensus_distance", ["0.5", "0.1"]) == set()  # not a ranked measure

