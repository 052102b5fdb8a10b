"""`flwr run` end to end (README, "Running on a Ray cluster"), the wrapper that bounds it
(simulations/flwr_run.py), and report.html from a Flower app bundle.

The end-to-end test runs the README's command through the wrapper, from a copy of the checkout and a
fresh FLWR_HOME, on ports of
its own (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, FLWR_LOCAL_CONTROL_API_PORT): `flwr run` reuses whatever
SuperLink already listens on its port, whatever FLWR_HOME says, so on the default port the test could
run in someone else's SuperLink (its working directory and environment) or leave one behind. It stops
the SuperLink it started by process id (flwr has no command for that), and checks that the SuperExec
and the simulation process under it are gone too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from simulations import flwr_run

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLOWER_TOOLS = ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation")
# a copy of the checkout without what .gitignore leaves out of the app anyway
CHECKOUT_SKIP = (".git", ".venv*", ".data", ".data.lock", ".ci-data", ".carry", ".wheels", "runs", "__pycache__",
                 ".pytest_cache", "*.egg-info")
RUN_TIMEOUT_S = 150  # the wrapper's --timeout; the run itself takes about 30 s on an idle 2-core CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def parent_of(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def superlink_pids(flwr_home: Path) -> list[int]:
    """The `flower-superlink` processes whose database is in ``flwr_home`` (so: the one this test started)."""
    database = str(flwr_home / "local-superlink" / "state.db")
    return [pid for pid in all_pids()
            if any(arg.endswith("flower-superlink") for arg in cmdline(pid)[:2]) and database in cmdline(pid)]


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p in all_pids() if parent_of(p) == parent]
        found += children
        frontier += children
    return found


def stop_by_pid(pids: list[int], grace_s: float = 20.0) -> list[int]:
    """SIGTERM each, then SIGKILL what is left after ``grace_s``; the pids still alive after that."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in (p for p in pids if alive(p)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    return [p for p in pids if alive(p)]


@pytest.mark.slow
def test_readme_flwr_run_completes_and_writes_the_report(tmp_path, data_root):
    if not sys.platform.startswith("linux"):
        pytest.skip("finds and stops the SuperLink it starts through /proc (Linux only)")
    missing = [tool for tool in FLOWER_TOOLS if not (BIN / tool).is_file()]
    if missing:
        pytest.skip(f"not beside {sys.executable}: {', '.join(missing)} (`flwr run` needs this venv's Flower)")
    flwr_home, out = tmp_path / "flwr-home", tmp_path / "runs"
    port, control_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FEDEPIC_DATA": str(data_root), "RAY_USAGE_STATS_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    env.pop("RAY_ADDRESS", None)  # Flower's ray.init would attach to that cluster
    overrides = (f"rounds=1 clients.count=2 strategies=[fedavg] data.train_per_class=20 data.test_per_class=10 "
                 f"output_dir={out}")
    command = [sys.executable, "-m", "simulations.flwr_run", "--timeout", str(RUN_TIMEOUT_S), ".", "local",
               "--run-config", f"fedepic-config='server_noniid.yaml' fedepic-overrides='{overrides}'",
               "--federation-config", "num-supernodes=2"]
    started = time.monotonic()
    app = tmp_path / "checkout"  # `flwr run .` reads every file under `.` before filtering: ~11 s for a .venv
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(*CHECKOUT_SKIP))
    try:
        done = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S + 60)
        log = done.stdout[-4000:] + done.stderr[-4000:]
        assert done.returncode == 0, log
        assert f"127.0.0.1:{port}" in done.stdout, log  # our own SuperLink, not one already running
        assert "finished:completed" in done.stderr, log
        folders = [p for p in out.iterdir() if not p.name.startswith(".")]
        assert len(folders) == 1 and not list(out.glob(".*partial")), log
        assert json.loads((folders[0] / "summary.json").read_text())["status"] == "completed"
        assert (folders[0] / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
        assert f"fedepic: run completed: {folders[0]}" in done.stdout, log  # the ServerApp's line, streamed
        listed = subprocess.run([str(BIN / "flwr"), "ls", "local", "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=60).stdout
        runs = json.loads(listed[listed.index("{"):])["runs"]
        assert [run["status"] for run in runs] == ["finished:completed"], listed
    finally:
        links = superlink_pids(flwr_home)
        under = [p for pid in links for p in descendants(pid)]  # the SuperExec, and any simulation left
        left = stop_by_pid(links)
        left += stop_by_pid([p for p in under if alive(p)], grace_s=10)
        print(f"flwr run test: {time.monotonic() - started:.1f} s; stopped SuperLink pid(s) {links}")
    assert len(links) == 1, f"expected the one SuperLink this test started, found {links}"
    assert not left, f"processes still alive after SIGTERM/SIGKILL: {left}"


# --------------------------------------------------------------------------- the wrapper, on a stand-in flwr


def fake_flwr(tmp_path: Path, status: str, details: str = "N/A", run_s: float = 0.0) -> Path:
    """An executable standing in for `flwr`: `run` prints the started run and streams for ``run_s``;
    `ls` lists it with ``status``; `stop` leaves a file behind."""
    script = tmp_path / "flwr"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys, time
        from pathlib import Path
        command = sys.argv[1]
        if command == "run":
            print("Successfully started run 42", flush=True)
            time.sleep({run_s})
        elif command == "ls":
            print(json.dumps({{"success": True, "runs": [{{"run-id": "42", "status": {status!r},
                                                          "status-details": {details!r}}}]}}))
        elif command == "stop":
            Path({str(tmp_path / "stopped")!r}).write_text(" ".join(sys.argv[2:]))
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.parametrize("status, details, code", [
    ("finished:completed", "N/A", 0),
    ("finished:failed", "No heartbeat received from the task", 1),
    ("finished:failed", "Simulation failed with exception: boom", 1),
])
def test_wrapper_exit_status_follows_the_run(tmp_path, monkeypatch, capsys, status, details, code):
    monkeypatch.setattr(flwr_run, "flwr_executable", lambda: str(fake_flwr(tmp_path, status, details)))
    assert flwr_run.main(["--timeout", "30", ".", "local"]) == code
    err = capsys.readouterr().err
    assert f"run 42 {status}" in err
    assert ("flwr-simulation" in err) == ("heartbeat" in details)  # the hint for a runtime that died


def test_wrapper_stops_a_run_that_overruns(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flwr_run, "flwr_executable", lambda: str(fake_flwr(tmp_path, "running", run_s=60)))
    monkeypatch.setattr(flwr_run, "POLL_S", 0.1)
    started = time.monotonic()
    assert flwr_run.main(["--timeout", "2", ".", "local", "--run-config", "a=1"]) == 124
    assert time.monotonic() - started < 20
    assert (tmp_path / "stopped").read_text() == "42 local"
    assert "did not finish within 2 s; run 42 stopped" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the listener's folder from /proc (Linux)")
def test_wrapper_refuses_a_superlink_in_a_deleted_folder(tmp_path, monkeypatch, capsys):
    """A stand-in SuperLink: a process listening on the local port, whose working folder was deleted
    (a copy of the checkout removed while its SuperLink ran on). `flwr run` is not called."""
    gone, port = tmp_path / "gone", free_port()
    gone.mkdir()
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, socket, sys, time
        sock = socket.socket()
        sock.bind(("127.0.0.1", {port}))
        sock.listen()
        os.rmdir({str(gone)!r})
        print("ready", flush=True)
        time.sleep(60)
        """)], cwd=gone, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(port))
        monkeypatch.setattr(flwr_run, "flwr_executable", lambda: str(fake_flwr(tmp_path, "finished:completed")))
        monkeypatch.setattr(subprocess, "Popen", None)  # nothing may start
        assert flwr_run.main([".", "local"]) == 2
        err = capsys.readouterr().err
        assert f"(pid {server.pid}) runs in a deleted folder" in err and f"kill -TERM {server.pid}" in err
    finally:
        server.kill()
        server.wait()


def test_superlink_argument():
    assert flwr_run.superlink_of([".", "local", "--run-config", "x=1", "--stream"]) == "local"
    assert flwr_run.superlink_of(["--federation-config", "num-supernodes=2", ".", "remote"]) == "remote"
    assert flwr_run.superlink_of(["."]) is None


# --------------------------------------------------------------------------- report.html from a Flower app bundle


def test_report_template_found_outside_the_bundle(tmp_path):
    """`flwr run` imports fedepic from its bundle, which has no templates/ (a FAB carries .py, .toml, .md,
    .yaml, .yml, .json and .jsonl files only): the page still renders, from the installed distribution."""
    bundle = tmp_path / "app"
    shutil.copytree(REPO / "fedepic", bundle / "fedepic", ignore=shutil.ignore_patterns("templates", "__pycache__"))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(bundle)!r})
        from fedepic import html_report
        assert html_report.__file__.startswith({str(bundle)!r}), html_report.__file__
        print(html_report.render_page(html_report.Page(title="t", status="completed"))[:40])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.lstrip().lower().startswith("<!doctype html")
