"""The published figures of the replayed experiments: their derivation (benchmarks/published_figures.py)
on hand-made CSV rows, the stored copy (fedepic/reproduce/published.json) against the issue's quoted
figures and against itself, and the tolerance rule."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

from fedepic.errors import ConfigError
from fedepic.reproduce import published

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("published_figures", REPO / "benchmarks" / "published_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in r) for r in rows]) + "\n")
    return path


def _bucketing_rows(special: dict) -> list[list]:
    """Every cell of the exp3 grid at Iterations 600 (values 50 + a cell index), with decoys the
    derivation must ignore (Iterations 570, beta 0.0, s 2) set to 0; ``special`` replaces a cell's
    per-seed values."""
    script = _script()
    rows = []
    index = 0
    for _, agg in script.BUCKETING_AGGREGATORS:
        for _, atk in script.BUCKETING_ATTACKS:
            values = special.get((agg, atk), [50.0 + index] * 3)
            for seed, value in enumerate(values):
                rows.append([600, value, atk, agg, 0.9, seed, 0])
                rows += [[570, 0.0, atk, agg, 0.9, seed, 0], [600, 0.0, atk, agg, 0.0, seed, 0],
                         [600, 0.0, atk, agg, 0.9, seed, 2]]
            index += 1
    return rows


def test_bucketing_cell_is_the_mean_over_seeds_at_600_without_bucketing(tmp_path):
    script = _script()
    header = ["Iterations", "Accuracy (%)", "ATK", "AGG", "$\\beta$", "seed", "s"]
    path = _write_csv(tmp_path / "exp3.csv", header, _bucketing_rows({("CM", "IPM"): [10.0, 20.0, 60.0],
                                                                     ("KRUM", "BF"): [9.0, 11.0]}))
    cells = {(c["aggregator"], c["attack"]): c for c in script.bucketing_cells(script.read_rows(path))}
    cm = cells[("cm", "ipm")]
    # mean 30, sample std sqrt(((-20)^2 + (-10)^2 + 30^2) / 2) = sqrt(700)
    assert cm["published"] == 30.0 and cm["std"] == pytest.approx(700 ** 0.5)
    assert (cm["min"], cm["max"], cm["seeds"], cm["per_seed"]) == (10.0, 60.0, [0, 1, 2], [10.0, 20.0, 60.0])
    krum = cells[("krum", "bit_flip")]  # a cell with two seeds, as KRUM / BF in the authors' file
    assert krum["published"] == 10.0 and krum["std"] == pytest.approx(2 ** 0.5) and krum["seeds"] == [0, 1]
    assert cells[("cclip", "alie")]["published"] == 50.0 + 19 and cells[("cclip", "alie")]["std"] == 0.0
    # lines: the header is line 1; before CM / IPM come KRUM's cells (BF 2 seeds x 4 rows, then 4 cells
    # x 12 rows) and CM's BF, LF, mimic (3 x 12 rows): its seed-0 row is data row 92, line 94
    assert cm["source"]["lines"] == [94, 98, 102]


def _dumbbell_rows() -> list[list]:
    """Every (aggregator, split, group) at Iterations 840 (decoy, 0) and 870 (value): global 90 + k,
    clique 1 60 + k, clique 2 70 + k for the k-th (split, aggregator)."""
    script = _script()
    rows, k = [], 0
    for noniid in ("False", "True"):
        for _, label, _ in script.DUMBBELL_AGGREGATORS:
            for group, base in (("global", 90), ("clique 1", 60), ("clique 2", 70)):
                rows.append([840, 0.0, label, noniid, group])
                rows.append([870, base + k * 0.5, label, noniid, group])
            k += 1
    return rows


def test_dumbbell_cell_is_the_global_row_at_870(tmp_path):
    script = _script()
    path = _write_csv(tmp_path / "acc.csv", ["Iterations", "Accuracy (%)", "Agg", "NonIID", "Group"], _dumbbell_rows())
    cells = script.dumbbell_cells(script.read_rows(path))
    assert [(c["split"], c["aggregator"]) for c in cells][:2] == [("iid", "gossip"), ("iid", "scclip")]
    tm = cells[8]  # non-IID trimmed mean: k = 8
    assert (tm["split"], tm["aggregator"], tm["authors_agg"]) == ("noniid", "trimmed_mean", "tm1")
    assert tm["published"] == 94.0 and tm["groups"] == {"clique 1": 64.0, "clique 2": 74.0}
    assert tm["seeds"] == [0] and tm["std"] is None
    # its global row is the 2nd of the 6 rows of (noniid, TM): 1 header + 8 cells x 6 rows before it
    assert tm["source"]["line"] == 1 + 8 * 6 + 2


def test_stored_dumbbell_figures_are_the_issues_quoted_ones():
    script = _script()
    stored = published._read(published.PUBLISHED)["experiments"]["dumbbell_clippedgossip"]["cells"]
    assert script.issue_disagreements(stored) == []
    values = {(c.key["split"], c.key["aggregator"]): round(c.value, 1)
              for c in published.cells("dumbbell_clippedgossip")}
    assert values[("iid", "gossip")] == 96.4 and values[("noniid", "scclip")] == 93.8
    assert values[("noniid", "mozi")] == 86.2 and len(values) == 10


def test_stored_bucketing_cells_are_consistent():
    stored = published._read(published.PUBLISHED)["experiments"]["bucketing_mnist"]["cells"]
    assert len(stored) == 20
    for cell in stored:
        assert cell["published"] == pytest.approx(statistics.fmean(cell["per_seed"]))
        if len(cell["per_seed"]) > 1:
            assert cell["std"] == pytest.approx(statistics.stdev(cell["per_seed"]))
        assert (cell["min"], cell["max"]) == (min(cell["per_seed"]), max(cell["per_seed"]))
    krum_bf = published.find("bucketing_mnist", aggregator="krum", attack="bit_flip")
    assert krum_bf.seeds == (0, 1)  # seed 2's run is absent from the raw file
    cclip = published.find("bucketing_mnist", aggregator="cclip", attack="alie")
    assert round(cclip.value, 2) == 98.19 and cclip.seeds == (0, 1, 2)


def test_tolerance_is_the_spread_plus_two_or_three_points_for_one_seed():
    cell = published.PublishedCell("x", {"aggregator": "cm"}, 50.0, (0, 1, 2), 1.5, 48.0, 52.0)
    assert cell.tolerance() == 3.5
    assert cell.reproduced(53.5) and cell.reproduced(46.5) and not cell.reproduced(53.6)
    single = published.PublishedCell("x", {"aggregator": "cm"}, 50.0, (0,), None, None, None)
    assert single.tolerance() == 3.0 and single.reproduced(47.0) and not single.reproduced(46.9)


def test_unknown_experiment_or_cell_is_a_config_error():
    with pytest.raises(ConfigError, match="'nope'"):
        published.cells("nope")
    with pytest.raises(ConfigError, match="0 cells match"):
        published.find("bucketing_mnist", aggregator="krum", attack="nope")


def test_reproduce_configs_load_with_the_authors_settings():
    from fedepic.config import load_config, sweep_section

    dumbbell = load_config(str(REPO / "configs" / "reproduce" / "dumbbell_clippedgossip.yaml"))
    # one evaluation, after step 900: the published figure's point (the authors evaluate every 30 steps; the
    # config's DEVIATES line says why fedepic scores once)
    assert (dumbbell.rounds, dumbbell.clients.count, dumbbell.train.lr, dumbbell.train.eval_every) == (900, 20, 0.01, 900)
    assert (dumbbell.train.client_momentum_form, dumbbell.decentralized.order, dumbbell.topology.mixing,
            dumbbell.train.eval_average_model) == ("heavy_ball", "adapt_then_combine", "uniform_max_degree", True)
    assert sorted(dumbbell.topology.groups) == ["clique1", "clique2"]
    assert len(dumbbell.topology.edges) == 2 * 45 + 1 and [0, 19] in dumbbell.topology.edges
    assert sweep_section(dumbbell)[1] == {"data.partition": ["iid", "label_sets"]}
    bucketing = load_config(str(REPO / "configs" / "reproduce" / "bucketing_mnist.yaml"))
    assert (bucketing.rounds, bucketing.server.protocol, bucketing.server.lr) == (600, "per_step", 0.01)
    assert (bucketing.train.client_momentum_form, bucketing.attack.momentum) == ("heavy_ball", False)
    assert (bucketing.defense.centered_clipping.tau, bucketing.defense.geometric_median.nu) == (10.0, 0.1)
    assert bucketing.clients.malicious_ids == [20, 21, 22, 23, 24]
    assert bucketing.attack.alie_z == pytest.approx(0.2533471031357998)  # Phi^-1(0.6), the authors' z


def test_ema_momentum_at_ten_times_the_lr_takes_the_authors_heavy_ball_steps():
    """The configs' lr 0.1: the authors' m <- 0.9 m + g (m_1 = g_1) stepped at 0.01 equals fedepic's
    m' <- 0.9 m' + 0.1 g (m'_0 = 0) stepped at 0.1, since m' = 0.1 m at every step."""
    import torch

    from fedepic.peer_node import NodeState, dsgd_momentum

    gradients = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.0]])
    state, heavy = NodeState(member="x"), None
    x_authors, x_fedepic = torch.zeros(2), torch.zeros(2)
    for g in gradients:
        heavy = g.clone() if heavy is None else 0.9 * heavy + g
        dsgd_momentum(state, g, 0.9)
        x_authors, x_fedepic = x_authors - 0.01 * heavy, x_fedepic - 0.1 * state.momentum
        assert torch.allclose(state.momentum, 0.1 * heavy)
    # by hand: m = [1, -2], [3.9, -1.3], [2.51, 2.83], [4.259, 4.547]; x = -0.01 * their sum
    assert torch.allclose(x_authors, torch.tensor([-0.11669, -0.04077]), atol=1e-6)
    assert torch.allclose(x_fedepic, x_authors, atol=1e-6)
