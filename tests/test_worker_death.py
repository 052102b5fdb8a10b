"""A Ray worker killed while it runs a client's (or node's) message: the death is that round's failure.

Each test starts the CLI in its own process group, waits until the first round is logged, finds a
descendant process titled ``ray::ClientAppActor.run`` (Ray's title for an actor busy with a task),
SIGKILLs that one process by pid, and waits for the run. Ray restarts the worker (max_restarts=-1)
but never runs the killed message again (flower_runtime.client_messages_run_once): exactly one
message failed, the round went on without that client or node, and the run completes, or fails with
exit 1 where one failure is more than clients.max_failed_fraction. Before that fix, Ray retried the
message on the restarted worker and every round said ``failures: []``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.test_federated import (ENV, PYTHON, REPO, kill_group, live_processes, read_jsonl, small_overrides,
                                  wait_group_gone)

BUSY_TITLE = b"ray::ClientAppActor.run"  # setproctitle of a ClientAppActor while it runs a message
POLL_S = 0.05
RUN_TIMEOUT_S = 240.0


def descendants(root: int) -> list[int]:
    """Live descendants of ``root``, from /proc (parents listed before their children)."""
    children: dict[int, list[int]] = {}
    for pid, fields in live_processes():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def busy_worker(root: int) -> Optional[int]:
    """A descendant of ``root`` whose command line (its title) says it is running a ClientApp message."""
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(BUSY_TITLE):
                return pid
        except OSError:
            continue
    return None


def run_and_kill_one_worker(args: list[str], out: Path, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str, str, float]:
    """Start the CLI (``args`` name output_dir=out/runs); once a member has logged a round, SIGKILL one busy ClientApp worker (by pid).

    Returns (exit status, stdout, stderr, seconds from the kill to the run's end). Every process of the
    run's group must be gone afterwards.
    """
    stdout, stderr = out / "stdout.txt", out / "stderr.txt"
    with stdout.open("w") as o, stderr.open("w") as e:  # files: a pipe nobody reads could block the run
        proc = subprocess.Popen([PYTHON, "-m", "fedepic.simulate", *args],
                                cwd=REPO, env=ENV, start_new_session=True, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + timeout_s
        killed = None
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            logged = any(p.stat().st_size for p in (out / "runs").glob(".*.partial/*/metrics.jsonl"))
            pid = busy_worker(proc.pid) if logged else None
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed = time.monotonic()
                except ProcessLookupError:  # it finished its message and exited meanwhile: try the next
                    pass
            if killed is None:
                time.sleep(POLL_S)
        assert killed is not None, (f"no busy ClientApp worker was caught (rc {proc.poll()}):\n"
                                    f"{stderr.read_text()[-3000:]}")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        ended = time.monotonic() - killed
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {timeout_s:.0f} s\n{stderr.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
            proc.wait(timeout=30)
    leftovers = wait_group_gone(proc.pid)
    if leftovers:
        kill_group(proc.pid)
    assert not leftovers, f"processes of the run survived: {leftovers}"
    return proc.returncode, stdout.read_text(), stderr.read_text(), ended


def only_run_folder(out: Path) -> Path:
    folders = [p for p in (out / "runs").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith("."), folders
    return folders[0]


def is_worker_death(reason: str) -> bool:
    """Flower's error reply for a task whose actor died: Ray's RayActorError family."""
    return any(name in reason for name in ("ActorUnavailableError", "ActorDiedError", "RayActorError"))


def test_client_app_actor_run_is_set_to_no_retries():
    """The class-level setting `client_messages_run_once` relies on exists in this Ray and Flower."""
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    from simulations.flower_runtime import client_messages_run_once

    table = ClientAppActor.__ray_metadata__.method_meta.max_task_retries
    before = dict(table)
    with client_messages_run_once() as done:
        assert done and table["run"] == 0
    assert table == before


def test_ray_client_gets_no_actor_retries(monkeypatch):
    """Through Ray Client the class-level setting cannot reach the actors: the actor's retries are 0."""
    from fedepic.config import load_config
    from simulations.flower_runtime import backend_config

    retries = lambda address: backend_config(load_config(None, ["mode=federated", f"ray.address={address}"]))[  # noqa: E731
        "client_resources"]["max_task_retries"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert retries("ray://10.0.0.1:10001") == 0 and retries("10.0.0.1:6379") == 1 and retries("auto") == 1
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    assert retries("auto") == 0


@pytest.mark.slow
def test_ray_fails_the_running_task_and_keeps_the_next_ones(tmp_path):
    """The Ray semantics the fix relies on, on a toy actor with backend_config's actor options and the
    method set as `client_messages_run_once` sets ClientAppActor.run: the task a killed worker was
    running fails (not run again), and a task sent while the worker restarts waits for the restarted
    worker and succeeds. With the actor's own max_task_retries 0 the second one fails at once ("The
    actor is restarting"); with the method's retries left at the actor's 1, the first one succeeds."""
    ray = pytest.importorskip("ray")
    from fedepic.config import load_config
    from simulations.flower_runtime import backend_config, method_retries, quiet_flower

    @ray.remote
    class Toy:
        def pid(self) -> int:
            return os.getpid()

        def run(self, seconds: float, started: str = "") -> int:
            if started:  # the driver waits for this file, not for Ray's process title (set lazily)
                Path(started).touch()
            time.sleep(seconds)
            return os.getpid()

    quiet_flower()
    options = backend_config(load_config(None, ["mode=federated"]))["client_resources"]
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with method_retries(Toy, "run", 0) as done:
            assert done
            actor = Toy.options(**{**options, "num_cpus": 0.5}).remote()
        first_pid = ray.get(actor.pid.remote(), timeout=60)
        started = tmp_path / "started"
        running = actor.run.remote(120, str(started))
        deadline = time.monotonic() + 90  # a loaded CI machine took over 30 s to show Ray's process title
        while not started.exists():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(POLL_S)
        os.kill(first_pid, signal.SIGKILL)
        from ray._private.state import actors  # the GCS's actor table ("for debugging only")

        deadline = time.monotonic() + 30
        while not actors(actor._actor_id.hex()).get("NumRestarts"):  # until the GCS says it restarts
            assert time.monotonic() < deadline, "the actor was not restarted"
            time.sleep(0.01)
        sent_while_restarting = actor.run.remote(0)  # restarting takes about 0.3 s here, polled every 0.01
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(running, timeout=60)  # not run again on the restarted worker
        assert ray.get(sent_while_restarting, timeout=60) != first_pid  # it waited for the restart
    finally:
        ray.shutdown()


# 4 rounds of 4 clients on one Ray worker; a train message takes 0.2-1 s (polled every 0.05 s)
FEDERATED = dict(rounds="4", strategies="[fedavg]", checkpoint_every="0", **{"clients.local_epochs": "3"})


@pytest.mark.slow
def test_a_killed_client_worker_is_that_rounds_failure(tmp_path):
    """Server-based: one train message is lost with its worker; the round aggregates the other three."""
    rc, out, err, ended = run_and_kill_one_worker(small_overrides(tmp_path / "runs", **FEDERATED), tmp_path)
    assert rc == 0, err[-4000:]
    assert "Traceback" not in out
    folder = only_run_folder(tmp_path)
    assert Path(out.strip().splitlines()[-1]) == folder
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    records = read_jsonl(folder / "fedavg" / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    failed = [r for r in records if r["failures"]]
    assert len(failed) == 1, [r["failures"] for r in records]  # one death, one failure: no other client's
    (failure,) = failed[0]["failures"]
    assert failed[0]["round"] >= 2  # killed after round 1 was logged
    assert isinstance(failure["node"], int) and is_worker_death(failure["reason"]), failure
    assert sorted(len(r["clients"]) for r in records) == [3, 4, 4, 4]
    assert len(failed[0]["clients"]) == 3
    # the failure names the client that is missing from that round's records
    assert failure["client"] not in {c["id"] for c in failed[0]["clients"]} and failure["client"] in range(4)
    member = json.loads((folder / "fedavg" / "summary.json").read_text())
    assert member["status"] == "completed"
    assert ended < 120


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_past_max_failed_fraction(tmp_path):
    """One of four clients failing is more than clients.max_failed_fraction=0.2: exit 1, status failed."""
    args = small_overrides(tmp_path / "runs", **FEDERATED, **{"clients.max_failed_fraction": "0.2"})
    rc, out, err, _ = run_and_kill_one_worker(args, tmp_path)
    assert rc == 1, err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith("fedepic:")]
    assert len(lines) == 1 and "run failed" in lines[0] and "1 of 4 clients failed" in lines[0], lines
    folder = only_run_folder(tmp_path)
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    records = read_jsonl(folder / "fedavg" / "metrics.jsonl")
    assert len(records[-1]["failures"]) == 1 and is_worker_death(records[-1]["failures"][0]["reason"])
    assert all(r["failures"] == [] for r in records[:-1]) and len(records) < 4


@pytest.mark.slow
def test_a_killed_node_worker_is_that_rounds_failure(tmp_path):
    """Decentralized: the node whose message was lost is named with its phase; the others go on."""
    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path / 'runs'}", "rounds=4", "strategies=[gossip]", "checkpoint_every=0", "progress=false",
            "name=t", "clients.local_epochs=6", "train.threads=1"]
    rc, out, err, ended = run_and_kill_one_worker(args, tmp_path)
    assert rc == 0, err[-4000:]
    folder = only_run_folder(tmp_path)
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    records = read_jsonl(folder / "gossip" / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    failed = [r for r in records if r["failures"]]
    assert len(failed) == 1, [r["failures"] for r in records]
    (failure,) = failed[0]["failures"]
    assert failed[0]["round"] >= 2
    assert failure["node"] in range(5) and failure["phase"] in ("train", "aggregate"), failure
    assert is_worker_death(failure["reason"]), failure
    assert ended < 120


def test_without_the_method_setting_the_actors_get_no_retries():
    """Should a Ray release move the class-level setting, the actors' own retries are 0: a death is then
    never absorbed by a retry (messages sent while the worker restarts fail with it)."""
    from fedepic.config import load_config
    from simulations.flower_runtime import backend_config

    cfg = load_config(None, ["mode=federated"])
    assert backend_config(cfg, run_once=False)["client_resources"]["max_task_retries"] == 0
    assert backend_config(cfg)["client_resources"]["max_task_retries"] == 1
