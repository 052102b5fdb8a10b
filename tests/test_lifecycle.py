"""fedepic.lifecycle: one run folder's members, statuses, comparison and root summary on every exit path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedepic.checkpoint import CHECKPOINT, Resume
from fedepic.config import load_config
from fedepic.errors import RunInterrupted
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def lifecycle(out: Path, resume: Resume | None = None) -> RunLifecycle:
    cfg = load_config("dfl_smoke.yaml", [f"output_dir={out}", "name=r", "progress=false"])
    return RunLifecycle(cfg, ["a", "b", "c"], Comparison(["strategy", "score"], ["score"], "T"), resume=resume,
                        extras=lambda rows: {"best": max(r["score"] for r in rows) if rows else None})


def report(name: str, scores: list[float]) -> MemberReport:
    row = {"strategy": name, "score": scores[-1] if scores else None}
    return MemberReport({**row, "rounds": len(scores)}, row, {"score": scores})


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "failed"),
                                           (RunInterrupted("interrupted by SIGTERM"), "interrupted")])
def test_every_exit_path_writes_true_statuses(tmp_path: Path, error: BaseException, status: str) -> None:
    scores: dict[str, list[float]] = {"a": [], "b": []}
    with pytest.raises(type(error)), lifecycle(tmp_path) as life:
        for name in ("a", "b"):
            member = life.open_member(name, lambda n=name: report(n, scores[n]))
            (member.dir / CHECKPOINT).write_bytes(b"x")
            scores[name] += [0.5, 0.75]
        life.complete("a")
        raise error
    folder = life.path
    root = read(folder / "summary.json")
    assert root["status"] == status and root["mode"] == "decentralized" and root["finished"] == ["a"]
    assert root["rows"] == [{"strategy": "a", "score": 0.75}] and root["best"] == 0.75 and root["resumed"] is False
    assert (folder / "comparison.csv").read_text().splitlines() == ["strategy,score", "a,0.75"]
    assert (folder / "comparison.png").is_file() and (folder / "a" / "curves.png").is_file()
    assert f'data-status="{status}"' in (folder / "report.html").read_text()  # the report, with the true status
    assert read(folder / "a" / "summary.json")["status"] == "completed" and not (folder / "a" / CHECKPOINT).exists()
    cut = read(folder / "b" / "summary.json")
    assert cut["status"] == status and cut["rounds"] == 2 and cut["error"] == str(error)
    assert (folder / "b" / CHECKPOINT).exists()  # a resume continues from it
    assert not (folder / "c").exists()  # never started: no folder


def test_a_completed_run_keeps_no_checkpoints_and_no_member_left_running(tmp_path: Path) -> None:
    with lifecycle(tmp_path) as life:
        for name in ("a", "b", "c"):
            life.open_member(name, lambda n=name: report(n, [1.0]))
            (life.root.dir / CHECKPOINT).write_bytes(b"x")
            life.complete(name)
    assert read(life.path / "summary.json")["status"] == "completed" and not list(life.path.glob(f"**/{CHECKPOINT}"))

    with lifecycle(tmp_path / "early") as life:  # the body returned with a member still open
        life.open_member("a", lambda: report("a", []))
    root = read(life.path / "summary.json")
    assert root["status"] == "failed" and root["finished"] == [] and not (life.path / "comparison.md").exists()
    assert read(life.path / "a" / "summary.json")["error"] == "the run ended before a, b, c finished"


def test_a_resume_keeps_continues_and_restarts_members(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), lifecycle(tmp_path) as first:
        for name in ("a", "b", "c"):
            member = first.open_member(name, lambda n=name: report(n, [0.25]))
            member.log({"round": 1})
            member.log({"round": 2})
        first.complete("a")
        raise KeyboardInterrupt
    folder = first.path
    kept = (folder / "a" / "summary.json").read_text()
    members = {m: read(folder / m / "summary.json") for m in ("a", "b", "c")}
    with lifecycle(tmp_path, Resume(folder, None, members)) as life:
        assert life.kept("a") and not life.kept("b") and life.kept_summary("a")["rounds"] == 1
        life.keep("a", {"strategy": "a", "score": 0.25}, {"score": [0.25]})
        b = life.open_member("b", lambda: report("b", [0.5]), continue_at=len('{"round": 1}\n'))
        assert (b.dir / "metrics.jsonl").read_text() == '{"round": 1}\n'  # round 2 is played again
        c = life.open_member("c", lambda: report("c", [0.5]))
        assert list(c.dir.iterdir()) == [c.dir / "metrics.jsonl"] and (c.dir / "metrics.jsonl").read_text() == ""
        life.complete("b")
        life.complete("c")
    assert life.path == folder and (folder / "a" / "summary.json").read_text() == kept
    root = read(folder / "summary.json")
    assert root["status"] == "completed" and root["resumed"] is True and root["finished"] == ["a", "b", "c"]


def test_start_over_empties_the_reopened_folder(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), lifecycle(tmp_path) as first:
        first.root.log({"event": "x"})
        first.root.write_text("poisons-trial0.npz", "p")
        first.open_member("a", lambda: report("a", [1.0]))
        first.complete("a")
        raise KeyboardInterrupt
    folder = first.path
    with lifecycle(tmp_path, Resume(folder, None, {"a": read(folder / "a" / "summary.json")})) as life:
        assert life.kept("a")
        life.start_over()
        assert not life.kept("a")
        assert sorted(p.name for p in life.root.dir.iterdir()) == [".lock", "config.yaml", "metrics.jsonl"]
        life.root.log({"event": "y"})
    assert (folder / "metrics.jsonl").read_text() == '{"event": "y"}\n'


def test_a_member_whose_report_fails_does_not_leave_the_others_open(tmp_path: Path) -> None:
    def broken() -> MemberReport:
        raise ValueError("report broke")

    with pytest.raises(RunInterrupted), lifecycle(tmp_path) as life:
        life.open_member("a", broken)
        life.open_member("b", lambda: report("b", [0.5]))
        raise RunInterrupted("interrupted by SIGINT")
    folder = life.path
    assert not folder.name.startswith(".") and read(folder / "summary.json")["status"] == "interrupted"
    assert read(folder / "a" / "summary.json")["status"] == "interrupted"  # RunWriter's fallback summary
    assert read(folder / "b" / "summary.json")["status"] == "interrupted"
