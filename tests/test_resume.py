"""`resume=RUN_FOLDER`: an interrupted run continues from its checkpoint and ends with the metrics an
uninterrupted run writes (byte for byte once timing fields are removed), in every mode."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from fedepic.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedepic.errors import ConfigError
from tests.test_federated import ENV, PYTHON, REPO, interrupt_run


def without_timing(value):
    """The value with every key that measures time ("seconds", "train_seconds", ...) removed."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def metrics_lines(path: Path) -> list[str]:
    """metrics.jsonl re-serialised without timing fields, keys in file order: equal lists mean the
    files are byte-identical apart from timings."""
    return [json.dumps(without_timing(json.loads(line))) for line in path.read_text().splitlines()]


def cli(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "fedepic.simulate", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def completed_run(args: list[str]) -> Path:
    """Run ``python -m fedepic.simulate ARGS`` to completion; its run folder (the last line it prints)."""
    done = cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def only_folder(out: Path) -> Path:
    assert not list(out.glob(".*partial")), "a .partial folder stayed behind"
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def assert_same_run(resumed: Path, reference: Path, members: list[str]) -> None:
    """Every metrics.jsonl (root and members) equal apart from timing; the resumed run completed."""
    assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"
    for sub in ["", *members]:
        got, want = metrics_lines(resumed / sub / "metrics.jsonl"), metrics_lines(reference / sub / "metrics.jsonl")
        assert got == want, f"{sub or 'root'}: metrics differ after the resume"
    assert not list(resumed.glob(f"**/{CHECKPOINT}")), "a completed run keeps no checkpoints"


def interrupt_then_resume(args: list[str], out: Path, wait_for: str, lines: int, sig: int,
                          check_cut=None) -> Path:
    """Interrupt the run once ``wait_for`` has ``lines`` lines, let ``check_cut(folder)`` look at what
    the interruption left, resume, and return the folder."""
    rc, err = interrupt_run(args, out, wait_for, sig, lines=lines)
    assert rc == 128 + sig, err[-2000:]
    folder = only_folder(out)
    assert json.loads((folder / "summary.json").read_text())["status"] == "interrupted"
    if check_cut is not None:
        check_cut(folder)
    done = cli([f"resume={folder}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip().splitlines()[-1]) == folder
    return only_folder(out)


# --------------------------------------------------------------------------- centralized


def centralized_args(out: Path, data_root: Path) -> list[str]:
    return ["config=centralized_mnist.yaml", f"output_dir={out}", "name=c", "progress=false", "train.epochs=6",
            "defense.compare=[epic-0.2,random]", "defense.epic.warmup=1", "defense.epic.interval=2",
            "attack.data=label_flip", "attack.budget=0.1", "data.train_per_class=40", "data.test_per_class=20",
            "train.threads=1", "train.augment=crop", "train.milestones=[4]", "figures.enabled=false",
            f"data.root={data_root}"]


@pytest.mark.slow
def test_centralized_resume_equals_an_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    ref = completed_run(centralized_args(tmp_path / "ref", data_root))

    def cut_inside_random_then_as_if_killed(folder: Path) -> None:
        saved = load_checkpoint(folder / CHECKPOINT)
        assert saved["victim"]["defense"] == "random" and 2 <= saved["victim"]["fit"]["epoch"] < 6
        assert len(saved["outcomes"]["epic-0.2"]) == 1 and saved["epic_counts"]["counts"]
        # what SIGKILL or an out-of-memory kill leaves: no summaries, the folder still .partial
        for summary in [folder / "summary.json", *folder.glob("*/summary.json")]:
            summary.unlink()
        folder.rename(folder.with_name(f".{folder.name}.partial"))

    # epic-0.2 trains first; "random" (replaying EPIC's drop counts) is interrupted after epoch 3;
    # the folder is then made to look killed, and resumed by its final name
    resumed = interrupt_then_resume(centralized_args(tmp_path / "cut", data_root), tmp_path / "cut",
                                    ".*partial/random/metrics.jsonl", 3, signal.SIGTERM,
                                    cut_inside_random_then_as_if_killed)
    assert_same_run(resumed, ref, ["epic-0.2", "random"])
    root = json.loads((resumed / "summary.json").read_text())
    assert root["resumed"] is True and root["finished"] == ["epic-0.2", "random"]
    assert without_timing(root["rows"]) == without_timing(json.loads((ref / "summary.json").read_text())["rows"])


# --------------------------------------------------------------------------- decentralized


def decentralized_args(out: Path) -> list[str]:
    return ["config=dfl_smoke.yaml", f"output_dir={out}", "name=d", "progress=false", "rounds=6",
            "strategies=[gossip,gp]", "ray.num_cpus=1", "train.threads=1", "figures.enabled=false"]


@pytest.mark.slow
def test_decentralized_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    ref = completed_run(decentralized_args(tmp_path / "ref"))
    kept: dict[str, str] = {}

    def cut_inside_gp(folder: Path) -> None:
        assert not (folder / "gossip" / CHECKPOINT).exists(), "a completed member keeps no checkpoint"
        kept["gossip"] = (folder / "gossip" / "summary.json").read_text()
        saved = load_checkpoint(folder / "gp" / CHECKPOINT)
        assert saved["member"] == "gp" and 2 <= saved["round"] < 6
        assert sorted(saved["states"]) == ["0", "1", "2", "3", "4"]  # every node, the malicious one too
        for state in saved["states"].values():
            assert state["config"]["member"] == "gp" and state["config"]["round"] == saved["round"]
            assert "model" in state["arrays"] and "trained" not in state["arrays"]  # after the aggregation
        benign = [saved["states"][str(i)] for i in (1, 2, 3, 4)]
        assert all(s["config"]["gp.present"] and s["config"]["gp.rounds"] == saved["round"] for s in benign)
        assert any(s["arrays"]["gp"] for s in benign)  # GP's recording variables travel too
        kept["gp"] = "".join((folder / "gp" / "metrics.jsonl").read_text().splitlines(True)[:saved["round"]])

    # gossip completes first; gp is interrupted after its third round
    resumed = interrupt_then_resume(decentralized_args(tmp_path / "cut"), tmp_path / "cut",
                                    ".*partial/gp/metrics.jsonl", 3, signal.SIGTERM, cut_inside_gp)
    assert_same_run(resumed, ref, ["gossip", "gp"])
    assert (resumed / "gossip" / "summary.json").read_text() == kept["gossip"]  # kept as it was
    # the checkpointed rounds were not played again: their lines keep the first run's timings
    assert (resumed / "gp" / "metrics.jsonl").read_text().startswith(kept["gp"])
    root = json.loads((resumed / "summary.json").read_text())
    assert root["resumed"] is True and root["finished"] == ["gossip", "gp"]
    want = json.loads((ref / "summary.json").read_text())
    assert without_timing(root["members"]) == without_timing(want["members"])


@pytest.mark.slow
def test_local_engine_dsgt_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """engine=local, decentralized.algorithm=dsgt: the in-process engine checkpoints the trackers and GP's
    records like the router does, and a resumed run is the uninterrupted one."""
    args = ["config=dfl_smoke.yaml", "name=l", "progress=false", "rounds=60", "engine=local", "checkpoint_every=5",
            "decentralized.algorithm=dsgt", "train.lr=0.05", "train.eval_every=20",
            "strategies=[gossip,gp]", "train.threads=1", "figures.enabled=false"]
    ref = completed_run([*args, f"output_dir={tmp_path / 'ref'}"])

    def cut_inside_gp(folder: Path) -> None:
        saved = load_checkpoint(folder / "gp" / CHECKPOINT)
        assert saved["member"] == "gp" and 5 <= saved["round"] < 60 and saved["round"] % 5 == 0
        states = saved["states"]
        assert sorted(states) == ["0", "1", "2", "3", "4"]
        assert all({"model", "dsgt"} <= set(s["arrays"]) for s in states.values())  # x, y and g travel
        assert any(s["arrays"].get("gp") for s in states.values())  # GP's records on the trackers too

    # cut after 7 logged rounds of gp: its checkpoint of round 5 (or a later one) is on disk
    resumed = interrupt_then_resume([*args, f"output_dir={tmp_path / 'cut'}"], tmp_path / "cut",
                                    ".*partial/gp/metrics.jsonl", 7, signal.SIGTERM, cut_inside_gp)
    assert_same_run(resumed, ref, ["gossip", "gp"])


@pytest.mark.slow
def test_local_engine_vectorized_local_epochs_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """engine=local under local epochs with the MLP (the vectorized loop, fedepic/stacked_fit.py) and local
    EPIC: the drops and selection counts travel in the checkpoint, and a resumed run is the uninterrupted one."""
    args = ["config=dfl_smoke.yaml", "name=v", "progress=false", "rounds=12", "engine=local", "checkpoint_every=2",
            "strategies=[gp_epic]", "defense.epic.warmup=1", "defense.epic.interval=1", "defense.epic.fraction=0.3",
            "train.lr=0.05", "train.threads=1", "figures.enabled=false"]
    ref = completed_run([*args, f"output_dir={tmp_path / 'ref'}"])

    def cut_inside(folder: Path) -> None:
        saved = load_checkpoint(folder / "gp_epic" / CHECKPOINT)
        assert 2 <= saved["round"] < 12
        benign = [saved["states"][str(i)] for i in (1, 2, 3, 4)]
        assert all(s["config"]["epic_selections"] >= 1 for s in benign)
        assert any(not bool(s["arrays"]["epic"]["keep"].bool().all()) for s in benign)  # drops were made

    resumed = interrupt_then_resume([*args, f"output_dir={tmp_path / 'cut'}"], tmp_path / "cut",
                                    ".*partial/gp_epic/metrics.jsonl", 5, signal.SIGTERM, cut_inside)
    assert_same_run(resumed, ref, ["gp_epic"])


def _gp_node_state():
    from fedepic.peer_node import NodeState
    from strategies.gradient_purification import PurificationState

    gp = PurificationState(records={3: torch.ones(4)}, history={3: [True, False], 5: []}, confirmed={3}, rounds=2)
    return NodeState("gp", round=2, model={"w": torch.arange(4.0)}, gp=gp,
                     epic_keep=torch.tensor([True, False, True]), epic_selections=1)


def test_a_node_state_survives_a_reply_a_checkpoint_and_a_train_message(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from simulations.dfl_apps import load_node_state, node_state_from, plain_state, restore_node_state, state_records

    reply = RecordDict(state_records(_gp_node_state()))  # what an aggregate reply with send_state adds
    save_checkpoint(tmp_path / CHECKPOINT, {"states": {"1": plain_state(reply)}})
    saved = load_checkpoint(tmp_path / CHECKPOINT)["states"]["1"]  # weights_only: plain data and tensors
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    restore_node_state(context, RecordDict(state_records(node_state_from(saved))))  # a resumed train message
    back = load_node_state(context, "gp")
    assert back.round == 2 and back.epic_selections == 1 and torch.equal(back.model["w"], torch.arange(4.0))
    assert torch.equal(back.epic_keep, torch.tensor([True, False, True])) and back.trained is None
    assert back.gp.confirmed == {3} and back.gp.history == {3: [True, False], 5: []} and back.gp.rounds == 2
    assert torch.equal(back.gp.records[3], torch.ones(4))
    restore_node_state(context, RecordDict())  # a message without a state leaves the node's own alone
    assert load_node_state(context, "gp").round == 2 and load_node_state(context, "gossip").model is None


def _record(round_: int) -> dict:
    return {"round": round_, "mean_accuracy": 0.5, "worst_accuracy": 0.4, "exclusive_accuracy": float("nan"),
            "per_class": [0.5, float("nan")], "failures": [{"node": None, "phase": "train", "reason": "x"}],
            "seconds": 1.0}


def test_folder_sink_keeps_continues_and_restarts_the_members_it_finds(tmp_path: Path) -> None:
    from fedepic.checkpoint import Resume, metrics_size
    from fedepic.config import load_config
    from fedepic.lifecycle import Comparison, RunLifecycle
    from fedepic.outputs import RunWriter
    from simulations.decentralized import FolderSink
    from fedepic.peer_rounds import Member

    folder = tmp_path / "20261202-000000-d"
    members = [Member(name, name, None) for name in ("gossip", "gp", "median")]
    with RunWriter(tmp_path, "d", stamp="20261202-000000") as first:  # the interrupted run
        for member, rounds in zip(members, (2, 3, 1)):  # gossip completed, gp checkpointed round 2 of 3
            with RunWriter(tmp_path, member.name, parent=first) as mw:
                for r in range(1, rounds + 1):
                    mw.log(_record(r))
                    if member.name == "gp" and r == 2:
                        mw.flush()
                        save_checkpoint(mw.dir / CHECKPOINT, {"round": 2, "metrics_size": metrics_size(mw.dir),
                                                              "states": {"1": {"arrays": {}, "config": {"x": 1}}}})
                mw.mark(None if member.name == "gossip" else KeyboardInterrupt())
        first.mark(KeyboardInterrupt())
    before = (folder / "gossip" / "summary.json").read_text()
    statuses = {m.name: json.loads((folder / m.name / "summary.json").read_text()) for m in members}
    cfg = load_config("dfl_smoke.yaml", ["rounds=4", "name=d", f"output_dir={tmp_path}"])
    life = RunLifecycle(cfg, [m.name for m in members], Comparison(["strategy", "rounds"], [], "T"),
                        resume=Resume(folder, None, statuses))
    with pytest.raises(KeyboardInterrupt), life:
        root = life.root
        sink = FolderSink(life, cfg, None, members)
        assert sink.finished(members[0]) and not sink.finished(members[1])
        assert life.rows[0]["rounds"] == 2 and math.isnan(sink.records["gossip"][1]["per_class"][1])
        assert sink.records["gossip"][0]["failures"][0]["node"] is None  # not a number: left alone
        start = sink.begin(members[1])
        assert start.round == 2 and start.states == {1: {"arrays": {}, "config": {"x": 1}}}
        assert [r["round"] for r in sink.records["gp"]] == [1, 2]
        assert len((root.dir / "gp" / "metrics.jsonl").read_text().splitlines()) == 2  # round 3 is played again
        sink.round(members[1], _record(3))
        sink.checkpoint(members[1], 3, {1: {"arrays": {"model": {"w": torch.ones(2)}}, "config": {"x": 2}}})
        saved = load_checkpoint(root.dir / "gp" / CHECKPOINT)
        assert saved["round"] == 3 and saved["metrics_size"] == metrics_size(root.dir / "gp")
        sink.end(members[1])
        assert not (root.dir / "gp" / CHECKPOINT).exists()
        assert sink.begin(members[2]).round == 0  # no checkpoint: starts over in an empty folder
        assert sorted(p.name for p in (root.dir / "median").iterdir()) == ["metrics.jsonl"]
        assert (root.dir / "median" / "metrics.jsonl").read_text() == ""
        raise KeyboardInterrupt
    assert (folder / "gossip" / "summary.json").read_text() == before
    assert json.loads((folder / "gp" / "summary.json").read_text())["rounds"] == 3
    cut = json.loads((folder / "median" / "summary.json").read_text())
    assert cut["status"] == "interrupted" and cut["rounds"] == 0 and cut["error"] == "KeyboardInterrupt"
    root_summary = json.loads((folder / "summary.json").read_text())
    assert root_summary["status"] == "interrupted" and root_summary["finished"] == ["gossip", "gp"]
    assert (folder / "comparison.csv").read_text().splitlines() == ["strategy,rounds", "gossip,2", "gp,3"]


# --------------------------------------------------------------------------- refusals, in-process


def test_a_resume_with_another_config_is_refused_in_one_line(tmp_path: Path, data_root: Path) -> None:
    from fedepic.checkpoint import resume_config

    folder = tmp_path / "20261202-000000-c"
    folder.mkdir()
    (folder / "config.yaml").write_text(f"mode: centralized\nname: c\noutput_dir: {tmp_path}\n")
    (folder / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    cfg, point = resume_config(str(folder), None, ["progress=false"])  # a display key may change
    assert cfg.name == "c" and point.checkpoint is None and point.run_dir == folder
    with pytest.raises(ConfigError, match=r"key 'seed' is 0 in the run and 3 here"):
        resume_config(str(folder), None, ["seed=3"])
    (folder / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="status is 'completed'"):
        resume_config(str(folder), None, [])
    with pytest.raises(ConfigError, match="not a run folder"):
        resume_config(str(tmp_path / "nothing"), None, [])
    (folder / "summary.json").unlink()  # killed before it wrote one: resumable
    assert resume_config(str(folder), None, ["checkpoint_every=5"])[0].checkpoint_every == 5
    assert resume_config(str(folder), None, ["figures.dpi=300", "figures.vector=svg"])[0].figures.dpi == 300
    (folder / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        resume_config(str(folder), None, [])


def test_cli_refuses_a_bad_resume_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("mode: centralized\nname: c\n")
    (folder / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    before = sorted(p.name for p in folder.iterdir())
    done = cli([f"resume={folder}", "train.epochs=9"], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "fedepic: error: resume refused: key 'train.epochs' is 1 in the run and 9 here "
        "(only output_dir, name, progress, data.cache_dir, checkpoint_every, figures may change)"]
    assert sorted(p.name for p in folder.iterdir()) == before and list(tmp_path.iterdir()) == [folder]


def test_checkpoints_are_read_without_unpickling(tmp_path: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / CHECKPOINT
    torch.save({"format_version": 1, "x": Payload()}, path)
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"format_version": 1})[:5])
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "gen": torch.Generator().manual_seed(1).get_state()})
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["format_version"] == 1
    assert not list(tmp_path.glob(".*tmp"))


# --------------------------------------------------------------------------- federated (server-based)


class StopAt:
    """A stop event that is set once a file matching ``pattern`` (under ``out``) has ``lines`` lines:
    the run stops there as after SIGTERM."""

    def __init__(self, out: Path, pattern: str, lines: int) -> None:
        self.out, self.pattern, self.lines = out, pattern, lines

    def is_set(self) -> bool:
        return any(p.read_text().count("\n") >= self.lines for p in self.out.glob(self.pattern))


LOCAL_MEMBERS = ["fedavg", "centralized-epic", "epic"]


def local_config(out: Path, every: int = 1):
    """4 clients, half of them sampled per round, local EPIC, a label-flipping and boosting attacker."""
    from fedepic.config import load_config

    return load_config(None, [
        "mode=federated", "name=f", f"output_dir={out}", "progress=false", "data.name=synthetic",
        "data.synthetic_train=400", "data.synthetic_test=100", "clients.count=4", "clients.fraction_train=0.5",
        "clients.malicious_ids=[0]", "attack.data=label_flip", "attack.model=scaling", "attack.scale=3", "rounds=4",
        "train.batch_size=32", "train.threads=1", "defense.local_epic=true", "defense.epic.warmup=1",
        "defense.epic.interval=1", f"strategies=[{','.join(LOCAL_MEMBERS)}]", f"checkpoint_every={every}"])


def serve_locally(cfg, stop=None, resume=None) -> Path:
    """The server-based run in this process (engine=local), as run_federated runs it; returns the run folder."""
    import threading

    from simulations.server_app import open_run, serve

    with open_run(cfg, resume=resume) as life:
        serve(None, cfg, life, stop or threading.Event())
    return life.path


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, task_identity) -> Path:
    return serve_locally(local_config(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("cut, lines, every, restart", [
    ("epic", 3, 2, 2),  # continues after round 2: its round-3 line is cut off and logged again
    ("centralized-epic", 3, 2, 2),
    pytest.param("epic", 1, 2, None, marks=pytest.mark.slow),  # no checkpoint yet: epic starts over
])
def test_federated_resume_in_process_equals_an_uninterrupted_run(tmp_path: Path, local_reference: Path, cut: str,
                                                                  lines: int, every: int, restart) -> None:
    """Cut once ``cut`` logged ``lines`` rounds, resumed over nodes with other ids (a new simulation's)."""
    from fedepic.checkpoint import resume_config
    from fedepic.errors import RunInterrupted

    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted):
        serve_locally(local_config(out, every), StopAt(out, f".*partial/{cut}/metrics.jsonl", lines))
    folder = only_folder(out)
    assert json.loads((folder / "summary.json").read_text())["status"] == "interrupted"
    if restart is None:
        assert not (folder / cut / CHECKPOINT).exists()
    else:
        saved = load_checkpoint(folder / cut / CHECKPOINT)
        assert saved["round"] == restart and saved["member"] == cut
        assert cut != "epic" or saved["progress"]["epic"], "the server holds the clients' local EPIC states"
    cfg, point = resume_config(str(folder), None, [])
    resumed = serve_locally(cfg, resume=point)
    assert resumed == folder
    assert_same_run(resumed, local_reference, LOCAL_MEMBERS)
    root = json.loads((resumed / "summary.json").read_text())
    reference = json.loads((local_reference / "summary.json").read_text())
    assert root["resumed"] is True and without_timing(root["rows"]) == without_timing(reference["rows"])


def test_the_root_metrics_keep_what_an_uninterrupted_run_has_written(tmp_path: Path) -> None:
    """clients_ready, then the finished members' lines in order; a torn line, a line of an unfinished
    member and what follows are cut off."""
    from fedepic.outputs import RunWriter
    from fedepic.server_checkpoints import restore_root

    lines = [{"event": "clients_ready", "seconds": 1.0}, {"event": "member", "strategy": "a"},
             {"event": "member", "strategy": "c"}]
    with RunWriter(tmp_path, "r") as writer:
        text = "".join(json.dumps(r) + "\n" for r in lines)
        (writer.dir / "metrics.jsonl").write_text(text + '{"event": "mem')
        assert restore_root(writer, ["a", "b"]) == (True, ["a"])
        assert (writer.dir / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in lines[:2])
        (writer.dir / "metrics.jsonl").write_text('{"event": "member", "strategy": "a"}\n')
        assert restore_root(writer, ["a"]) == (False, ["a"])


def federated_args(out: Path, data_root: Path) -> list[str]:
    return ["config=server_noniid.yaml", f"output_dir={out}", "name=f", "rounds=6", "strategies=[fedavg,krum]",
            "ray.num_cpus=1", "train.threads=1", "progress=false", "clients.count=4", "data.train_per_class=30",
            "data.test_per_class=20", "defense.local_epic=true", "defense.epic.warmup=1", "defense.epic.interval=1",
            "figures.enabled=false", f"data.root={data_root}"]


@pytest.mark.slow
def test_federated_resume_equals_an_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    """On Flower and Ray through the CLI: fedavg finishes, krum is cut by SIGTERM after round 3 and
    resumed in a new simulation (new nodes, new actors) with the clients' local EPIC states the server
    checkpointed."""
    ref = completed_run(federated_args(tmp_path / "ref", data_root))

    finished: dict[str, bytes] = {}

    def cut_inside_krum(folder: Path) -> None:
        saved = load_checkpoint(folder / "krum" / CHECKPOINT)
        assert saved["member"] == "krum" and 2 <= saved["round"] < 6
        assert sorted(saved["progress"]["epic"]) == [0, 1, 2, 3]  # every client's local EPIC state
        assert json.loads((folder / "fedavg" / "summary.json").read_text())["status"] == "completed"
        finished.update({p.name: p.read_bytes() for p in (folder / "fedavg").iterdir() if p.name != CHECKPOINT})

    out = tmp_path / "cut"
    resumed = interrupt_then_resume(federated_args(out, data_root), out, ".*partial/krum/metrics.jsonl", 3,
                                    signal.SIGTERM, cut_inside_krum)
    assert_same_run(resumed, ref, ["fedavg", "krum"])
    assert {p.name: p.read_bytes() for p in (resumed / "fedavg").iterdir()} == finished, "fedavg was rewritten"
    root = json.loads((resumed / "summary.json").read_text())
    assert root["resumed"] is True and [r["strategy"] for r in root["rows"]] == ["fedavg", "krum"]
    assert without_timing(root["rows"]) == without_timing(json.loads((ref / "summary.json").read_text())["rows"])


# --------------------------------------------------------------------------- the one checkpoint format


def test_a_checkpoint_holds_plain_tensors_and_containers_only(tmp_path: Path) -> None:
    """save_checkpoint refuses what is not plain (naming the entry) and writes nothing; what it takes,
    load_checkpoint reads back with weights_only=True."""
    from collections import Counter, OrderedDict

    import numpy as np

    from fedepic.checkpoint import not_plain

    path = tmp_path / CHECKPOINT
    for bad, where in [({"epic": {0: {"keep": b"\x80"}}}, "state['epic'][0]['keep'] is bytes"),
                       ({"scheduler": {"milestones": Counter([4])}}, "state['scheduler']['milestones'] is Counter"),
                       ({"curve": [0.5, np.float64(0.25)]}, "state['curve'][1] is float64"),
                       ({"ids": {(0, 1): 2}}, "state['ids'] has a key of type tuple")]:
        assert not_plain(bad) == where
        with pytest.raises(TypeError, match=f"checkpoint .*: {re.escape(where)}, not a plain"):
            save_checkpoint(path, bad)
        assert not path.exists() and not list(tmp_path.iterdir())
    good = {"model": OrderedDict(w=torch.ones(2)), "keep": torch.tensor([True, False]), "pair": (1, "a"),
            "curve": [0.5, float("nan"), None], "by_id": {3: {"selections": 2}}, "done": True}
    save_checkpoint(path, good)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.ones(2)) and back["keep"].tolist() == [True, False]
    assert back["pair"] == (1, "a") and back["by_id"] == {3: {"selections": 2}} and back["curve"][2] is None


def test_the_server_checkpoints_local_epic_states_as_bool_tensors() -> None:
    """Progress keeps a client's local EPIC state as its messages carry it (bit-packed bytes); its
    checkpoint part holds {"keep": bool tensor, "selections": int}, as centralized-epic's, and reads
    back to the same packed state; a checkpoint of the earlier version (the packed bytes) still reads."""
    from fedepic.client_work import pack_epic_state
    from fedepic.server_rounds import Progress

    packed = pack_epic_state({"keep": [True, False, True, True, False, True, True, True, False], "selections": 2})
    assert packed == {"keep": bytes([0b10110111, 0b00000000]), "rows": 9, "selections": 2}
    progress = Progress({"w": torch.zeros(2)}, epic={5: dict(packed)})
    saved = progress.state_dict()["epic"][5]
    assert saved["keep"].dtype == torch.bool and saved["selections"] == 2
    assert saved["keep"].tolist() == [True, False, True, True, False, True, True, True, False]
    assert Progress.from_state_dict(progress.state_dict()).epic == {5: packed}
    earlier = {**progress.state_dict(), "epic": {5: dict(packed)}}
    assert Progress.from_state_dict(earlier).epic == {5: packed}


def test_fit_resumes_its_lr_schedule_without_saving_the_milestones() -> None:
    """fit's state for a checkpoint leaves out the scheduler's milestones (a Counter the config gives):
    resumed after epoch 1 of 4 with milestones [3] (gamma 0.5: the lr halves after the third epoch),
    the lrs are 0.1, 0.1, 0.1, 0.05, as in one uninterrupted call, and so are the losses."""
    from fedepic.config import TrainConfig
    from fedepic.train import fit

    cfg = TrainConfig(lr=0.1, milestones=[3], gamma=0.5, batch_size=8, epochs=4, threads=1, augment="none")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 1, 4, 4), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 2, (32,), generator=gen)

    def net() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))

    whole = fit(net(), x, y, cfg, seed=3, device=torch.device("cpu"))
    states: dict = {}
    model = net()
    fit(model, x, y, cfg, seed=3, device=torch.device("cpu"), epochs=1,
        on_state=lambda epoch, state: states.update({epoch: state}))
    assert "milestones" not in states[1]["scheduler"]
    resumed = fit(model, x, y, cfg, seed=3, device=torch.device("cpu"), resume=states[1])
    assert [h["lr"] for h in whole] == [0.1, 0.1, 0.1, 0.05]
    assert [h["lr"] for h in resumed] == [h["lr"] for h in whole]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]
