"""Tests of the decentralized mode: the per-node logic and the router against formulas on hand-made
vectors, and a small end-to-end run on Ray through the CLI (run twice: same seed, same numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import pytest
import torch

from fedepic.attacks.model_attacks import alie_z, column_std
from fedepic.config import load_config
from fedepic.topology import build_topology, metropolis_hastings_weights, mixing_matrix
from fedepic.peer_node import (
    NodeState, aggregate_models, aggregate_vectors, derive_seed, round_lr,
)
from fedepic.peer_routing import (
    AttackTally, detection_truth, honest_reference, inbox, label_roles, message_batches, outgoing, poisoned_models,
    round_metrics, routing_for,
)
from strategies.gradient_purification import PurificationState


def _cfg(*overrides: str):
    return load_config("dfl_smoke.yaml", list(overrides))


def _weights(routing, i):
    ids = routing.neighbours(i)
    w = routing.weights[i]
    return ids, torch.tensor([w[i], *(w[j] for j in ids)])


# ----------------------------------------------------------------------------------- node logic


def test_gossip_on_ring_is_the_mixing_matrix_times_the_models():
    cfg = _cfg()
    graph = build_topology("ring", 5, seed=0)
    routing = routing_for("gossip", graph, [])
    models = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    out = []
    for i in range(5):
        ids, w = _weights(routing, i)
        new, report = aggregate_vectors("gossip", cfg, models[i], models[ids], ids, w, NodeState("m"))
        assert report.kept == ids
        out.append(new)
    expected = (mixing_matrix(graph) @ models.double()).float()
    assert torch.allclose(torch.stack(out), expected, atol=1e-6)
    # ring MH weights: 1/3 everywhere
    assert torch.allclose(mixing_matrix(graph)[0, [0, 1, 4]], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_malicious_nodes_gossip_whatever_the_strategy():
    cfg = _cfg()
    own, neigh = torch.zeros(3), torch.tensor([[3.0, 0, 0], [0, 3.0, 0]])
    w = torch.tensor([0.5, 0.25, 0.25])
    new, _ = aggregate_vectors("median", cfg, own, neigh, [1, 2], w, NodeState("m"), malicious=True)
    assert torch.allclose(new, torch.tensor([0.75, 0.75, 0.0]))
    new, _ = aggregate_vectors("median", cfg, own, neigh, [1, 2], w, NodeState("m"))
    assert torch.allclose(new, torch.tensor([0.0, 0.0, 0.0]))  # median of {0, 3, 0} per coordinate


def _gp_rounds(strategy: str):
    """Node 0 with neighbours 1..4: neighbour 4 is ordinary in rounds 1-2, then far away in rounds 3-4
    (patience 2: suspicious in 3, confirmed in 4). Returns (state, own before round 4, round-4 inputs)."""
    cfg = _cfg("defense.purification.patience=2", "defense.purification.votes=4",
               "defense.purification.reject_score=null")  # the +25 neighbour is blatant: test rule 5 alone
    gen = torch.Generator().manual_seed(0)
    ids = [1, 2, 3, 4]
    w = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    state = NodeState("m")
    own = torch.zeros(50)
    for round_ in range(1, 5):
        neigh = own + 0.1 * torch.randn(4, 50, generator=gen)
        if round_ >= 3:
            neigh[3] = own + 25.0
        if round_ == 4:
            return cfg, state, own.clone(), neigh, ids, w
        own, report = aggregate_vectors(strategy, cfg, own, neigh, ids, w, state)
        if round_ < 3:
            assert report.flagged == []
        else:
            assert report.flagged == [4] and report.purified == []
            # GP still aggregates (and records) a suspect; exclude rejects it for the round
            assert report.kept == ([1, 2, 3] if strategy == "exclude" else ids)
    raise AssertionError("unreachable")


def test_gp_removes_exactly_the_recorded_contribution_of_a_confirmed_neighbour():
    cfg, state, own, neigh, ids, w = _gp_rounds("gp")
    record = state.gp.records[4].clone()
    assert record.abs().sum() > 0  # rounds 1-2 contributed: 0.2 * (x_4 - own) each
    new, report = aggregate_vectors("gp", cfg, own, neigh, ids, w, state)
    assert report.purified == [4] and report.confirmed == [4] and 4 not in state.gp.records
    # mixed over 1-3 (4's weight stays with the node), then the record subtracted before the next send
    expected = own + sum(w[k + 1] * (neigh[k] - own) for k in range(3)) - record
    assert torch.allclose(new, expected, atol=1e-6)
    # from now on 4 is out: a later round ignores whatever it sends
    later, report = aggregate_vectors("gp", cfg, new, torch.cat([new.expand(3, -1), (new + 1e3)[None]]), ids, w,
                                      state)
    assert torch.allclose(later, new) and report.kept == [1, 2, 3]


def test_exclude_drops_a_confirmed_neighbour_but_keeps_its_past_contribution():
    cfg, state, own, neigh, ids, w = _gp_rounds("exclude")
    assert state.gp.records == {}  # exclude needs no records
    new, report = aggregate_vectors("exclude", cfg, own, neigh, ids, w, state)
    assert report.purified == [4] and report.confirmed == [4]
    expected = own + sum(w[k + 1] * (neigh[k] - own) for k in range(3))  # 4's weight stays with the node
    assert torch.allclose(new, expected, atol=1e-6)  # nothing subtracted: the past contribution stays
    assert state.gp.records == {} and state.gp.confirmed == {4}


def test_aggregate_models_works_on_state_dicts_and_keeps_int_buffers():
    cfg = _cfg()
    sd = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}
    other = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([1.5]), "n": torch.tensor(9)}
    state = NodeState("m", trained=sd)
    aggregate_models("gossip", cfg, state, {7: other}, {7: 0.25}, 0.75)
    assert torch.allclose(state.model["w"], torch.tensor([[1.5, 2.5]]))
    assert torch.allclose(state.model["b"], torch.tensor([0.75]))
    assert int(state.model["n"]) == 3 and state.trained is None
    with pytest.raises(ValueError, match="before train"):
        aggregate_models("gossip", cfg, state, {7: other}, {7: 0.25}, 0.75)


def test_node_state_round_trip():
    gp = PurificationState(records={3: torch.ones(4)}, history={3: [True, False], 5: [False]}, confirmed={3},
                           rounds=2)
    state = NodeState("gp", round=2, model={"w": torch.arange(4.0)}, gp=gp,
                      epic_keep=torch.tensor([True, False, True]), epic_selections=1)
    arrays, config = state.to_plain()
    back = NodeState.from_plain(arrays, config)
    assert back.member == "gp" and back.round == 2 and back.epic_selections == 1
    assert torch.equal(back.model["w"], torch.arange(4.0)) and back.trained is None
    assert torch.equal(back.epic_keep, torch.tensor([True, False, True]))
    assert back.gp.confirmed == {3} and back.gp.history == {3: [True, False], 5: [False]}
    assert torch.equal(back.gp.records[3], torch.ones(4)) and back.gp.rounds == 2


def test_round_lr_and_seeds():
    cfg = _cfg("train.lr=0.1", "train.milestones=[2,4]", "train.gamma=0.5")
    assert [round_lr(cfg, r) for r in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


# ----------------------------------------------------------------------------------- router logic


def test_upper_cuts_the_malicious_nodes_off_and_recomputes_weights():
    graph = build_topology("ring", 6, seed=0)
    routing = routing_for("upper", graph, [0])
    assert sorted(routing.graph.edges) == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert routing.weights[1] == pytest.approx({2: 1 / 3, 1: 2 / 3})
    assert routing.weights[0] == {0: 1.0}
    assert routing_for("gp", graph, [0]).graph.number_of_edges() == 6


def test_model_attacks_at_the_router():
    graph = build_topology("ring", 5, seed=0)  # 0 is malicious, neighbours 1 and 4
    gen = torch.Generator().manual_seed(3)
    trained = {i: torch.randn(6, generator=gen) for i in range(5)}
    cfg = _cfg("attack.data=none", "attack.model=sign_flip")
    sent = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    assert sorted(sent) == [1, 4] and torch.equal(sent[1], -trained[0]) and sent[1] is sent[4]
    with pytest.raises(TypeError, match="weights"):  # no silent Metropolis fallback: the caller's mixing
        poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1)
    with pytest.raises(TypeError, match="weights"):
        outgoing(cfg.attack, trained, graph, [0], seed=0, round_=1)

    # ALIE against the union of the receivers' honest neighbourhoods: {1, 2} and {4, 3}
    assert honest_reference(graph, [0], [1, 4]) == [1, 2, 3, 4]
    cfg = _cfg("attack.data=none", "attack.model=alie")
    sent = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    honest = torch.stack([trained[j] for j in (1, 2, 3, 4)])
    expected = honest.mean(0) - alie_z(5, 1) * column_std(honest)
    assert torch.allclose(sent[1], expected) and torch.allclose(sent[4], expected)

    # per neighbour: crafted against that receiver's own neighbourhood only
    cfg = _cfg("attack.data=none", "attack.model=alie", "attack.per_neighbour=true")
    sent = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    honest = torch.stack([trained[j] for j in (1, 2)])
    assert torch.allclose(sent[1], honest.mean(0) - alie_z(5, 1) * column_std(honest))
    assert not torch.allclose(sent[1], sent[4])

    cfg = _cfg("attack.data=none", "attack.model=gaussian", "attack.per_neighbour=true")
    a = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    b = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    assert not torch.equal(a[1], a[4]) and torch.equal(a[1], b[1])  # fresh draw per receiver, reproducible

    # colluders receive each other's honest models; benign senders send their trained model
    cfg = _cfg("attack.data=none", "attack.model=sign_flip")
    everything = outgoing(cfg.attack, trained, graph, [0, 1], seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    assert everything[0][1] is trained[0] and torch.equal(everything[0][4], -trained[0])
    got = inbox(everything, 2)  # node 1 is malicious too: it attacks its benign neighbour 2
    assert sorted(got) == [1, 3] and torch.equal(got[1], -trained[1]) and got[3] is trained[3]

    # a NaN honest model is left out of ALIE's statistics and counted in the round's tally
    cfg = _cfg("attack.data=none", "attack.model=alie")
    spoilt = {**trained, 2: torch.full((6,), float("nan"))}
    tally = AttackTally()
    sent = outgoing(cfg.attack, spoilt, graph, [0], seed=0, round_=1, tally=tally, weights=metropolis_hastings_weights(graph))
    honest = torch.stack([trained[j] for j in (1, 3, 4)])
    assert torch.allclose(sent[0][1], honest.mean(0) - alie_z(5, 1) * column_std(honest)) and tally.nonfinite_inputs == 1


def test_message_batches_cap_the_payload():
    assert message_batches([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert message_batches([1, 1, 1], 100) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        message_batches([1], 0)


def test_label_roles_and_round_metrics():
    hist = [[5, 5, 0, 0], [0, 0, 5, 5], [5, 5, 0, 0]]  # node 1 (malicious) alone holds labels 2 and 3
    roles = label_roles(hist, [1], torch.tensor([0, 1, 3, 2]))  # attack flips 2 <-> 3
    assert roles == {"benign": [0, 1], "malicious_only": [2, 3], "exclusive": [], "clean": [0, 1]}
    hist_flipped = [[5, 5, 5, 0], [0, 0, 5, 5], [5, 5, 0, 0]]  # a benign node holds the flipped label 2
    assert label_roles(hist_flipped, [1], torch.tensor([0, 1, 3, 2]))["clean"] == [0, 1]
    roles = label_roles(hist, [1], None)
    assert roles["exclusive"] == [2, 3]

    graph = nx.path_graph(3)
    truth = detection_truth(graph, [1])
    assert truth == {(0, 1), (2, 1)}
    evals = {0: {"accuracy": 0.5, "per_class": [1.0, 0.0, 0.5, 0.0], "attack_success": 0.25},
             2: {"accuracy": 0.75, "per_class": [1.0, 1.0, 0.0, float("nan")]}}
    models = {0: torch.zeros(2), 2: torch.tensor([2.0, 0.0])}
    record = round_metrics(evals, models, [0, 2], roles, {0: [1], 2: []}, truth)
    assert record["mean_accuracy"] == pytest.approx(0.625) and record["worst_accuracy"] == 0.5
    assert record["per_class"][:3] == pytest.approx([1.0, 0.5, 0.25]) and record["per_class"][3] == 0.0
    assert record["exclusive_accuracy"] == pytest.approx(0.125)
    assert record["benign_label_accuracy"] == pytest.approx(0.75)
    assert record["clean_accuracy"] == pytest.approx(0.75)  # labels 0, 1: benign, untouched by the flip
    assert record["consensus_distance"] == pytest.approx(1.0)  # both at distance 1 from the mean
    assert record["attack_success"] == 0.25
    assert record["detection_precision"] == 1.0 and record["detection_recall"] == 0.5


def test_run_label_roles_consult_the_flip_map_only_under_label_flipping():
    """One helper for the Ray run and the in-process loop: a configured flip map marks labels as
    poisoned only when attack.data=label_flip."""
    from fedepic.peer_routing import run_label_roles

    hist = [[5, 5, 0, 0], [0, 0, 5, 5]]  # node 1, the malicious one here, alone holds labels 2 and 3
    flipping = _cfg("attack.flip_map=[[2,3],[3,2]]", "clients.malicious_ids=[1]")
    assert run_label_roles(flipping, hist, 4)["exclusive"] == []
    model_attack = _cfg("attack.flip_map=[[2,3],[3,2]]", "attack.data=none", "attack.model=sign_flip",
                        "clients.malicious_ids=[1]")
    assert run_label_roles(model_attack, hist, 4)["exclusive"] == [2, 3]


def test_figures_name_the_classes_by_their_role():
    """configs/noniid.yaml: 7 and 8 only reach benign nodes through the malicious ones; 6 and 9 are held
    by malicious nodes only (and flipped); the per-class heatmaps say so on their class axis."""
    from simulations.decentralized import class_labels

    roles = {"benign": [0, 1, 2, 3, 4, 5], "malicious_only": [6, 7, 8, 9], "exclusive": [7, 8],
             "clean": [0, 1, 2, 3, 4, 5]}
    assert class_labels(roles, 10) == ["0", "1", "2", "3", "4", "5", "6 (malicious only)", "7 (exclusive)",
                                       "8 (exclusive)", "9 (malicious only)"]
    assert class_labels({"benign": [0, 1], "clean": [1]}, 2) == ["0 (attacked)", "1"]


def test_bad_graph_or_detector_settings_stop_before_ray_starts(tmp_path, capsys):
    from fedepic.simulate import main

    base = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false"]
    assert main(base + ["topology.name=edges", "topology.edges=[[0,1],[2,3]]"]) == 2
    assert "topology.name" in capsys.readouterr().err
    assert main(base + ["defense.purification.window=2", "defense.purification.votes=3"]) == 2
    assert "defense.purification" in capsys.readouterr().err
    assert main(base + ["defense.purification.reject_score=2"]) == 2  # not above the threshold (3)
    assert "defense.purification.reject_score" in capsys.readouterr().err
    assert main(base + ["defense.purification.clip_tau=-1"]) == 2
    assert "defense.purification.clip_tau" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run folder was started


# ----------------------------------------------------------------------------------- end to end on Ray


def _numbers(run: Path) -> dict[str, list[dict]]:
    out = {}
    for member in ("gossip", "gp", "upper"):
        rows = [json.loads(line) for line in (run / member / "metrics.jsonl").read_text().splitlines()]
        out[member] = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # timings differ
    return out


@pytest.mark.slow
def test_small_ring_through_the_cli_twice_gives_the_same_numbers(tmp_path, capsys):
    from fedepic.simulate import main

    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false", "strategies=[gossip,gp,upper]"]
    assert main(args) == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1])
    names = {p.name for p in first.iterdir()}
    assert {"config.yaml", "summary.json", "comparison.md", "comparison.csv", "comparison.png", "partition.json",
            "topology.json", "gossip", "gp", "upper"} <= names
    assert {"report.html", "per_class.png", "per_class_rounds.png", "comparison.pdf"} <= names
    for member in ("gossip", "gp", "upper"):
        assert {"metrics.jsonl", "summary.json", "curves.png", "curves.pdf"} <= {p.name for p in (first / member).iterdir()}
    summary = json.loads((first / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["members"]) == {"gossip", "gp", "upper"}
    table = (first / "comparison.md").read_text()
    assert "| gossip |" in table and "| gp |" in table and "| upper |" in table
    numbers = _numbers(first)
    for rows in numbers.values():
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert 0.0 <= r["worst_accuracy"] <= r["mean_accuracy"] <= 1.0
            assert len(r["per_class"]) == 10 and math.isfinite(r["consensus_distance"])
    assert "detection_recall" in numbers["gp"][0] and "detection_recall" not in numbers["gossip"][0]

    # the Flower plumbing (Context.state across messages, routing) changes nothing: the plain loop agrees
    from fedepic.peer_local import run_sequential

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers (one CPU each), so float sums match
    try:
        for member in ("gossip", "gp"):
            expected = run_sequential(load_config("dfl_smoke.yaml", [f"output_dir={tmp_path}"]), member,
                                      node_by_node=True)
            for got, want in zip(numbers[member], expected):
                assert got["mean_accuracy"] == pytest.approx(want["mean_accuracy"], abs=1e-6)
                assert got["per_class"] == pytest.approx(want["per_class"], abs=1e-6)
                assert got["consensus_distance"] == pytest.approx(want["consensus_distance"], rel=1e-4)
                assert got.get("detection_recall") == want.get("detection_recall")
    finally:
        torch.set_num_threads(threads)

    assert main(args) == 0
    second = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert second != first
    assert _numbers(second) == numbers
