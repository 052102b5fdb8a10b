"""log.tensorboard=true: each member's metrics.jsonl also as TensorBoard event files beside it, read back
with tensorboard's own EventAccumulator and compared value by value with metrics.jsonl, in the three
modes; without the tensorboard package the key is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedepic.config import load_config
from fedepic.errors import ConfigError
from fedepic.tensorboard_log import scalars

SMALL = ["data.name=synthetic", "data.synthetic_train=200", "data.synthetic_test=50", "progress=false",
         "figures.enabled=false", "model.name=mlp"]
MODES = {
    "decentralized": ["config=dfl_smoke.yaml", "engine=local", "data.synthetic_train=200", "data.synthetic_test=50",
                      "progress=false", "figures.enabled=false"],
    "federated": ["mode=federated", "engine=local", "clients.count=4", "clients.malicious_ids=[0]", "rounds=2",
                  "attack.model=sign_flip", "strategies=[fedavg,fedmedian]", *SMALL],
    "centralized": ["mode=centralized", "train.epochs=2", "defense.compare=[none,random]", *SMALL],
}


def test_a_record_becomes_its_step_and_scalars() -> None:
    step, values = scalars({"round": 4, "accuracy": 0.75, "loss": None, "per_class": [0.5, 1], "name": "x",
                            "ok": False, "consensus": {"distance": 2.0}, "failures": []})
    assert step == 4
    assert values.keys() == {"accuracy", "per_class/0", "per_class/1", "consensus/distance"}  # no "loss": null
    assert values["accuracy"] == 0.75 and values["per_class/0"] == 0.5 and values["per_class/1"] == 1.0
    assert math.isnan(scalars({"round": 1, "per_class": [None, 0.5]})[1]["per_class/0"])
    assert values["consensus/distance"] == 2.0
    assert scalars({"epoch": 2, "acc": 1})[0] == 2 and scalars({"acc": 1}, fallback_step=7)[0] == 7


def _expected(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says each tag should hold: (step, value as float32, as TensorBoard keeps it)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for count, line in enumerate((folder / "metrics.jsonl").read_text().splitlines()):
        step, values = scalars(json.loads(line), count)
        for tag, value in values.items():
            expected.setdefault(tag, []).append((step, float(np.float32(value))))
    return expected


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(s == t and (v == w or (math.isnan(v) and math.isnan(w)))
                                    for (s, v), (t, w) in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_every_member_gets_event_files_equal_to_its_metrics(mode: str, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (uv run installs it)")
    from fedepic.simulate import main

    assert main([*MODES[mode], f"output_dir={tmp_path}", "log.tensorboard=true"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    members = [p for p in run.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()]
    assert len(members) == 2
    for folder in [run, *members]:
        expected = _expected(folder)
        if not expected:  # a root that logs nothing writes no event file; every member logs
            assert folder == run and not list(folder.glob("events.out.tfevents.*"))
            continue
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        events = _events(folder)
        assert events.keys() == expected.keys(), folder
        assert all(_same(events[tag], expected[tag]) for tag in expected), folder
        assert any(len(points) >= 2 for points in expected.values())  # a curve, not one point


def test_off_by_default_and_no_event_files(tmp_path: Path) -> None:
    from fedepic.simulate import main

    assert load_config(None, []).log.tensorboard is False
    assert main([*MODES["decentralized"], f"output_dir={tmp_path}"]) == 0
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_the_key_is_refused_in_one_line_without_the_package(monkeypatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as error:
        load_config(None, [*SMALL, f"output_dir={tmp_path}", "log.tensorboard=true"])
    message = str(error.value)
    assert "log.tensorboard" in message and "tensorboard package is not installed" in message
    assert "\n" not in message


def test_a_resumed_run_keeps_the_events_of_the_lines_kept_and_purges_the_others(tmp_path: Path) -> None:
    """Cut while the second member runs (the root's metrics.jsonl holds the first member's line, step 0 by
    its index), resumed in process: in every folder TensorBoard's view (both sessions' event files, the
    second purging from the first step it logs) is metrics.jsonl's. The root's records have no round:
    their steps go on from the lines kept (1, not 0 again, which would also purge the kept line's events)."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (uv run installs it)")
    from fedepic.checkpoint import resume_config
    from fedepic.errors import RunInterrupted
    from tests.test_resume import StopAt, only_folder, serve_locally

    args = [a for a in MODES["federated"] if not a.startswith("rounds=")]
    cfg = load_config(None, [*args, "rounds=4", "checkpoint_every=1", "name=t",
                             f"output_dir={tmp_path}", "log.tensorboard=true"])
    with pytest.raises(RunInterrupted):
        serve_locally(cfg, StopAt(tmp_path, ".*partial/fedmedian/metrics.jsonl", 3))
    folder = only_folder(tmp_path)
    cut_root = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["strategy"] for line in cut_root] == ["fedavg"]
    resumed_cfg, point = resume_config(str(folder), None, [])
    assert serve_locally(resumed_cfg, resume=point) == folder
    root_lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(root_lines) == 2 and root_lines[0] == cut_root[0]
    for member in [folder, folder / "fedavg", folder / "fedmedian"]:
        expected, events = _expected(member), _events(member)
        assert events.keys() == expected.keys(), member
        assert all(_same(events[tag], expected[tag]) for tag in expected), (member, events, expected)
    assert len(list((folder / "fedmedian").glob("events.out.tfevents.*"))) == 2  # two sessions, one view
    root = _events(folder)
    assert sorted({step for points in root.values() for step, _ in points}) == [0, 1]


def test_a_resumed_writer_waits_for_a_second_after_the_newest_event_file(tmp_path: Path) -> None:
    """TensorBoard reads event files in name order, the writer's second first: a resumed writer opened in
    the cut file's second could sort first (".12" before ".3") and its events be purged as a restart. The
    resumed writer waits until the clock is past that second; nothing waits without an event file."""
    from fedepic.tensorboard_log import newest_event_second, wait_for_a_later_second

    assert newest_event_second(tmp_path) == -1
    (tmp_path / "events.out.tfevents.1700000005.host.42.3").write_bytes(b"")
    (tmp_path / "events.out.tfevents.1700000003.host.42.12").write_bytes(b"")
    assert newest_event_second(tmp_path) == 1700000005
    now, slept = [1700000004.5], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    wait_for_a_later_second(tmp_path, clock=lambda: now[0], sleep=sleep)
    assert int(now[0]) == 1700000006 and sum(slept) == pytest.approx(1.5, abs=0.06)
    slept.clear()
    wait_for_a_later_second(tmp_path / "empty", clock=lambda: now[0], sleep=sleep)
    assert not slept
