"""A run folder that nothing can corrupt: resume never writes through a link, and a second process on a
running folder (a resume of a live run) is refused in one line while the live run goes on untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_bad_inputs import assert_one_line
from tests.test_federated import ENV, PYTHON, REPO, kill_group, read_jsonl
from tests.test_resume import cli

# a decentralized run on the in-process engine: a few seconds, checkpoints every round
SMALL = ["config=dfl_smoke.yaml", "engine=local", "strategies=[gossip]", "progress=false",
         "figures.enabled=false"]


def _main(args: list[str], capsys) -> tuple[int, str]:
    from fedepic.simulate import main

    code = main(args)
    return code, capsys.readouterr().err


def _interrupted_run(out: Path) -> Path:
    """A finished run folder marked interrupted (as a SIGINT leaves it), with a checkpoint to resume."""
    done = cli([*SMALL, f"output_dir={out}", "rounds=3"])
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.mark.parametrize("plant", ["root metrics", "member metrics", "member folder", "hard link"])
def test_resume_refuses_a_planted_link(tmp_path, capsys, plant):
    folder = _interrupted_run(tmp_path / "runs")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    if plant == "root metrics":
        (folder / "metrics.jsonl").unlink()
        (folder / "metrics.jsonl").symlink_to(outside)
    elif plant == "member metrics":
        (folder / "gossip" / "metrics.jsonl").unlink()
        (folder / "gossip" / "metrics.jsonl").symlink_to(outside)
    elif plant == "member folder":
        elsewhere = tmp_path / "elsewhere"
        os.replace(folder / "gossip", elsewhere)
        (folder / "gossip").symlink_to(elsewhere, target_is_directory=True)
    else:
        (folder / "metrics.jsonl").unlink()
        os.link(outside, folder / "metrics.jsonl")
    before_folder, before_outside = _snapshot(folder), outside.read_bytes()
    code, err = _main([f"resume={folder}"], capsys)
    assert_one_line(code, err, ["resume", "link"])
    assert outside.read_bytes() == before_outside, "the resume wrote through the link"
    assert folder.is_dir() and _snapshot(folder) == before_folder, "the refused resume changed the run folder"


def test_metrics_are_never_appended_through_a_link(tmp_path):
    from fedepic.checkpoint import truncate_metrics
    from fedepic.outputs import open_append

    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(OSError):
        open_append(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError):
        truncate_metrics(tmp_path, 0)
    assert outside.read_text() == "precious\n"


def test_a_resume_of_a_live_run_is_refused_and_the_run_goes_on(tmp_path, capsys):
    """The issue's repro: ``resume=`` while the run still runs. The live run keeps its lock, the resume
    says so in one line and writes nothing, and the run completes with one line per round."""
    out, rounds = tmp_path / "runs", 25
    proc = subprocess.Popen([PYTHON, "-m", "fedepic.simulate", *SMALL, f"output_dir={out}", f"rounds={rounds}"],
                            cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, partial = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None and partial is None:
            partial = next((p for p in out.glob(".*.partial") if (p / "gossip" / "metrics.jsonl").is_file()
                            and (p / "gossip" / "metrics.jsonl").read_text().count("\n") >= 2), None)
            time.sleep(0.05)
        assert partial is not None and proc.poll() is None, "the run ended before the resume could be tried"
        final = partial.with_name(partial.name[1:-len(".partial")])
        for name in (final, partial):  # under either name, as a user may type it
            code, err = _main([f"resume={name}"], capsys)
            assert_one_line(code, err, ["resume", "another process is running this run"])
        assert proc.poll() is None, "the live run was disturbed"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
    assert proc.returncode == 0, stderr[-2000:]
    assert Path(stdout.strip().splitlines()[-1]) == final
    assert [p.name for p in out.iterdir()] == [final.name], "a second folder was left"
    assert json.loads((final / "summary.json").read_text())["status"] == "completed"
    assert len(read_jsonl(final / "gossip" / "metrics.jsonl")) == rounds
    assert not (final / ".lock").exists()


def test_a_killed_run_leaves_no_stale_lock(tmp_path, capsys):
    """flock goes with the process: a SIGKILLed run (its lock file left behind) resumes normally."""
    out = tmp_path / "runs"
    proc = subprocess.Popen([PYTHON, "-m", "fedepic.simulate", *SMALL, f"output_dir={out}", "rounds=10"],
                            cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, partial = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None and partial is None:
            partial = next((p for p in out.glob(".*.partial") if (p / "gossip" / "checkpoint.pt").is_file()), None)
            time.sleep(0.05)
        assert partial is not None, "the run wrote no checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
    assert (partial / ".lock").exists()
    done = cli([f"resume={partial}"])
    assert done.returncode == 0, done.stderr[-2000:]
    final = Path(done.stdout.strip().splitlines()[-1])
    assert json.loads((final / "summary.json").read_text())["status"] == "completed"
    assert len(read_jsonl(final / "gossip" / "metrics.jsonl")) == 10


def test_a_new_run_that_cannot_write_its_config_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The issue's full disk at the start of a centralized run: one line naming the file, no folder left."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def full(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".config.yaml."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # names no file, as a failed write() does
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    out = tmp_path / "deep" / "runs"
    code, err = _main(["config=centralized_mnist", "data.name=synthetic", "data.synthetic_train=50",
                       "data.synthetic_test=20", "progress=false", f"output_dir={out}"], capsys)
    assert_one_line(code, err, ["cannot write", "config.yaml", "No space left on device"])
    assert list(tmp_path.iterdir()) == [], "a folder was left behind"


def test_a_resume_that_finds_the_run_completed_under_the_lock_is_refused(tmp_path):
    """The live run may complete between resume_config's checks and the resume taking the lock: the
    status is read again under the lock, and the completed run is left as it is."""
    from fedepic.errors import ConfigError
    from fedepic.outputs import RunWriter

    done = cli([*SMALL, f"output_dir={tmp_path}", "rounds=2"])
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    before = _snapshot(folder)
    with pytest.raises(ConfigError, match="completed while this resume started"):
        RunWriter(tmp_path, folder.name, resume=folder).__enter__()
    assert _snapshot(folder) == before and not (folder / ".lock").exists()


def test_the_lock_is_taken_again_when_its_file_was_replaced(tmp_path, monkeypatch):
    """The holder unlinks .lock as it releases it: a process that opened the old file and locks it
    after that holds a file nobody else sees, so lock_folder checks the inode and opens the file again."""
    import fcntl as real_fcntl

    from fedepic import outputs

    calls = []
    real_flock = real_fcntl.flock

    def flock_after_a_release(fd, op):
        real_flock(fd, op)
        if not calls:  # the first file we locked is unlinked and replaced, as a releasing holder does
            calls.append(fd)
            (tmp_path / ".lock").unlink()
            (tmp_path / ".lock").write_text("")

    monkeypatch.setattr(outputs.fcntl, "flock", flock_after_a_release)
    fd = outputs.lock_folder(tmp_path, "resume")
    try:
        assert len(calls) == 1
        assert os.fstat(fd).st_ino == os.stat(tmp_path / ".lock").st_ino
    finally:
        os.close(fd)


def test_only_a_hard_linked_metrics_file_is_refused(tmp_path, capsys):
    """Files other than metrics.jsonl are replaced by a rename, never written through: a folder backed
    up with hard links (cp -al) resumes."""
    folder = _interrupted_run(tmp_path / "runs")
    backup = tmp_path / "backup.yaml"
    os.link(folder / "config.yaml", backup)
    code, err = _main([f"resume={folder}"], capsys)
    assert code == 0, err
    assert backup.read_bytes() != b"" and json.loads((folder / "summary.json").read_text())["status"] == "completed"


def test_a_new_run_never_removes_a_folder_another_process_made(tmp_path):
    """Two runs started in the same second with the same name: the one whose mkdir loses the race
    fails, and leaves the other's folder as it is."""
    from fedepic.outputs import RunWriter

    writer = RunWriter(tmp_path, "same", stamp="20261207-000000")
    writer.dir.mkdir()
    (writer.dir / "config.yaml").write_text("theirs\n")
    with pytest.raises(FileExistsError):
        writer.__enter__()
    assert (writer.dir / "config.yaml").read_text() == "theirs\n"
