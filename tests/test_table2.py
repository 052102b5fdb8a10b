"""benchmarks/table2.py: the concurrent Table 2 driver gives the centralized runner's outcomes.

Two workers and one give the same JSON lines (bar timings and process ids), and both equal what
`run_centralized` gives for the same config: the same seeding (cfg.seed + 1000 * t), the same
poisons, the same victims, controls replaying the trial's EPIC counts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedepic.centralized import run_centralized
from fedepic.config import load_config
from fedepic.data import load_dataset

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.train_per_class=30", "data.test_per_class=10", "train.epochs=3", "train.milestones=[2]",
             "attack.pretrain_epochs=1", "attack.restarts=1", "attack.steps=2", "train.threads=1",
             "train.device=cpu", "defense.epic.warmup=1", "defense.epic.interval=1"]
DEFENSES = ["none", "epic-0.3", "random"]  # random replays EPIC's counts: a dependency between trainings
EXACT = ("attack_success", "accuracy", "dropped", "poisons_dropped", "poison_recall", "clean_drop_rate",
         "accuracy_curve", "target_index", "target_class", "adversarial_class", "poisons", "diverged")
CLOSE = ("brew_alignment", "random_alignment")  # float sums, last bits can follow allocation history


def _table2(tmp_path: Path, name: str, workers: int, data_root: Path) -> subprocess.Popen:
    out = tmp_path / name
    env = {**os.environ, "FEDEPIC_DATA": str(data_root), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "table2.py"), "run", "--config", "centralized_smoke",
           *OVERRIDES, "--defenses", ",".join(DEFENSES), "--targets", "2", "--workers", str(workers),
           "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return [json.loads(line) for line in stdout.splitlines()]  # every line is one JSON object


def _trainings(lines: list[dict]) -> dict[tuple, dict]:
    return {(o["target"], o["defense"]): o for o in lines if o.get("event") == "training"}


def _same(a: dict, b: dict) -> None:
    for key in EXACT:
        assert a[key] == b[key], key
    for key in CLOSE:
        assert math.isclose(a[key], b[key], rel_tol=1e-5), key


@pytest.mark.slow
def test_two_workers_equal_one_and_the_centralized_runner(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("FEDEPIC_DATA", str(data_root))
    cfg = load_config("centralized_smoke", [*OVERRIDES, f"defense.compare=[{','.join(DEFENSES)}]",
                                            "attack.targets=2", "progress=false", f"output_dir={tmp_path}/runs"])
    load_dataset(cfg.data, cfg.seed)  # decoded once into the session's cache, before the processes read it
    two, one = _table2(tmp_path, "two", 2, data_root), _table2(tmp_path, "one", 1, data_root)
    threads = torch.get_num_threads()
    try:  # the reference, while the two drivers run
        run = run_centralized(cfg)
    finally:
        torch.set_num_threads(threads)
    reference = {(o["trial"], m): o for m in DEFENSES
                 for o in json.loads((run / m / "summary.json").read_text())["trials_detail"]}
    lines_two, lines_one = _lines(two), _lines(one)

    events = [o.get("event") for o in lines_two]
    assert events.count("pretrain") == 1 and events.count("brew") == 2 and events.count("training") == 6
    assert events[-1] == "summary"
    summary = lines_two[-1]
    assert summary["bench"] == "table2.run" and summary["targets_done"] == [0, 1] and summary["concurrent"] == 2
    assert summary["workers_started"] == 2 and not summary["interrupted"] and summary["stopped"] == []
    assert [r["defense"] for r in summary["rows"]] == DEFENSES and all(r["trials"] == 2 for r in summary["rows"])
    assert (tmp_path / "two" / "table2.md").read_text().count("\n| ") == 4  # header + 3 defenses
    epochs = (tmp_path / "two" / "table2-epochs.jsonl").read_text().splitlines()
    assert len(epochs) == 6 * 3
    assert [json.loads(line) for line in (tmp_path / "two" / "table2.jsonl").read_text().splitlines()] == lines_two

    two_t, one_t = _trainings(lines_two), _trainings(lines_one)
    assert set(two_t) == set(one_t) == set(reference) == {(t, d) for t in (0, 1) for d in DEFENSES}
    for key, outcome in two_t.items():
        assert outcome["seed"] == 1000 * key[0]
        _same(outcome, one_t[key])
        _same(outcome, reference[key])
    assert two_t[(0, "random")]["dropped"] == two_t[(0, "epic-0.3")]["dropped"] > 0  # replayed counts
    assert {o["pid"] for o in two_t.values()} != {o["pid"] for o in one_t.values()}
    assert len({o["pid"] for o in two_t.values()}) == 2
