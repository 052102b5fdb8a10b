"""SIGINT and SIGTERM in every mode (federated: tests/test_federated.py): a true status, the finished members
kept, no process left, exit 128+signum; and faults recorded, never silent."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from fedepic.errors import RunInterrupted
from fedepic.interrupts import Interrupts, exit_status
from test_federated import interrupt_run


def test_first_signal_raises_with_its_number_and_later_ones_are_ignored() -> None:
    # what was installed before: Python's default_int_handler, or SIG_IGN where the test process was
    # started in the background by a non-interactive shell (which ignores SIGINT for it)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Interrupts(grace_s=60) as interrupts:
        with pytest.raises(RunInterrupted) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread long before this ends
        assert caught.value.signum == signal.SIGTERM and exit_status(caught.value) == 143
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the run is writing its status
        time.sleep(0.05)
        assert interrupts.stop.is_set() and interrupts.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored
    assert exit_status(KeyboardInterrupt()) == 130


def test_polled_signal_only_sets_stop() -> None:
    with Interrupts(grace_s=60) as interrupts, interrupts.polled():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert interrupts.stop.is_set()
        with pytest.raises(RunInterrupted) as caught:
            interrupts.raise_if_stopped()
    assert caught.value.signum == signal.SIGINT


def run_folder(out: Path) -> Path:
    assert not list(out.glob(".*partial")), "a .partial folder stayed behind"
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1
    return folders[0]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_centralized_comparison_interrupted(tmp_path: Path, data_root: Path, sig: int) -> None:
    args = ["config=centralized_mnist.yaml", f"output_dir={tmp_path}", "name=c", "progress=false",
            "defense.compare=[none,random]", "train.epochs=6", "data.train_per_class=40", "data.test_per_class=20",
            "train.threads=1", f"data.root={data_root}"]
    # "none" trains first; once "random" has logged an epoch, "none" has finished its trial
    rc, err = interrupt_run(args, tmp_path, ".*partial/random/metrics.jsonl", sig)
    assert rc == 128 + sig, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("fedepic: interrupted")
    folder = run_folder(tmp_path)
    root = read(folder / "summary.json")
    assert root["status"] == "interrupted" and root["finished"] == ["none"]
    assert [r["defense"] for r in root["rows"]] == ["none"]  # the comparison covers the finished member
    assert "| none |" in (folder / "comparison.md").read_text()
    assert read(folder / "none" / "summary.json")["status"] == "completed"
    cut = read(folder / "random" / "summary.json")
    assert cut["status"] == "interrupted" and cut["trials_done"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_decentralized_comparison_interrupted(tmp_path: Path, sig: int) -> None:
    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "name=d", "progress=false", "rounds=10",
            "strategies=[gossip,median]", "ray.num_cpus=1", "train.threads=1"]
    rc, err = interrupt_run(args, tmp_path, ".*partial/median/metrics.jsonl", sig)
    assert rc == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    folder = run_folder(tmp_path)
    root = read(folder / "summary.json")
    assert root["status"] == "interrupted" and root["finished"] == ["gossip"]
    assert list(root["members"]) == ["gossip"] and "| gossip |" in (folder / "comparison.md").read_text()
    assert read(folder / "gossip" / "summary.json")["status"] == "completed"
    cut = read(folder / "median" / "summary.json")
    assert cut["status"] == "interrupted" and 1 <= cut["rounds"] < 10
    report = (folder / "report.html").read_text()  # written under the signal, with the true status
    assert 'data-status="interrupted"' in report and "not finished: median" in report


# --------------------------------------------------------------------------- faults recorded, never silent


def fake_reply(node: int, error: str | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: error is not None,
                           error=SimpleNamespace(reason=error))


def test_node_failures_are_recorded_and_too_many_stop_the_run() -> None:
    from fedepic.config import load_config
    from fedepic.errors import RunFailed
    from fedepic.failures import check_failures
    from simulations.dfl_apps import _failures

    partition_of = {101: 0, 102: 1, 103: 2, 104: 3}  # Flower node id -> partition id
    replies = [fake_reply(101), fake_reply(102, "worker died"), fake_reply(104)]  # node 2 never answered
    failures = _failures([0, 1, 2, 3], replies, partition_of, "train")
    assert failures == [{"node": 1, "phase": "train", "reason": "worker died"},
                        {"node": 2, "phase": "train", "reason": "no reply before the timeout"}]
    cfg = load_config("dfl_smoke.yaml", [])
    check_failures(cfg, "gossip, round 1", failures, 4)  # 2 of 4 = the 0.5 limit: the round goes on
    with pytest.raises(RunFailed, match="3 of 4 clients failed.*first: worker died"):
        check_failures(cfg, "gossip, round 1", failures + [failures[0]], 4)
    every = load_config("dfl_smoke.yaml", ["clients.max_failed_fraction=1.0"])
    check_failures(every, "r", failures * 1 + [failures[0]], 4)
    with pytest.raises(RunFailed, match="4 of 4"):  # every client failing always stops the run
        check_failures(every, "r", failures * 2, 4)


def test_clients_get_the_drivers_resolved_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedepic.config import load_config
    from fedepic.client_data import worker_config

    monkeypatch.setenv("FEDEPIC_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("dfl_smoke.yaml", ["data.cache_dir=cache"])
    sent = worker_config(cfg)
    assert sent.data.root == str(tmp_path / "data") and sent.data.cache_dir == str(tmp_path / "cache")


def test_unreachable_ray_address_is_refused_quickly(tmp_path: Path) -> None:
    import socket

    from fedepic.config import load_config
    from fedepic.errors import ConfigError
    from simulations.flower_runtime import check_ray_address

    with socket.socket() as sock:  # a port nobody listens on: bind, then close
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConfigError, match="ray.address.*no Ray cluster answers"):
        check_ray_address(load_config("dfl_smoke.yaml", [f"ray.address=127.0.0.1:{port}"]), timeout_s=2)
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="expected auto, HOST:PORT or ray://HOST:PORT"):
        check_ray_address(load_config("dfl_smoke.yaml", ["ray.address=nonsense"]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["federated", "decentralized"])
def test_a_diverged_fl_run_says_so(tmp_path: Path, mode: str) -> None:
    """train.lr=1e38 (the largest finite step: inf is refused): every trained model goes non-finite. Decentralized nodes keep them (each node's model
    is its own): the summary names the first such round. The server leaves non-finite replies out, so
    its model stays finite: the summary counts the replies it left out."""
    import subprocess

    from test_federated import ENV, PYTHON, REPO, small_overrides

    if mode == "federated":
        args = small_overrides(tmp_path, rounds="2", strategies="[fedavg]", **{"train.lr": "1e38"})
    else:
        args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "name=t", "progress=false", "rounds=2",
                "strategies=[gossip]", "train.lr=1e38", "ray.num_cpus=1"]
    proc = subprocess.run([PYTHON, "-m", "fedepic.simulate", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    member = read(folder / ("fedavg" if mode == "federated" else "gossip") / "summary.json")
    assert member["status"] == "completed"
    if mode == "federated":
        assert member["diverged_round"] is None and member["nonfinite_replies"] == 4 * 2
    else:
        assert member["diverged_round"] == 1


def test_cli_outcome_one_line_and_status_per_kind_of_error(capsys):
    """Both commands (fedepic.simulate, fedepic.reproduce) share this one mapping of errors to a line
    and an exit status; a bug (anything else) is not swallowed."""
    import errno as errno_codes
    from fedepic.errors import ConfigError, RunFailed
    from fedepic.interrupts import cli_outcome

    cases = [
        (ConfigError("key 'rounds': must be at least 1, got 0\nsecond line"), 2,
         "prog: error: key 'rounds': must be at least 1, got 0"),
        (RunFailed("3 of 4 clients failed round 2"), 1, "prog: run failed: 3 of 4 clients failed round 2"),
        (OSError(errno_codes.ENOSPC, "No space left on device", "/runs/x"), 2,
         "prog: error: cannot write /runs/x: No space left on device"),
        (ModuleNotFoundError("no flwr", name="flwr"), 2,
         "prog: error: this needs the missing package 'flwr' (pip install -e .)"),
        (KeyboardInterrupt(), 130, "prog: interrupted; finished parts were kept"),
    ]
    for err, status, line in cases:
        assert cli_outcome("prog", err) == status
        assert capsys.readouterr().err == line + "\n"
    assert cli_outcome("prog", OSError(errno_codes.ENOENT, "gone")) is None
    assert cli_outcome("prog", ZeroDivisionError()) is None
    assert capsys.readouterr().err == ""
