"""Sweeps (fedepic/sweep, simulations/sweep_ray.py): a grid of ordinary runs, aggregated over seeds,
resumable cell by cell, failures recorded, bad grids refused before anything runs, one Ray run."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fedepic.config import load_config
from fedepic.errors import RunInterrupted
from fedepic.simulate import main
from fedepic.sweep.aggregate import Stat, Table, direction
from fedepic.sweep.plan import grid, plan_sweep
from fedepic.sweep.report import format_stat, markdown, marked
from tests.test_federated import REPO, interrupt_run
from tests.test_resume import metrics_lines

SMOKE = ["config=dfl_smoke.yaml", "engine=local", "progress=false", "data.synthetic_train=300",
         "data.synthetic_test=100"]
GRID = ["sweep.seed=[0,1]", "sweep.attack.model=[none,sign_flip]", "sweep.strategies=[gossip,gp]"]


def run_cli(args: list[str], capsys) -> tuple[int, Path | None, str]:
    """``main(args)``: the exit status, the folder it printed, and stderr."""
    rc = main(args)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return rc, Path(lines[-1]) if lines else None, captured.err


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def sweep_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.name.startswith("sweep-")]
    return folder


def sessions(folder: Path) -> list[list[str]]:
    """The cells each session set out to run (metrics.jsonl's session lines)."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line["pending"] for line in lines if line["event"] == "session"]


def recompute(folder: Path, metric: str) -> dict[tuple[str, str], tuple[float, float | None, int]]:
    """(attack.model, member) -> (mean, s.e., n) from the completed cells' own summaries, by hand."""
    values: dict[tuple[str, str], list[float]] = {}
    for cell in read(folder / "summary.json")["cells"]:
        if cell["status"] != "completed":
            continue
        for row in read(folder / cell["folder"] / "summary.json")["rows"]:
            if row.get(metric) is not None:
                values.setdefault((cell["values"]["attack.model"], row["strategy"]), []).append(row[metric])
    return {k: (statistics.mean(v), statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None, len(v))
            for k, v in values.items()}


def assert_aggregates_match(folder: Path, metric: str) -> None:
    expected = recompute(folder, metric)
    got = {(r["attack.model"], r["member"]): (r["mean"], r["se"], r["n"])
           for r in read(folder / "summary.json")["aggregates"][metric]}
    assert got.keys() == expected.keys()
    for key, (mean, se, n) in expected.items():
        assert got[key][0] == pytest.approx(mean, rel=1e-12) and got[key][2] == n
        assert (got[key][1] is None) if se is None else got[key][1] == pytest.approx(se, rel=1e-9)


def assert_sweep_report(folder: Path, summary: dict, best_cell: str) -> None:
    """report.html of a sweep: offline, its status, the best cell of a table in bold, every figure
    embedded byte for byte, a link to every cell's own report."""
    import base64
    import re

    page = (folder / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page
    assert f">{summary['status']}<" in page
    assert re.search(r'class="best">' + re.escape(best_cell) + "<", page)
    for name in summary["figures"]:
        assert base64.b64encode((folder / name).read_bytes()).decode() in page, name
    for cell in summary["cells"]:
        assert f'href="{cell["folder"]}/report.html"' in page and (folder / cell["folder"] / "report.html").is_file()


# --------------------------------------------------------------------------- a grid, its numbers, its files


def test_grid_tables_and_figures_equal_the_cells_own_figures(tmp_path: Path, capsys) -> None:
    rc, folder, err = run_cli([*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", *GRID], capsys)
    assert rc == 0, err
    summary = read(folder / "summary.json")
    assert summary["status"] == "completed" and summary["counts"] == {"completed": 8}
    assert summary["row_axes"] == ["attack.model"] and summary["member_axis"] == "strategies"
    assert len(summary["cells"]) == 8 and all((folder / c["folder"] / "config.yaml").is_file() for c in summary["cells"])
    for metric in ("mean_accuracy", "worst_accuracy", "consensus_distance", "detection_recall"):
        assert_aggregates_match(folder, metric)
    for name in ("tables/mean_accuracy.md", "tables/mean_accuracy.csv", "tables.md",
                 "figures/heatmap-mean_accuracy.png", "figures/curves-mean_accuracy.png"):
        assert (folder / name).stat().st_size > 0, name
    # the paper-ready table: percent, mean ± s.e., n in the caption, the best member of each row in bold
    table = (folder / "tables/mean_accuracy.md").read_text()
    assert "n = 2 seeds (0, 1)" in table and "| attack.model | gossip | gp |" in table
    sign_flip = recompute(folder, "mean_accuracy")
    best = max(("gossip", "gp"), key=lambda m: sign_flip[("sign_flip", m)][0])
    mean, se, _ = sign_flip[("sign_flip", best)]
    assert f"**{100 * mean:.1f} ± {100 * se:.1f}**" in next(line for line in table.splitlines() if "| sign_flip |" in line)
    assert_sweep_report(folder, summary, f"{100 * mean:.1f} ± {100 * se:.1f}")

    # a cell is an ordinary run: its own config, run directly, gives the same metrics line for line
    cell = folder / summary["cells"][3]["folder"]
    rc, direct, err = run_cli([f"config={cell / 'config.yaml'}", f"output_dir={tmp_path / 'direct'}"], capsys)
    assert rc == 0, err
    assert metrics_lines(direct / "gp" / "metrics.jsonl") == metrics_lines(cell / "gp" / "metrics.jsonl")

    # the same sweep again finds its folder and runs nothing
    rc, again, err = run_cli([*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", *GRID], capsys)
    assert rc == 0 and again == folder and sessions(folder)[-1] == []


def test_an_interrupted_sweep_reruns_only_its_unfinished_cells(tmp_path: Path, capsys, monkeypatch) -> None:
    from fedepic.peer_local import LocalMember

    play = LocalMember.send  # a round's node work (fedepic.peer_rounds.play_round calls it first)

    def interrupted_in_cell_2(self, round_):  # as SIGINT would, in the 2nd round of the third cell
        if self.cfg.name.startswith("002-") and round_ == 2:
            raise RunInterrupted("interrupted by SIGINT", signum=signal.SIGINT)
        return play(self, round_)

    args = [*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", "rounds=3", *GRID]
    monkeypatch.setattr(LocalMember, "send", interrupted_in_cell_2)
    rc, _, err = run_cli(args, capsys)
    assert rc == 130 and err.strip().endswith("finished parts were kept"), err
    folder = sweep_folder(tmp_path)
    summary = read(folder / "summary.json")
    assert summary["status"] == "interrupted"
    assert [c["status"] for c in summary["cells"]] == ["completed"] * 2 + ["interrupted"] + ["pending"] * 5
    cut = folder / summary["cells"][2]["folder"]
    assert (cut / "gossip" / "checkpoint.pt").is_file()
    finished = {c: (folder / "cells" / c / "summary.json").stat().st_mtime_ns for c in ("000-0-none-gossip", "001-0-none-gp")}

    monkeypatch.setattr(LocalMember, "send", play)
    rc, again, err = run_cli([f"resume={folder}"], capsys)  # as the same command would (the grid test)
    assert rc == 0 and again == folder, err
    assert sessions(folder)[-1] == [c["name"] for c in summary["cells"][2:]]  # only the unfinished ones ran
    assert {c: (folder / "cells" / c / "summary.json").stat().st_mtime_ns for c in finished} == finished
    resumed = read(cut / "summary.json")
    assert resumed["status"] == "completed" and resumed["resumed"] is True  # continued from its checkpoint
    rc, direct, err = run_cli([f"config={cut / 'config.yaml'}", f"output_dir={tmp_path / 'direct'}"], capsys)
    assert metrics_lines(cut / "gossip" / "metrics.jsonl") == metrics_lines(direct / "gossip" / "metrics.jsonl")
    assert read(folder / "summary.json")["status"] == "completed"
    assert_aggregates_match(folder, "mean_accuracy")


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path: Path, capsys, monkeypatch) -> None:
    from fedepic.peer_local import LocalMember

    play = LocalMember.send  # a round's node work (fedepic.peer_rounds.play_round calls it first)

    def broken_for_seed_1(self, round_):
        if self.cfg.seed == 1 and self.rule == "gp" and round_ == 2:
            raise RuntimeError("a bug in round 2")
        return play(self, round_)

    monkeypatch.setattr(LocalMember, "send", broken_for_seed_1)
    args = [*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", *GRID]
    rc, folder, err = run_cli(args, capsys)
    assert rc == 1 and folder is not None and "2 failed cell(s): 005-1-none-gp, 007-1-sign_flip-gp" in err, err
    summary = read(folder / "summary.json")
    assert summary["status"] == "failed" and summary["counts"] == {"completed": 6, "failed": 2}
    failed = [c for c in summary["cells"] if c["status"] == "failed"]
    assert [c["error"] for c in failed] == ["RuntimeError: a bug in round 2"] * 2
    assert "a bug in round 2" in failed[0]["traceback"] and read(folder / failed[0]["folder"] / "summary.json")[
        "status"] == "failed"
    gp = {(r["attack.model"], r["n"]) for r in summary["aggregates"]["mean_accuracy"] if r["member"] == "gp"}
    assert gp == {("none", 1), ("sign_flip", 1)}  # the tables cover what completed, and say so
    assert "(n=1)" in (folder / "tables/mean_accuracy.md").read_text()
    assert_aggregates_match(folder, "mean_accuracy")

    monkeypatch.setattr(LocalMember, "send", play)
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    assert sessions(folder)[-1] == [c["name"] for c in failed]


@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_a_true_status(tmp_path: Path) -> None:
    args = [*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", "rounds=6", *GRID]
    rc, err = interrupt_run(args, tmp_path, ".sweep-*.partial/metrics.jsonl", signal.SIGTERM, lines=3)
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    summary = read(sweep_folder(tmp_path) / "summary.json")
    statuses = [c["status"] for c in summary["cells"]]
    assert summary["status"] == "interrupted" and statuses[:2] == ["completed", "completed"]
    assert "interrupted" in statuses and statuses.count("completed") + statuses.count("interrupted") + \
        statuses.count("pending") == 8


# --------------------------------------------------------------------------- on Ray, in parallel


def test_ray_is_imported_with_its_failure_signal_handler_off():
    """simulations/__init__.py sets what Ray reads at import; a driver importing the parallel executor
    first (fedepic.reproduce, simulate's sweeps) once got absl's handler, which killed it on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"}
    probe = ("import simulations.sweep_ray\nfrom ray._private import ray_constants\n"
             "print(ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_stops_a_parallel_sweep_with_a_true_status(tmp_path: Path) -> None:
    """SIGTERM to the driver of cells running as Ray tasks: the cells come back interrupted, the root
    summary says so, exit 143 (the driver used to die in absl's handler, leaving no root summary)."""
    args = [*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=true", "ray.num_cpus=2", "rounds=400",
            "sweep.seed=[0,1]"]
    rc, err = interrupt_run(args, tmp_path, ".sweep-*.partial/metrics.jsonl", signal.SIGTERM, lines=1)
    assert rc == 143 and "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    summary = read(sweep_folder(tmp_path) / "summary.json")
    assert summary["status"] == "interrupted"
    assert {c["status"] for c in summary["cells"]} <= {"interrupted", "completed", "pending"}


def test_parallel_cells_on_ray_give_the_sequential_numbers(tmp_path: Path, capsys) -> None:
    """Two Ray workers run the cells of a 2 x 2 grid; the numbers equal the sequential run's."""
    grid_args = ["sweep.seed=[0,1]", "sweep.strategies=[gossip,gp]", "attack.model=sign_flip"]
    rc, parallel, err = run_cli([*SMOKE, f"output_dir={tmp_path / 'ray'}", "ray.num_cpus=2", *grid_args], capsys)
    assert rc == 0, err
    rc, sequential, err = run_cli([*SMOKE, f"output_dir={tmp_path / 'here'}", "sweep.parallel=false", *grid_args],
                                  capsys)
    assert rc == 0, err
    assert parallel.name == sequential.name  # the same sweep: one key, wherever it runs
    summary = read(parallel / "summary.json")
    assert summary["status"] == "completed" and summary["counts"] == {"completed": 4}
    timeless = lambda aggregates: {k: v for k, v in aggregates.items() if k != "seconds"}  # noqa: E731
    assert timeless(summary["aggregates"]) == timeless(read(sequential / "summary.json")["aggregates"])
    for cell in summary["cells"]:
        member = cell["values"]["strategies"][0]
        assert metrics_lines(parallel / cell["folder"] / member / "metrics.jsonl") == \
            metrics_lines(sequential / cell["folder"] / member / "metrics.jsonl")
        assert read(parallel / cell["folder"] / "summary.json")["status"] == "completed"


# --------------------------------------------------------------------------- bad grids: one line, exit 2


@pytest.mark.parametrize("extra, needles", [
    (["sweep.attack.modle=[a,b]"], ["unknown config key 'attack.modle'"]),
    (["sweep.seed=[0,1]", "sweep.topology.name=[ring,bogus]"],
     ["sweep cell 2 of 4 (seed=0, topology.name=bogus)", "'topology.name'", "bogus"]),
    (["sweep.attack.model=[ipm,alie]", "sweep.attack.ipm_eps=[0.1]", "sweep.zip=[[attack.model,attack.ipm_eps]]"],
     ["sweep.zip[0]", "equal lengths", "attack.model has 2, attack.ipm_eps has 1"]),
    (["sweep.output_dir=[a,b]"], ["sweep.output_dir", "the same for every cell"]),
    (["sweep.seed=3"], ["sweep.seed", "an axis is a list of values"]),
    (["sweep.seed=[0,0]"], ["cells 1 (seed=0) and 2 (seed=0) are the same run"]),
    (["sweep.seed=[0,1]", "engine=ray"], ["sweep cell 1 of 2", "engine", "sweep.parallel=false"]),
    (["sweep.strategies=[[gossip,gp],[gp]]"], ["sweep.strategies", "both run member 'gp'"]),
    (["sweep.parallel=false"], ["needs at least one axis"]),
    (["sweep.seed=[0,1]", "sweep.zip=[seed,strategies]"], ["'sweep.zip'", "a list of groups of axes"]),
    (["sweep.seed=[0,1]", "sweep.metrics=[bogus]"], ["'bogus'", "'sweep.metrics'", "mean_accuracy"]),
    (["sweep.seed=[0,1]", "sweep.curves=[final_accuracy]"], ["'final_accuracy'", "'sweep.curves'"]),
])
def test_a_bad_sweep_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys, extra, needles) -> None:
    base = [a for a in SMOKE if not a.startswith("engine=")] if "engine=ray" in extra else SMOKE
    rc, _, err = run_cli([*base, f"output_dir={tmp_path / 'out'}", *extra], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


def test_a_sweep_folder_in_use_is_refused(tmp_path: Path, capsys) -> None:
    import fcntl

    args = [*SMOKE, f"output_dir={tmp_path}", "sweep.seed=[0,1]"]
    plan = plan_sweep(load_config("dfl_smoke.yaml", args[1:]))
    folder = tmp_path / plan.folder_name
    folder.mkdir()
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "another process is running this sweep" in err
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


# --------------------------------------------------------------------------- the pieces


def test_zipped_axes_move_together_and_the_first_axis_varies_slowest() -> None:
    cells = list(grid({"seed": [0, 1], "attack.model": ["ipm", "alie"], "attack.ipm_eps": [0.1, 0.5]},
                      [["attack.model", "attack.ipm_eps"]]))
    assert cells == [{"seed": 0, "attack.model": "ipm", "attack.ipm_eps": 0.1},
                     {"seed": 0, "attack.model": "alie", "attack.ipm_eps": 0.5},
                     {"seed": 1, "attack.model": "ipm", "attack.ipm_eps": 0.1},
                     {"seed": 1, "attack.model": "alie", "attack.ipm_eps": 0.5}]


def test_standard_error_is_the_sample_std_over_root_n_and_absent_for_one_seed() -> None:
    stat = Stat.of([0.5, 0.7, 0.9], [0, 1, 2])
    assert stat.mean == pytest.approx(0.7) and stat.se == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]) / math.sqrt(3))
    one = Stat.of([0.61], [0])
    assert one.se is None and one.n == 1
    assert format_stat(one, percent=True, usual_n=3) == "61.0 (n=1)"
    assert format_stat(stat, percent=True, usual_n=3) == "70.0 ± 11.5"
    assert format_stat(Stat.of([2.0, 4.0]), percent=False, usual_n=2) == "3 ± 1"


def test_the_best_member_follows_the_metrics_direction() -> None:
    assert (direction("mean_accuracy"), direction("attack_success"), direction("dropped")) == (1, -1, 0)
    row = ("ipm",)
    for metric, best in (("worst_accuracy", {"gp"}), ("attack_success", {"gossip"}), ("dropped", set())):
        table = Table(metric, ["attack.model"], [row], ["gossip", "gp"],
                      {(row, "gossip"): Stat.of([0.2, 0.3]), (row, "gp"): Stat.of([0.5, 0.6])})
        assert table.best(row) == best
        text = markdown(table, "setting")
        assert ("**" in text) == bool(best)
    tie = Table("mean_accuracy", ["attack.model"], [row], ["gossip", "gp"],
                {(row, "gossip"): Stat.of([0.0, 0.0]), (row, "gp"): Stat.of([0.0, 0.0])})
    assert tie.best(row) == set()  # every member ties: nothing is marked
    shown_tie = Table("mean_accuracy", ["attack.model"], [row], ["gossip", "gp", "median"],
                      {(row, "gossip"): Stat.of([0.5681, 0.5683]), (row, "gp"): Stat.of([0.5680, 0.5681]),
                       (row, "median"): Stat.of([0.51, 0.52])})
    assert shown_tie.best(row) == {"gossip"} and marked(shown_tie, row, 2) == {"gossip", "gp"}  # both show 56.8


def test_shipped_sweeps_expand_to_their_grids() -> None:
    plan = plan_sweep(load_config("sweep_dfl_attacks.yaml", []))
    assert len(plan.cells) == 294 and plan.member_axis == "strategies" and plan.row_axes == ["attack.data", "attack.model"]
    assert len(plan.axes["seed"]) == 3 and len(plan.axes["strategies"]) == 14 and len(plan.axes["attack.model"]) == 7
    noniid = load_config("noniid.yaml", [])
    first = plan.cells[0].config
    assert (first.data, first.topology, first.rounds) == (noniid.data, noniid.topology, noniid.rounds)
    assert first.engine == "local" and first.train.threads == 1
    smaller = plan_sweep(load_config("sweep_dfl_attacks.yaml", ["sweep.seed=[0]", "sweep.attack.data=[label_flip,none]",
                                                                 "sweep.attack.model=[none,ipm]"]))
    assert len(smaller.cells) == 28 and smaller.key != plan.key  # the command line replaces the file's axes
    variants = {name: (body["strategy"], body["defense"]["pre_aggregation"]) for name, body in first.variants.items()}
    assert variants == {"bucketing_median": ("median", ["bucketing"]), "arc_trimmed_mean": ("trimmed_mean", ["arc"])}
    assert {c.config.strategies[0] for c in plan.cells} >= set(variants)
    server = plan_sweep(load_config("sweep_server_attacks.yaml", []))
    assert server.base.mode == "federated" and server.member_axis == "strategies" and "attack.model" in server.row_axes
    assert len(server.cells) == 273 and len(server.axes["strategies"]) == 13 and len(server.axes["attack.model"]) == 7


def test_sweep_figures_keep_to_three_panels_a_row_and_a_3_to_1_aspect() -> None:
    """The sweep's figures are the run figures' primitives: at most 3 panels a row, one legend outside
    the axes, a band only where n > 1, every cell of the heatmap saying "mean ± s.e." with the best of
    its row in bold, and no figure wider than 3:1."""
    from fedepic.plots import close
    from fedepic.sweep.aggregate import CurveSet, Stat, Table
    from fedepic.sweep.report import band_curves, heatmap

    stat = Stat.of([0.5, 0.6, 0.7], seeds=(0, 1, 2))
    points = [(1, stat), (2, Stat.of([0.6, 0.7], seeds=(0, 1))), (3, Stat.of([0.7], seeds=(0,)))]
    curve = CurveSet("mean_accuracy", "round", ["attack.model"],
                     {(f"a{i}",): {"gossip": points, "gp": points} for i in range(5)})
    fig = band_curves(curve, "setting", ["gossip", "gp"])
    axes = [ax for ax in fig.axes if ax.axison]
    width, height = fig.get_size_inches()
    assert len(axes) == 5 and width / height <= 3.0 + 1e-9
    assert len({round(ax.get_position().x0, 3) for ax in axes}) == 3  # three columns
    assert [ax.get_title() for ax in axes] == [f"attack.model=a{i}" for i in range(5)]
    assert all(len(ax.collections) == 2 for ax in axes)  # one ± s.e. band per member
    close(fig)
    members = [f"m{i}" for i in range(8)]
    table = Table("attack_success", ["attack.model"], [("ipm",)], members,
                  {(("ipm",), m): Stat.of([0.1 * i, 0.1 * i + 0.02], seeds=(0, 1)) for i, m in enumerate(members)})
    fig = heatmap(table, "setting")
    width, height = fig.get_size_inches()
    assert width / height <= 3.0 + 1e-9
    texts = {t.get_text(): t.get_fontweight() for t in fig.axes[0].texts}
    assert texts["1.0 ± 1.0"] == "bold" and texts["71.0 ± 1.0"] == "normal"  # lower attack success is better
    close(fig)


def test_a_local_ray_instance_runs_the_cells_at_the_drivers_priority(monkeypatch) -> None:
    """Ray's workers default to nice 15, which starves them on a shared machine; a sweep's own local
    instance starts them at 0 unless RAY_worker_niceness says otherwise; a cluster keeps its setting."""
    from simulations.sweep_ray import NICENESS, _workers_at_our_priority

    monkeypatch.delenv(NICENESS, raising=False)
    local, attached = load_config(None, []), load_config(None, ["ray.address=10.0.0.1:6379"])
    with _workers_at_our_priority(local):
        assert os.environ[NICENESS] == "0"
    assert NICENESS not in os.environ
    with _workers_at_our_priority(attached):
        assert NICENESS not in os.environ
    monkeypatch.setenv(NICENESS, "5")
    with _workers_at_our_priority(local):
        assert os.environ[NICENESS] == "5"


# --------------------------------------------------------------------------- review fixes


def test_a_figure_that_cannot_be_drawn_leaves_the_sweep_completed(tmp_path: Path, capsys, monkeypatch) -> None:
    """Figures are presentation: a failing heatmap is one warning line, the tables and the status stand."""
    import fedepic.sweep.report as sweep_report

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(sweep_report, "heatmap", broken)
    rc, folder, err = run_cli([*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", "sweep.seed=[0,1]",
                               "sweep.strategies=[gossip]"], capsys)
    assert rc == 0 and "warning: sweep figure figures/heatmap-mean_accuracy not written" in err, err
    summary = read(folder / "summary.json")
    assert summary["status"] == "completed" and summary["aggregates"]["mean_accuracy"]
    assert not (folder / "figures/heatmap-mean_accuracy.png").exists()
    assert (folder / "figures/curves-mean_accuracy.png").is_file() and (folder / "report.html").is_file()
    assert all(c["seconds"] is not None for c in summary["cells"]) and summary["cells_seconds"] > 0


def test_figures_disabled_draws_no_sweep_figure(tmp_path: Path, capsys) -> None:
    rc, folder, err = run_cli([*SMOKE, f"output_dir={tmp_path}", "sweep.parallel=false", "sweep.seed=[0]",
                               "sweep.strategies=[gossip]", "figures.enabled=false"], capsys)
    assert rc == 0, err
    assert not (folder / "figures").exists() and read(folder / "summary.json")["figures"] == []
    assert (folder / "tables/mean_accuracy.md").is_file() and (folder / "report.html").is_file()


def test_a_killed_cell_resumes_from_its_partial_folder_in_either_executor(tmp_path: Path) -> None:
    """The cell folder a resume continues in is the one on disk, also a killed run's .NAME.partial
    (the parallel executor packs that folder's files for its task)."""
    from fedepic.interrupts import Interrupts
    from fedepic.sweep.run import SweepRun

    plan = plan_sweep(load_config("dfl_smoke.yaml", ["engine=local", f"output_dir={tmp_path}", "sweep.seed=[0,1]"]))
    run = SweepRun(plan, tmp_path / plan.folder_name, Interrupts())
    cell = plan.cells[1]
    partial = run.cells_dir / f".{cell.name}.partial"
    partial.mkdir(parents=True)
    assert run.resume_folder(cell) == partial and run.resume_folder(plan.cells[0]) is None


def test_a_cell_task_never_blocks_its_main_thread_on_ray(monkeypatch) -> None:
    """A blocking ray.get on a task's main thread lends its CPUs back to Ray, which then starts another
    cell in them: the task asks whether to stop from another thread."""
    import threading

    import simulations.sweep_ray as sweep_ray

    asked_from = []

    def fake_get(ref):
        asked_from.append(threading.current_thread() is threading.main_thread())
        return ref

    class Method:
        def __init__(self, value):
            self.value = value

        def remote(self, *args):
            return self.value

    class StoppedControl:
        stopping = Method(signal.SIGTERM)
        start = Method(None)

    monkeypatch.setattr(sweep_ray.ray, "get", fake_get)
    assert sweep_ray.run_cell_task({"index": 0, "name": "000", "config": None, "resume": None},
                                   StoppedControl()) == {"started": False}
    assert asked_from == [False]
