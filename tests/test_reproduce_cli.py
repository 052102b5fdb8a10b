"""python -m fedepic.reproduce: the comparison of published cells with hand-made sweep folders (a cell
within its tolerance, one outside, one missing for a failed run, one missing for a rule fedepic lacks,
a smoke replay without verdicts), --list and --dry-run through the command, bad input (exit 2, one
line, nothing written), and one real two-round replay that writes reproduction.md."""

from __future__ import annotations

import doctest
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fedepic.reproduce import compare as compare_module
from fedepic.reproduce import published, replays
from fedepic.reproduce.__main__ import main
from fedepic.reproduce.compare import compare, read_sweep
from tests.byzfl_python import BYZFL_PYTHON, SKIP_REASON

REPO = Path(__file__).resolve().parent.parent


def run_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "fedepic.reproduce", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def make_sweep(folder: Path, name: str, cells: list[dict]) -> Path:
    """A sweep folder as fedepic.sweep writes it: summary.json listing ``cells`` (values, status, rows),
    each completed one with its own summary.json holding ``rows``."""
    listed = []
    for index, cell in enumerate(cells):
        cell_name = f"{index:03d}"
        entry = {"index": index, "name": cell_name, "values": cell["values"], "status": cell["status"],
                 "error": cell.get("error"), "folder": None}
        if cell["status"] == "completed":
            (folder / "cells" / cell_name).mkdir(parents=True)
            (folder / "cells" / cell_name / "summary.json").write_text(json.dumps({"rows": cell["rows"]}))
            entry["folder"] = f"cells/{cell_name}"
        listed.append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"kind": "sweep", "name": name, "key": "handmade",
                                                     "cells": listed}))
    return folder


def dumbbell_rows(accuracy: dict[str, float]) -> list[dict]:
    return [{"strategy": s, "average_accuracy": a} for s, a in accuracy.items()]


def test_doctests_of_the_registry_and_the_comparison():
    for module in (replays, compare_module):
        assert doctest.testmod(module).failed == 0


def test_every_published_cell_of_every_replay_has_a_mapping():
    for replay in replays.REPLAYS.values():
        for cell in published.cells(replay.experiment):
            mapping = replay.map_cell(cell.key)
            assert mapping.member and mapping.metric and mapping.scale == 100.0


def test_dumbbell_cells_within_outside_and_missing(tmp_path):
    # iid: gossip 95.0 (published 96.434, one seed: tolerance 3 -> within), scclip 93.0 (96.404: 3.40 away ->
    # outside); noniid: the cell failed -> every noniid cell missing with its error; rfa: not in the folder;
    # mozi 94.0 (published 96.044: 2.04 away -> within): MOZI's cells map to member mozi's average_accuracy
    folder = make_sweep(tmp_path / "sweep", "reproduce-dumbbell-clippedgossip", [
        {"values": {"data.partition": "iid", "seed": 0}, "status": "completed",
         "rows": dumbbell_rows({"gossip": 0.95, "scclip": 0.93, "trimmed_mean": 0.9241, "mozi": 0.94})},
        {"values": {"data.partition": "label_sets", "seed": 0}, "status": "failed", "error": "RunFailed: boom"},
    ])
    _, sweep = read_sweep(folder)
    replay = replays.get("dumbbell")
    results = {(r.key["split"], r.key["aggregator"]): r for r in compare(replay, published.cells("dumbbell_clippedgossip"),
                                                                            sweep)}
    gossip = results["iid", "gossip"]
    assert gossip.verdict == "within" and gossip.tolerance == 3.0
    assert gossip.mean == pytest.approx(95.0) and gossip.std is None and gossip.seeds == [0]
    assert gossip.difference == pytest.approx(95.0 - 96.43429487179488)
    assert results["iid", "scclip"].verdict == "outside"
    assert results["iid", "scclip"].difference == pytest.approx(93.0 - 96.4042467948718)
    # 92.40 against 95.40: exactly 3.00 away is still within (|d| <= tolerance)
    assert results["iid", "trimmed_mean"].verdict == "within"
    assert results["noniid", "gossip"].verdict == "missing"
    assert results["noniid", "gossip"].reason == "seed 0: failed (RunFailed: boom)"
    assert results["iid", "rfa"].verdict == "missing"
    assert results["iid", "rfa"].reason == "no average_accuracy of member 'rfa' in the matching cells"
    mozi = results["iid", "mozi"]
    assert mozi.verdict == "within" and mozi.mean == pytest.approx(94.0) and mozi.seeds == [0]
    assert mozi.difference == pytest.approx(94.0 - 96.04366987179488)
    assert results["noniid", "mozi"].reason == "seed 0: failed (RunFailed: boom)"


def test_bucketing_mean_and_spread_over_seeds(tmp_path):
    # krum / ipm: published 9.989 with std 0.3007 over 3 seeds -> tolerance 2.3007; fedepic 8, 9, 10 -> mean 9,
    # std 1 -> within. cm / ipm: published 32.13, std 5.087 -> tolerance 7.087; fedepic 20, 30 (seed 2 failed)
    # -> mean 25, 7.13 away -> outside, over two seeds, the lost one named. krum / mimic: not in the folder
    rows = {0: (0.08, 0.20), 1: (0.09, 0.30), 2: (0.10, None)}
    cells = []
    for seed, (krum, cm) in rows.items():
        members = [{"strategy": "krum", "final_accuracy": krum}]
        if cm is not None:
            members.append({"strategy": "fedmedian", "final_accuracy": cm})
        cells.append({"values": {"seed": seed, "attack.model": "ipm", "attack.data": "none"}, "status": "completed",
                      "rows": members})
    folder = make_sweep(tmp_path / "sweep", "reproduce-bucketing-mnist", cells)
    _, sweep = read_sweep(folder)
    found = {(r.key["aggregator"], r.key["attack"]): r
             for r in compare(replays.get("bucketing_mnist"), published.cells("bucketing_mnist"), sweep)}
    krum = found["krum", "ipm"]
    assert krum.verdict == "within" and krum.seeds == [0, 1, 2]
    assert krum.mean == pytest.approx(9.0) and krum.std == pytest.approx(1.0)
    assert krum.tolerance == pytest.approx(0.30070326520293045 + 2.0)
    cm = found["cm", "ipm"]
    assert cm.verdict == "outside" and cm.mean == pytest.approx(25.0)
    assert cm.std == pytest.approx(statistics.stdev([20.0, 30.0])) and cm.seeds == [0, 1]
    assert "seed 2: completed" in cm.reason
    assert found["krum", "mimic"].verdict == "missing"
    assert found["krum", "mimic"].reason.startswith("the run folder has no sweep cell with attack.model=mimic")
    assert found["krum", "bit_flip"].reason.startswith("the run folder has no sweep cell with attack.model=bit_flip")


def test_smoke_replay_reports_values_without_a_verdict(tmp_path):
    folder = make_sweep(tmp_path / "sweep", "reproduce-epic-table2-smoke", [
        {"values": {"seed": 0}, "status": "completed",
         "rows": [{"defense": "none", "attack_success": 0.5, "accuracy": 0.7},
                  {"defense": "epic-0.1", "attack_success": 0.0, "accuracy": 0.65}]}])
    _, sweep = read_sweep(folder)
    results = compare(replays.get("epic_table2_smoke"), published.cells("epic_table2"), sweep)
    assert [r.verdict for r in results] == ["not comparable"] * 4
    assert [round(r.mean, 6) for r in results] == [50.0, 70.0, 0.0, 65.0]
    assert all("not Table 2's" in r.reason for r in results)


def test_from_folder_writes_reproduction_md_and_json(tmp_path, capsys):
    folder = make_sweep(tmp_path / "sweep", "reproduce-byzfl-benchmark", [
        {"values": {"seed": 0, "attack.model": "none", "attack.ipm_eps": 0.1}, "status": "completed",
         "rows": [{"strategy": "fedavg", "final_accuracy": 0.9864}]},
        {"values": {"seed": 0, "attack.model": "ipm", "attack.ipm_eps": 1.0}, "status": "completed",
         "rows": [{"strategy": "fedmedian", "final_accuracy": 0.93}]}])
    assert main(["byzfl", "--from", str(folder)]) == 0
    data = json.loads((folder / "reproduction.json").read_text())
    verdicts = {c["key"]["row"]: c["verdict"] for c in data["cells"]}
    # 98.64 vs 98.51 (tolerance 2: byzfl_compare's) within; 93.00 vs 96.03 outside; the other two not run
    assert verdicts == {"none_avg": "within", "alie_tm": "missing", "signflip_median": "outside",
                        "ipm_tm_clip_nnm": "missing"}
    assert data["counts"] == {"within": 1, "outside": 1, "missing": 2, "not comparable": 0}
    assert data["protocol_changed"] is True  # a hand-made folder is not the shipped config's sweep
    text = (folder / "reproduction.md").read_text()
    assert "| row=none_avg | 98.51 | 0 | - | 98.64 | - | 0 | 0.13 | 2.00 | within |" in text
    assert text in capsys.readouterr().out
    assert not list(folder.glob(".*.tmp"))


def test_list_and_dry_run_through_the_command(tmp_path):
    listed = run_command(["--list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in ("dumbbell", "bucketing_mnist", "byzfl", "epic_table2_smoke"):
        assert f"| {name} |" in listed.stdout
    out = tmp_path / "out"
    dry = run_command(["bucketing_mnist", "--dry-run", "--seeds", "2", f"output_dir={out}"], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "seeds: 0,1" in dry.stdout and "sweep cells (10):" in dry.stdout
    assert "aggregator=krum, attack=ipm: published 9.99, tolerance 2.30; fedepic krum final_accuracy at " \
           "attack.model=ipm, attack.data=none: from 2 sweep cell(s)" in dry.stdout
    assert "aggregator=rfa, attack=ipm: published" in dry.stdout and "MISSING" not in dry.stdout
    assert not out.exists()  # nothing ran, nothing written


@pytest.mark.parametrize("args, needle", [
    (["nosuchreplay"], "nosuchreplay"),
    (["dumbbell", "nosuchkey=1"], "nosuchkey"),
    (["dumbbell", "rounds=abc"], "rounds"),
    (["dumbbell", "--seeds", "0"], "--seeds"),
    (["dumbbell", "--bogus"], "--bogus"),
    (["dumbbell", "sweep.seed=[1]"], "--seeds"),
    (["dumbbell", "--from", "does-not-exist"], "--from"),
    ([], "NAME"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_command([*args, f"output_dir={out}"] if args and not args[-1].startswith("does") else args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and needle in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_from_a_sweep_of_another_replay_is_refused(tmp_path):
    folder = make_sweep(tmp_path / "sweep", "reproduce-dumbbell-clippedgossip", [])
    assert main(["byzfl", "--from", str(folder)]) == 2
    assert not (folder / "reproduction.md").exists()


# The CI smoke of every shipped replay: the real command, cut to a handful of iterations on few rows (and few
# clients where the replay's sweep does not fix them), so each runs in seconds to a minute on a 2-core CPU.
# A replay added to fedepic.reproduce.replays without an entry here fails
# test_every_shipped_replay_has_a_smoke_run.
SMOKE_RUNS: dict[str, list[str]] = {
    # 20 nodes (the dumbbell's edges name them all), 1 round, 10 training images a class
    "dumbbell": ["rounds=1", "data.train_per_class=10", "data.test_per_class=5"],
    # seed 0 only; 5 clients with 1 attacker (the authors' 25 with 5), 1 round
    "bucketing_mnist": ["--seeds", "1", "rounds=1", "clients.count=5", "clients.malicious_ids=[4]",
                        "data.train_per_class=20", "data.test_per_class=10"],
    # the sweep fixes the clients and the split files index all 60,000 rows: 1 round, 100 test images
    "byzfl": ["rounds=1", "data.test_per_class=10"],
    # 2 epochs on 60 images (EPIC's first selection after 1), a 2-step brew from a 1-epoch pretraining
    "epic_table2_smoke": ["train.epochs=2", "train.milestones=[]", "defense.epic.warmup=1", "attack.steps=2",
                          "attack.restarts=1", "attack.pretrain_epochs=1", "data.train_per_class=20",
                          "data.test_per_class=10"],
}


def test_every_shipped_replay_has_a_smoke_run(tmp_path):
    listed = run_command(["--list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = [line.split("|")[1].strip() for line in listed.stdout.splitlines()[2:]]
    assert names == list(replays.REPLAYS) and sorted(SMOKE_RUNS) == sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_every_replay_runs_end_to_end_for_a_handful_of_iterations(tmp_path, data_root, name):
    """``python -m fedepic.reproduce NAME`` with SMOKE_RUNS[NAME]: the sweep runs, every published cell gets
    fedepic's figure (none missing), which is 100 x the mapped member's metric in the matching sweep cell's
    summary.json, and reproduction.md, marked "protocol changed", is printed and its path is the last line."""
    out = tmp_path / "out"
    proc = run_command([name, *SMOKE_RUNS[name], f"output_dir={out}", "progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replay = replays.get(name)
    [folder] = list(out.glob("sweep-*"))
    data = json.loads((folder / "reproduction.json").read_text())
    assert data["protocol_changed"] is True and data["seeds"] == [0]
    published_cells = published.cells(replay.experiment)
    assert [c["key"] for c in data["cells"]] == [dict(c.key) for c in published_cells]
    listed = json.loads((folder / "summary.json").read_text())["cells"]
    assert listed and all(c["status"] == "completed" for c in listed)
    allowed = {"not comparable"} if replay.comparable else {"within", "outside"}
    for cell in data["cells"]:
        assert cell["verdict"] in allowed, cell
        mapping = replay.map_cell(cell["key"])
        [source] = [c for c in listed
                    if compare_module.matches(compare_module.SweepCell(c["values"], c["status"], None), mapping.values)]
        rows = json.loads((folder / source["folder"] / "summary.json").read_text())["rows"]
        [row] = [r for r in rows if str(r.get("strategy", r.get("defense"))) == mapping.member]
        assert cell["mean"] == pytest.approx(100 * row[mapping.metric]), cell["key"]
        assert 0.0 <= cell["mean"] <= 100.0
    text = (folder / "reproduction.md").read_text()
    assert f"protocol changed: {' '.join(a for a in SMOKE_RUNS[name] if '=' in a)}" in text
    if replay.deviations:  # the shipped config's differences, said to be from before the overrides
        assert "- differs from the published protocol (the shipped config's, before the overrides above): " in text
    first = published_cells[0]
    assert f"| {', '.join(f'{k}={v}' for k, v in first.key.items())} | {first.value:.2f} |" in text
    assert text in proc.stdout and proc.stdout.strip().endswith(str(folder / "reproduction.md"))
    if name == "dumbbell":  # all five members ran on both splits, MOZI with its own step
        members = {c["key"]["aggregator"] for c in data["cells"]}
        assert members == {"gossip", "scclip", "trimmed_mean", "rfa", "mozi"} and len(data["cells"]) == 10


def _byzfl_compare():
    import importlib.util

    spec = importlib.util.spec_from_file_location("byzfl_compare", REPO / "benchmarks" / "byzfl_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byzfl_replay_runs_byzfl_compare_rows(tmp_path):
    """Each cell of the byzfl replay's sweep is the fedepic run benchmarks/byzfl_compare.py makes for its row
    (same sections, same split rows), and the published side is ByzFL's accuracy stored in docs/results/byzfl.md."""
    import dataclasses

    import numpy as np

    from fedepic.config import load_config
    from fedepic.sweep.plan import plan_sweep

    script, replay = _byzfl_compare(), replays.get("byzfl")
    plan = plan_sweep(load_config(str(replay.config_path()), [*replay.fixed_overrides(), "sweep.seed=[0]"]))
    by_row = {}
    for cell in published.cells("byzfl_benchmark"):
        mapping = replay.map_cell(cell.key)
        [match] = [c for c in plan.cells if compare_module.matches(compare_module.SweepCell(c.values, "", None),
                                                                   mapping.values)]
        by_row[cell.key["row"]] = (match.config, mapping.member)
    assert list(by_row) == list(script.FEDEPIC_ROWS)
    for row, (ours, member) in by_row.items():
        split = REPO / "configs" / "reproduce" / "byzfl_split" / f"clients_{ours.clients.count}.npz"
        theirs = load_config(None, [*script.COMMON, f"data.partition_file={split}", "rounds=800",
                                    "train.eval_every=50", *script.FEDEPIC_ROWS[row]])
        assert ours.strategies == theirs.strategies == [member]
        if row == "none_avg":  # the script leaves malicious_ids unset (5 flagged, no attack); the replay: none
            assert ours.clients.malicious_ids == [] and theirs.clients.malicious_ids is None
            theirs = dataclasses.replace(theirs, clients=dataclasses.replace(theirs.clients, malicious_ids=[]))
        for section in ("data", "model", "clients", "server", "rounds", "seed", "mode"):
            assert getattr(ours, section) == getattr(theirs, section), (row, section)
        used = ["pre_aggregation", "byzantine", *(["trim"] if member == "fedtrimmedavg" else []),
                *(["clip_radius"] if "clip" in ours.defense.pre_aggregation else [])]  # what the row's rules read
        assert [getattr(ours.defense, k) for k in used] == [getattr(theirs.defense, k) for k in used], row
        assert dataclasses.replace(ours.train, threads=None) == dataclasses.replace(theirs.train, threads=None)
        unused = {"alie_z": None, "ipm_eps": None}  # the other attack's parameter: not read by this row
        unused.pop({"alie": "alie_z", "ipm": "ipm_eps"}.get(ours.attack.model, ""), None)
        if ours.attack.model != "none":
            assert dataclasses.replace(ours.attack, **unused) == dataclasses.replace(theirs.attack, **unused), row
    # the two split files: the same 10 honest clients (ByzFL's Dirichlet 0.5 split of all 60,000 rows)
    with np.load(REPO / "configs/reproduce/byzfl_split/clients_10.npz") as ten, \
            np.load(REPO / "configs/reproduce/byzfl_split/clients_12.npz") as twelve:
        rows = np.concatenate([ten[f"client_{k}"] for k in range(10)])
        assert sorted(rows.tolist()) == list(range(60_000))
        assert all((ten[f"client_{k}"] == twelve[f"client_{k}"]).all() for k in range(10))
        assert twelve["client_10"].size == twelve["client_11"].size == 0
    results = (REPO / "docs" / "results" / "byzfl.md").read_text()
    stored = [c.value for c in published.cells("byzfl_benchmark")]
    assert "| 98.51 | 98.60 |" in results and "| 97.84 | 97.64 |" in results  # ByzFL acc %, fedepic acc %
    assert "| 96.03 | 95.04 |" in results and "| 97.39 | 97.09 |" in results
    assert stored == [98.51, 97.84, 96.03, 97.39]


@pytest.mark.skipif(not BYZFL_PYTHON.exists(), reason=SKIP_REASON)
def test_shipped_split_is_byzfls_own(tmp_path, data_root):
    """ByzFL's DataDistributor, run again through benchmarks/byzfl_side.py, gives the shipped rows."""
    import numpy as np

    out = tmp_path / "split.npz"
    subprocess.run([str(BYZFL_PYTHON), str(REPO / "benchmarks" / "byzfl_side.py"), "split", "--data",
                    str(data_root), "--out", str(out), "--byzantine", "2"], check=True, timeout=600)
    with np.load(out) as fresh, np.load(REPO / "configs/reproduce/byzfl_split/clients_12.npz") as shipped:
        assert set(fresh.files) == set(shipped.files)
        for name in fresh.files:
            assert np.array_equal(np.sort(fresh[name]), shipped[name].astype(np.int64)), name


def test_from_with_failed_cells_exits_1_after_writing_the_table(tmp_path, capsys):
    folder = make_sweep(tmp_path / "sweep", "reproduce-byzfl-benchmark", [
        {"values": {"seed": 0, "attack.model": "none", "attack.ipm_eps": 0.1}, "status": "completed",
         "rows": [{"strategy": "fedavg", "final_accuracy": 0.9864}]},
        {"values": {"seed": 0, "attack.model": "ipm", "attack.ipm_eps": 1.0}, "status": "failed",
         "error": "RunFailed: boom"}])
    assert main(["byzfl", "--from", str(folder)]) == 1
    assert (folder / "reproduction.md").is_file() and (folder / "reproduction.json").is_file()
    err = capsys.readouterr().err
    assert "1 sweep cell(s) failed: 001" in err


def test_from_refuses_a_planted_link_and_a_live_sweep(tmp_path, capsys):
    """A link in the folder (at reproduction.md, say, pointing outside) is refused before anything is
    written, and so is a folder a sweep still holds locked; neither writes through or into it."""
    import fcntl

    from fedepic.outputs import LOCK

    cells = [{"values": {"seed": 0, "attack.model": "none", "attack.ipm_eps": 0.1}, "status": "completed",
              "rows": [{"strategy": "fedavg", "final_accuracy": 0.9864}]}]
    folder = make_sweep(tmp_path / "sweep", "reproduce-byzfl-benchmark", cells)
    outside = tmp_path / "outside.md"
    outside.write_text("theirs")
    (folder / "reproduction.md").symlink_to(outside)
    assert main(["byzfl", "--from", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "--from" in err and len(err.strip().splitlines()) == 1
    assert outside.read_text() == "theirs" and not (folder / "reproduction.json").exists()
    (folder / "reproduction.md").unlink()

    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # a live sweep holds its folder's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["byzfl", "--from", str(folder)]) == 2
        assert "another process is running this sweep" in capsys.readouterr().err
        assert not (folder / "reproduction.md").exists() and not (folder / "reproduction.json").exists()
    finally:
        os.close(fd)
    (folder / LOCK).unlink()
    assert main(["byzfl", "--from", str(folder)]) == 0
    assert (folder / "reproduction.md").is_file() and not (folder / LOCK).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_without_a_source_checkout_the_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """An installed wheel has fedepic/ but no configs/: every way to a replay's config says it needs a
    checkout (exit 2, one line), and --list still works."""
    monkeypatch.setattr(replays, "REPO", tmp_path)
    assert main(["dumbbell", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a source checkout" in err and "configs/reproduce/" in err
    folder = make_sweep(tmp_path / "sweep", "reproduce-dumbbell-clippedgossip", [])
    assert main(["dumbbell", "--from", str(folder)]) == 2
    assert "needs a source checkout" in capsys.readouterr().err
    assert main(["--list"]) == 0


def test_overrides_that_keep_part_of_the_replay_are_a_subset_not_a_new_protocol():
    """Part of a replay's members or of an unzipped axis's values runs the shipped protocol on fewer cells;
    anything else (another value, a zipped axis, any other key) changes the protocol."""
    from fedepic.reproduce.subset import split_overrides

    dumbbell, bucketing = replays.get("dumbbell"), replays.get("bucketing_mnist")
    subset, changed = split_overrides(str(dumbbell.config_path()), dumbbell.fixed_overrides(), [
        "strategies=[rfa,gossip]", "sweep.data.partition=[label_sets]", "rounds=2", "strategies=[gossip,krum]",
        "sweep.data.partition=[iid,shards]", "strategies=[gossip,gossip]", "sweep.data.partition=[]"])
    assert subset == ["strategies=[rfa,gossip]", "sweep.data.partition=[label_sets]"]
    assert changed == ["rounds=2", "strategies=[gossip,krum]", "sweep.data.partition=[iid,shards]",
                       "strategies=[gossip,gossip]", "sweep.data.partition=[]"]
    subset, changed = split_overrides(str(bucketing.config_path()), bucketing.fixed_overrides(), [
        "strategies=[krum,centered_clipping]", "sweep.attack.model=[bit_flip]"])
    assert subset == ["strategies=[krum,centered_clipping]"] and changed == ["sweep.attack.model=[bit_flip]"]


def test_overrides_of_where_and_how_a_sweep_runs_are_neither_subset_nor_protocol():
    """sweep.parallel, progress, output_dir, the Ray settings: the sweep key ignores them, so the replay
    keeps its verdicts (the name, which --from checks, stays a change)."""
    from fedepic.reproduce.subset import split_overrides

    dumbbell = replays.get("dumbbell")
    subset, changed = split_overrides(str(dumbbell.config_path()), dumbbell.fixed_overrides(), [
        "sweep.parallel=true", "progress=false", "output_dir=/tmp/x", "ray.num_cpus=2", "sweep.max_retries=0",
        "name=other", "sweep.cell_cpus=2"])
    assert subset == [] and changed == ["name=other", "sweep.cell_cpus=2"]


def test_from_a_folder_that_ran_part_of_the_replay_reads_it_as_that_part(tmp_path):
    """--from recognises a sweep of the shipped config narrowed to some members and axis values: the same
    sweep key as the shipped config with those narrowing overrides; a folder with another key is a
    changed protocol."""
    import yaml

    from fedepic.config import load_config
    from fedepic.reproduce.__main__ import changed_protocol
    from fedepic.sweep.plan import plan_sweep

    replay = replays.get("dumbbell")
    narrowed = ["strategies=[gossip,rfa]", "sweep.data.partition=[iid]"]
    key = plan_sweep(load_config(str(replay.config_path()),
                                 [*replay.fixed_overrides(), *narrowed, "sweep.seed=[0]"])).key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"strategies": ["gossip", "rfa"]}))
    summary = {"key": key, "axes": {"data.partition": ["iid"], "seed": [0]}}
    assert changed_protocol(replay, tmp_path, summary, [0]) == (["strategies=[gossip, rfa]",
                                                                 "sweep.data.partition=[iid]"], [])
    subset, changed = changed_protocol(replay, tmp_path, {**summary, "key": "0123456789"}, [0])
    assert subset == [] and len(changed) == 1 and "0123456789" in changed[0]
