"""Server-based federated simulation (simulations/federated.py, server_app.py, client_app.py, client_data.py, messaging.py, flower_runtime.py).

The Flower runs happen in a child process started in its own process group, so the tests can check
that every Ray process the run started is gone afterwards (Ray's processes inherit the driver's
process group) without touching Ray clusters other sessions run on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import torch

from fedepic.config import load_config
from fedepic.data import load_dataset

from fedepic.errors import RunInterrupted
from fedepic.client_data import build_client_data, partition_report
from simulations.flower_runtime import backend_config
from simulations.messaging import exchange, wait_for_nodes
from fedepic.server_rounds import inject_model_attack

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
       "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
ENV.pop("RAY_ADDRESS", None)


def small_overrides(out: Path, **extra: str) -> list[str]:
    base = {
        "mode": "federated", "name": "t", "output_dir": str(out), "progress": "false",
        "data.name": "synthetic", "data.synthetic_train": "1200", "data.synthetic_test": "200",
        "clients.count": "4", "rounds": "2", "clients.local_epochs": "2", "train.batch_size": "32",
        "train.threads": "1",
        "ray.num_cpus": "1",  # one actor: half the start-up imports on a 2-core machine
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --------------------------------------------------------------------------- processes


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command: state, ppid, pgid, ...) of every live
    process (zombies left out)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry), fields


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) whose process group is `pgid`."""
    return [pid for pid, fields in live_processes() if int(fields[2]) == pgid]


def wait_group_gone(pgid: int, grace_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + grace_s
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def kill_group(pgid: int) -> None:
    """Tear down a process group this test started: SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if not wait_group_gone(pgid, 10.0):
            return


def run_child(script: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `script` in a fresh process group; afterwards assert that no process of that group survived."""
    return run_in_group([PYTHON, "-c", textwrap.dedent(script)], timeout_s)


def run_in_group(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``argv`` (from the checkout, with the tests' environment) in a fresh process group; fail the
    test when it outlives ``timeout_s`` or leaves a process of its group behind."""
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"child timed out after {timeout_s} s\n{err[-3000:]}")
    leftovers = wait_group_gone(proc.pid)
    if leftovers:
        kill_group(proc.pid)
    assert not leftovers, f"Ray processes survived the run: {leftovers}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def interrupt_run(args: list[str], out: Path, wait_for: str, sig: int, timeout_s: float = 240,
                  lines: int = 1) -> tuple[int, str]:
    """Start the CLI, send ``sig`` once a file matching ``wait_for`` (under out) has ``lines`` lines, and wait."""
    proc = subprocess.Popen([PYTHON, "-m", "fedepic.simulate", *args], cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            found = [p for p in out.glob(wait_for) if p.read_text().count("\n") >= lines]
            if found:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
    leftovers = wait_group_gone(proc.pid)
    if leftovers:
        kill_group(proc.pid)
    assert not leftovers, f"processes of the run survived: {leftovers}"
    return proc.returncode, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- in-process helpers


def test_backend_config_local_and_attached():
    cfg = load_config(None, ["mode=federated", "ray.num_cpus=3", "ray.client_cpus=0.5"])
    conf = backend_config(cfg)
    assert conf["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1}
    assert conf["init_args"] == {"log_to_driver": False, "address": "local", "include_dashboard": False, "num_cpus": 3}
    attached = backend_config(load_config(None, ["mode=federated", "ray.address=10.0.0.1:6379", "ray.num_cpus=3"]))
    assert attached["init_args"] == {"log_to_driver": False, "address": "10.0.0.1:6379"}  # no num_cpus


def test_client_data_is_deterministic_and_attacked_only_for_malicious_clients():
    cfg = load_config(None, ["mode=federated", "data.name=synthetic", "clients.count=4", "clients.malicious_ids=[1]",
                             "attack.data=label_flip", "data.partition=dirichlet", "seed=3"])
    data = load_dataset(cfg.data, cfg.seed)
    clients = [build_client_data(cfg, data, c) for c in range(4)]
    again = build_client_data(cfg, data, 1)
    assert torch.equal(clients[1].y, again.y) and np.array_equal(clients[1].rows, again.rows)
    rows = np.sort(np.concatenate([c.rows for c in clients]))
    assert np.array_equal(rows, np.arange(len(data.train_y)))  # disjoint and complete
    assert clients[1].is_malicious and clients[1].poisoned.all()  # pairs flip: every row is flippable
    assert torch.equal(clients[1].y, 9 - data.train_y[torch.from_numpy(clients[1].rows)])
    assert not any(c.poisoned.any() or c.is_malicious for i, c in enumerate(clients) if i != 1)
    report = partition_report(cfg, data)
    assert report["malicious"] == [1]
    assert [sum(h) for h in report["label_histograms"]] == report["sizes"] == [len(c) for c in clients]


def test_local_epic_on_a_diverged_global_model_reports_a_skipped_selection():
    from fedepic.client_work import local_train, model_for

    cfg = load_config(None, ["mode=federated", "data.name=synthetic", "clients.count=2", "defense.local_epic=true",
                             "defense.epic.warmup=1", "defense.epic.interval=1"])
    data = load_dataset(cfg.data, cfg.seed)
    client = build_client_data(cfg, data, 0)
    healthy = {k: v.clone() for k, v in model_for(cfg, data).state_dict().items()}
    diverged = {k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v) for k, v in healthy.items()}
    result = local_train(cfg, data, client, diverged, server_round=1)
    assert result.metrics["epic-skipped-nonfinite"] == 1 and result.metrics["epic-dropped"] == 0
    assert local_train(cfg, data, client, healthy, server_round=1).metrics["epic-skipped-nonfinite"] == 0


def test_backdoor_poisons_a_fraction_of_the_malicious_rows():
    cfg = load_config(None, ["mode=federated", "data.name=synthetic", "clients.count=2", "clients.malicious_ids=[0]",
                             "attack.data=backdoor", "attack.backdoor_fraction=0.5"])
    data = load_dataset(cfg.data, cfg.seed)
    client = build_client_data(cfg, data, 0)
    eligible = int((data.train_y[torch.from_numpy(client.rows)] != cfg.attack.backdoor_label).sum())
    assert int(client.poisoned.sum()) == round(0.5 * eligible)
    assert (client.y[client.poisoned] == cfg.attack.backdoor_label).all()
    with pytest.raises(ValueError):
        build_client_data(cfg, data, 2)


def test_saved_poisons_apply_only_in_malicious_partitions(tmp_path):
    from fedepic.attacks.gradient_matching import PoisonSet, save_poisons
    from fedepic.config import ConfigError
    from fedepic.client_data import client_partition

    base = ["mode=federated", "data.name=synthetic", "clients.count=4", "clients.malicious_ids=[2]",
            "attack.data=gradient_matching"]
    with pytest.raises(ConfigError, match="attack.poisons"):
        from simulations.federated import check_federated
        check_federated(load_config(None, base))
    data = load_dataset(load_config(None, base).data, 0)
    parts = client_partition(load_config(None, base), data)
    # clean-label poisons (check_poisons refuses others): two rows of class 2 in client 2, one in client 0,
    # each moved by at most eps = 8/255 from its clean image
    of_class = lambda p: [int(r) for r in p if int(data.train_y[int(r)]) == 2]  # noqa: E731
    rows = torch.tensor([*of_class(parts[2])[:2], of_class(parts[0])[0]])
    target = int((data.test_y == 1).nonzero()[0])
    images = (data.train_x[rows].int() + 7).clamp(0, 255).to(torch.uint8)
    poisons = PoisonSet(indices=rows, poisoned_x=images, target_index=target,
                        target_class=1, adversarial_class=2, eps=8 / 255, loss=0.5, alignment=0.5)
    path = tmp_path / "p.npz"
    save_poisons(poisons, path)
    cfg = load_config(None, [*base, f"attack.poisons={path}"])
    bad, good = build_client_data(cfg, data, 2, parts), build_client_data(cfg, data, 0, parts)
    local = [list(map(int, parts[2])).index(int(r)) for r in rows[:2]]
    assert bad.poisoned.nonzero().flatten().tolist() == sorted(local)
    assert torch.equal(bad.x[local], images[:2]) and torch.equal(bad.y, data.train_y[torch.from_numpy(bad.rows)])
    assert not good.poisoned.any() and torch.equal(good.x, data.train_x[torch.from_numpy(good.rows)])


def test_omniscient_attacks_use_the_benign_updates():
    cfg = load_config(None, ["mode=federated", "attack.model=ipm", "attack.ipm_eps=0.5"])
    global_vec = torch.tensor([1.0, 1.0])
    stack = torch.tensor([[2.0, 1.0], [3.0, 1.0], [100.0, 100.0]])
    out = inject_model_attack(cfg, [False, False, True], stack, global_vec, seed=0)
    assert torch.allclose(out.update, global_vec - 0.5 * torch.tensor([1.5, 0.0])) and out.nonfinite == 0
    assert inject_model_attack(cfg, [False, False, False], stack, global_vec, 0) is None
    spoilt = stack.clone()
    spoilt[1, 0] = float("nan")  # a non-finite benign update is left out, and counted
    out = inject_model_attack(cfg, [False, False, True], spoilt, global_vec, seed=0)
    assert torch.allclose(out.update, global_vec - 0.5 * torch.tensor([1.0, 0.0])) and out.nonfinite == 1
    cfg.attack.model = "alie"
    alie = inject_model_attack(cfg, [False, False, False, True], torch.cat([stack, stack[:1]]), global_vec, 0)
    assert alie is not None and torch.isfinite(alie.update).all()
    cfg.attack.model = "scaling"  # applied by the clients, not here
    assert inject_model_attack(cfg, [False, True, False], stack, global_vec, 0) is None


class FakeGrid:
    """Just enough of a Grid for the polling helpers: nodes appear late, replies never come."""

    def __init__(self, nodes_after: int) -> None:
        self.calls = 0
        self.nodes_after = nodes_after

    def get_node_ids(self):
        self.calls += 1
        return [1, 2, 3] if self.calls > self.nodes_after else [1]

    def push_messages(self, messages):
        return ["a", "b"]

    def pull_messages(self, ids):
        return []


def test_wait_for_nodes_and_exchange_stop():
    assert wait_for_nodes(FakeGrid(3), 3, timeout_s=5) == [1, 2, 3]
    with pytest.raises(TimeoutError):
        wait_for_nodes(FakeGrid(10**9), 3, timeout_s=0.2)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RunInterrupted):
        exchange(FakeGrid(0), [object()], timeout_s=30, stop=stop)
    assert time.monotonic() - started < 5
    assert exchange(FakeGrid(0), [object()], timeout_s=0.1) == []  # timeout: missing replies are just absent


def test_centralized_epic_only_runs_without_flower(tmp_path):
    from simulations.federated import run_federated

    cfg = load_config(None, small_overrides(tmp_path, strategies="[centralized-epic]", **{
        "clients.malicious_ids": "[0]", "attack.data": "label_flip", "defense.epic.warmup": "1",
        "defense.epic.interval": "1"}))
    folder = run_federated(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    row = summary["rows"][0]
    assert row["strategy"] == "centralized-epic" and row["final_accuracy"] > 0.3
    assert len(read_jsonl(folder / "centralized-epic" / "metrics.jsonl")) == 2  # one record per "round"


# --------------------------------------------------------------------------- Flower + Ray


def test_four_clients_two_rounds_on_ray(tmp_path):
    """fedavg and epic over 4 SuperNodes: a scaled attacker, local EPIC, a client that raises once and
    one whose worker process dies once."""
    overrides = small_overrides(tmp_path, strategies="[fedavg,epic]", **{
        "clients.malicious_ids": "[0]", "attack.model": "scaling", "defense.local_epic": "true",
        "defense.epic.warmup": "1", "defense.epic.interval": "1"})
    script = f"""
        import os
        from flwr.clientapp import ClientApp
        from fedepic.config import load_config
        from simulations.client_app import handle_train, handle_warmup
        from simulations.federated import run_federated

        flaky = ClientApp()

        @flaky.train()
        def train(msg, context):
            config = msg.content["config"]
            if (int(context.node_config["partition-id"]) == 3 and int(config["server-round"]) == 1
                    and config["member"] == "fedavg"):
                raise RuntimeError("injected failure")
            if (int(context.node_config["partition-id"]) == 2 and int(config["server-round"]) == 2
                    and config["member"] == "epic"):
                os._exit(3)  # the Ray worker process dies mid-task
            return handle_train(msg, context)

        flaky.query()(handle_warmup)

        print(run_federated(load_config(None, {overrides!r}), client_app=flaky))
    """
    done = run_child(script, timeout_s=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ClientAppActor.terminate failed" not in done.stderr  # the actors' intended exit is no failed task
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.is_dir() and not folder.name.startswith(".")
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "comparison.md", "comparison.csv", "comparison.png",
                 "per_class.png", "per_class_rounds.png", "report.html"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["partition"]["malicious"] == [0] and summary["clients_ready_seconds"] > 0
    assert [r["strategy"] for r in summary["rows"]] == ["fedavg", "epic"]

    fedavg = read_jsonl(folder / "fedavg" / "metrics.jsonl")
    epic = read_jsonl(folder / "epic" / "metrics.jsonl")
    assert [r["round"] for r in fedavg] == [1, 2] and [r["round"] for r in epic] == [1, 2]
    for record in fedavg + epic:
        assert len(record["per_class"]) == 10 and 0.0 <= record["accuracy"] <= 1.0
    # the failing client is recorded, and the round went on with the other three
    assert len(fedavg[0]["failures"]) == 1 and "injected failure" in fedavg[0]["failures"][0]["reason"]
    assert sorted(c["id"] for c in fedavg[0]["clients"]) == [0, 1, 2]
    assert sorted(c["id"] for c in fedavg[1]["clients"]) == [0, 1, 2, 3] and fedavg[1]["failures"] == []
    # a dead worker is recorded too; Ray restarts it, so the others' round goes on
    assert len(epic[1]["failures"]) == 1 and sorted(c["id"] for c in epic[1]["clients"]) == [0, 1, 3]
    # EPIC on the updates drops the boosted attacker every round, and learns well above chance (0.1)
    assert all(r["excluded"] == [0] or 0 in r["excluded"] for r in epic)
    assert epic[-1]["accuracy"] > 0.5
    # local EPIC state persists across rounds (the server holds it), separately per member
    selections = {(r["strategy"], r["round"], c["id"]): c["epic_selections"]
                  for r in fedavg + epic for c in r["clients"]}
    assert selections[("fedavg", 2, 1)] == 2 and selections[("epic", 1, 1)] == 1 and selections[("epic", 2, 1)] == 2
    boosted = [c["update_norm"] for c in fedavg[0]["clients"] if c["malicious"]][0]
    honest = max(c["update_norm"] for c in fedavg[0]["clients"] if not c["malicious"])
    assert boosted > 3 * honest  # attack.scale = 10 applied client-side
    assert "| epic |" in (folder / "comparison.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_keep_finished_rounds_and_stop_ray(tmp_path, sig):
    args = small_overrides(tmp_path, rounds="40", strategies="[fedavg]")
    rc, err = interrupt_run(args, tmp_path, ".*-t.partial/fedavg/metrics.jsonl", sig)
    assert rc == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # not even from Flower's ServerApp thread
    folders = [p for p in tmp_path.iterdir() if p.name.endswith("-t")]
    assert len(folders) == 1 and not list(tmp_path.glob(".*partial"))
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = read_jsonl(folders[0] / "fedavg" / "metrics.jsonl")
    assert 1 <= len(done) < 40
    member = json.loads((folders[0] / "fedavg" / "summary.json").read_text())
    assert member["status"] == "interrupted" and len(member["curves"]["accuracy"]) >= len(done)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ray_head(prefix: str, client_port: Optional[int] = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """`ray start --head --block` in a process group this test owns, stopped by its pid on the way out
    (never `ray stop`, which stops every cluster of the machine): (the head process, its GCS port).
    Fails the test when the head does not come up within 90 s."""
    ray_bin = Path(PYTHON).parent / "ray"
    temp_dir = Path(f"/tmp/{prefix}{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={client_port or free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
        cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = threading.Event()
        lines: list[str] = []

        def read() -> None:
            for line in head.stdout:
                lines.append(line)
                if "Ray runtime started" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(90):
            pytest.fail("`ray start --head` did not come up within 90 s:\n" + "".join(lines[-20:]))
        yield head, port
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        kill_group(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not wait_group_gone(head.pid)


@pytest.mark.slow
def test_attaches_to_an_existing_ray_cluster(tmp_path):
    """The run attaches to a cluster it did not start (ray_head), and leaves the cluster up."""
    with ray_head("rt") as (head, port):
        overrides = small_overrides(tmp_path, rounds="1", strategies="[fedavg]", **{"ray.address": f"127.0.0.1:{port}"})
        done = run_child(f"""
            from fedepic.config import load_config
            from simulations.federated import run_federated
            print(run_federated(load_config(None, {overrides!r})))
        """, timeout_s=180)
        assert done.returncode == 0, done.stderr[-4000:]
        folder = Path(done.stdout.strip().splitlines()[-1])
        assert len(read_jsonl(folder / "fedavg" / "metrics.jsonl")) == 1
        assert head.poll() is None, "the run must not stop a cluster it attached to"
        assert group_members(head.pid), "the head's processes are gone"


def test_flwr_run_leaves_the_checkout_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flwr run .` first calls flwr's config migration on the app's pyproject.toml, which rewrites
    a file that still declares [tool.flwr.federations]; ours declares none, so it stays as it is."""
    from flwr.cli.config_migration import migrate

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    ours = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_bytes()
    legacy = ours + b'\n[tool.flwr.federations]\ndefault = "sim"\n\n[tool.flwr.federations.sim]\noptions.num-supernodes = 2\n'
    for name, text in (("ours", ours), ("legacy", legacy)):
        app = tmp_path / name
        app.mkdir()
        (app / "pyproject.toml").write_bytes(text)
        migrate(str(app), [], ignore_legacy_usage=True)  # what flwr/cli/run/run.py does first
        after = (app / "pyproject.toml").read_bytes()
        assert (after == text) == (name == "ours"), name  # the legacy file shows the rewrite is seen


@pytest.mark.slow
def test_every_client_failing_stops_the_run_as_failed(tmp_path):
    """Clients that all raise (as on a cluster whose workers cannot read the data): the run must not
    report `completed` with chance accuracy; it stops after the round, marked failed, with exit 1."""
    overrides = small_overrides(tmp_path, strategies="[fedavg,fedmedian]", rounds="3", engine="ray")
    script = f"""
        import sys
        from flwr.clientapp import ClientApp
        from fedepic.config import load_config
        from fedepic.errors import RunFailed
        from simulations.client_app import handle_warmup
        from simulations.federated import run_federated

        broken = ClientApp()

        @broken.train()
        def train(msg, context):
            raise RuntimeError("dataset not found on this worker")

        broken.query()(handle_warmup)
        try:
            run_federated(load_config(None, {overrides!r}), client_app=broken)
        except RunFailed as err:
            print("RunFailed:", err)
            sys.exit(1)
    """
    proc = subprocess.run([PYTHON, "-c", textwrap.dedent(script)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "fedavg, round 1: 4 of 4 clients failed" in proc.stdout and "dataset not found" in proc.stdout
    folders = [p for p in tmp_path.iterdir() if p.name.endswith("-t")]
    assert len(folders) == 1 and not list(tmp_path.glob(".*partial"))
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rows"] == []
    member = json.loads((folders[0] / "fedavg" / "summary.json").read_text())
    assert member["status"] == "failed"
    rounds = read_jsonl(folders[0] / "fedavg" / "metrics.jsonl")
    assert len(rounds) == 1 and len(rounds[0]["failures"]) == 4  # the failed round is recorded
    assert not (folders[0] / "fedmedian").exists()  # nothing ran after the failure


def test_a_raising_client_fails_an_in_process_run(tmp_path):
    """In process (engine=local) a client's work is a plain call: an exception in it is a fault of the
    run itself, not a lost worker. The run stops, marked failed, its member failed, nothing after it."""
    overrides = small_overrides(tmp_path, strategies="[fedavg,fedmedian]", rounds="3", engine="local")
    script = f"""
        import sys
        import fedepic.local_backend as backend
        from fedepic.config import load_config
        from simulations.federated import run_federated

        def broken(*args, **kwargs):
            raise RuntimeError("dataset not found on this worker")

        backend.local_train = broken
        try:
            run_federated(load_config(None, {overrides!r}))
        except RuntimeError as err:
            print("RuntimeError:", err)
            sys.exit(1)
    """
    proc = subprocess.run([PYTHON, "-c", textwrap.dedent(script)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1 and "dataset not found" in proc.stdout, proc.stderr[-3000:]
    folders = [p for p in tmp_path.iterdir() if p.name.endswith("-t")]
    assert len(folders) == 1 and not list(tmp_path.glob(".*partial"))
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rows"] == []
    assert json.loads((folders[0] / "fedavg" / "summary.json").read_text())["status"] == "failed"
    assert not (folders[0] / "fedmedian").exists()


def test_the_parameter_mask_is_computed_once_per_member_not_per_round(tmp_path, monkeypatch, task_identity):
    """Per-step rounds reuse one parameter mask: the round engine's (Evaluator.parameters) and the
    backend's (LocalServerBackend.parameters) are computed when the member starts, and
    per_step_results takes it instead of deriving it from every round's global model. Three rounds
    with a sign-flipping client (whose attack reads the mask) make two calls in all, as one round does."""
    import fedepic.client_work as client_work
    from fedepic.client_work import per_step_results, state_parameters
    from fedepic.data import load_dataset
    from fedepic.models import FIXED_BUFFERS
    from fedepic.vectors import flatten_state
    from tests.test_resume import serve_locally
    from tests.test_server_per_step import per_step_config

    calls = []
    real = client_work.parameter_mask

    def counted(model, state):
        calls.append(len(state))
        return real(model, state)

    monkeypatch.setattr(client_work, "parameter_mask", counted)
    counts = []
    for rounds in (1, 3):
        calls.clear()
        cfg = per_step_config(tmp_path / str(rounds), f"rounds={rounds}", "clients.count=3", "clients.malicious_ids=[0]",
                              "attack.model=sign_flip", "strategies=[fedavg]")
        folder = serve_locally(cfg)
        assert len((folder / "fedavg" / "metrics.jsonl").read_text().splitlines()) == rounds
        counts.append(len(calls))
    assert counts == [2, 2]
    # the mlp's state: its normalisation constants (one entry each), then weights and biases only
    net = client_work.model_for(cfg, load_dataset(cfg.data, cfg.seed))
    state = net.state_dict()
    mask = state_parameters(net)
    assert [k for k in state if k in FIXED_BUFFERS] == ["mean", "std"] and state["mean"].numel() == 1
    assert mask.numel() == flatten_state(state).numel() and mask[:2].tolist() == [False, False] and bool(mask[2:].all())
    with pytest.raises(ValueError, match="parameters has 1 entries"):
        per_step_results(cfg, net, [], state, 1, [], torch.ones(1, dtype=torch.bool))


def test_a_per_step_reply_carries_the_clients_momentum_once(tmp_path, monkeypatch, task_identity):
    """Ray's per-step path, messages included but without Ray: the backend's train messages go through
    the ClientApp's handler. An honest client's reply carries m_i once, as its arrays (no MOMENTUM_KEY);
    a sign-flipping client's carries what it sends and, apart, m_i. The server keeps exactly the
    momenta per_step_results computes, m_0 = beta m_0(previous) + (1 - beta) g_0 with beta = 0.9."""
    import threading
    from types import SimpleNamespace

    import simulations.flower_backend as fb
    from fedepic.client_data import client_data_for, worker_config
    from fedepic.client_work import per_step_results, state_parameters
    from fedepic.config import to_yaml
    from fedepic.server_rounds import Progress
    from fedepic.vectors import flatten_state
    from simulations.client_app import CONFIG_KEY, MEMBER_KEY, MOMENTUM_KEY, handle_train_batch, structure_model
    from tests.test_server_per_step import per_step_config

    cfg = per_step_config(tmp_path, "clients.count=2", "clients.malicious_ids=[1]", "attack.model=sign_flip",
                          "strategies=[fedavg]")
    text = to_yaml(worker_config(cfg))
    model = structure_model(text)
    like = {k: v.detach().clone() for k, v in model.state_dict().items()}
    size = flatten_state(like).numel()
    previous = torch.randn(size, generator=torch.Generator().manual_seed(3))
    partition_of = {70: 0, 71: 1}
    sent_keys: dict[int, set] = {}

    def answer(grid, messages, timeout_s, stop):
        contexts = [SimpleNamespace(node_config={"partition-id": partition_of[int(m.metadata.dst_node_id)]})
                    for m in messages]
        replies = handle_train_batch(messages, contexts)
        for reply, context in zip(replies, contexts):
            sent_keys[context.node_config["partition-id"]] = set(reply.content.array_records)
        return replies

    monkeypatch.setattr(fb, "exchange", answer)
    grid = fb.PartitionGrid(SimpleNamespace(get_node_ids=lambda: [70, 71]))
    grid.partitions.update(partition_of)
    backend = fb.FlowerServerBackend(cfg, "fedavg", grid, {CONFIG_KEY: text, MEMBER_KEY: "fedavg"},
                                     threading.Event(), model)
    progress = Progress(like, momentum={0: previous.clone()})
    work = backend.train(1, [0, 1], progress)

    assert sent_keys == {0: {"arrays"}, 1: {"arrays", MOMENTUM_KEY}}
    clients = [client_data_for(text, 0), client_data_for(text, 1)]
    want = per_step_results(cfg, model, clients, like, 1, [previous, None], state_parameters(model))
    fresh = per_step_results(cfg, model, clients[:1], like, 1, [None], state_parameters(model))[0]
    assert torch.equal(want[0].momentum, 0.9 * previous + fresh.momentum)  # (1 - beta) g_0 is fresh's m_0
    for i in (0, 1):
        assert torch.equal(progress.momentum[i], want[i].momentum), i
        assert torch.equal(work.replies[i].vector, want[i].vector), i
    mask = state_parameters(model)
    assert torch.equal(work.replies[1].vector[mask], -want[1].momentum[mask])  # sign_flip sends -m_1
    assert torch.equal(work.replies[0].vector, progress.momentum[0])
