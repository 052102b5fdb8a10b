"""Non-finite (NaN / inf) input vectors: every peer rule, GP, EPIC on updates, the server strategies and
the model attacks leave them out, return a finite result and record how many they left out."""

from __future__ import annotations

import math

import pytest
import torch

from gp_factory import make_gp

from strategies.epic_updates import epic_select_updates
from strategies.aggregate import Aggregate, aggregate
from strategies.gradient_purification import PurificationState
from fedepic.extensions import PEER_RULES


def fl_cfg(clients: int, f: int):
    """A federated config with `clients` clients whose robust rules assume (and trim) f attackers."""
    from fedepic.config import load_config

    return load_config(None, ["mode=federated", f"clients.count={clients}", f"defense.byzantine={f}",
                              f"defense.trim={f}"])



BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def neighbourhood(m: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    own = torch.randn(d, generator=gen)
    return own, own + 0.1 * torch.randn(m, d, generator=gen)


def spoil(rows: torch.Tensor, which: dict[int, str]) -> torch.Tensor:
    """A copy of `rows` with one coordinate of row r set to NaN / inf per entry {r: kind}."""
    out = rows.clone()
    for r, kind in which.items():
        out[r, r % out.shape[1]] = BAD[kind]
    return out


STATELESS = [
    ("gossip", {}), ("median", {}), ("trimmed_mean", {"b": 1}), ("trimmed_mean", {"b": 3}), ("krum", {"f": 1}),
    ("krum", {"f": 1, "multi": 3}), ("scclip", {"tau": 0.05}), ("scclip", {"tau": None, "delta": 0.3}),
    ("epic", {"fraction": 0.4, "threshold": 1}), ("upper", {}),
]


def build_peer_rule(name, **params):
    """The registered rule's class with explicit parameters (the config binding is tested elsewhere)."""
    return PEER_RULES.get(name).load()(**params)


def peer(rule, own, neighbours, weights=None):
    """``rule`` over the stack [own; neighbours] (own at row 0) through ``strategies.aggregate.aggregate``."""
    return aggregate(rule, torch.cat([own[None], neighbours]), 0, weights)


def report_of(out):
    """(the neighbour rows left out, whether own was non-finite): what the old ``NonFinite`` record held."""
    return out.nonfinite[1:].nonzero().flatten().tolist(), bool(out.nonfinite[0])


@pytest.mark.parametrize("name, params", STATELESS)
@pytest.mark.parametrize("kinds", [{1: "nan"}, {4: "inf"}, {1: "nan", 4: "inf"}, {0: "-inf", 2: "nan", 5: "inf"}])
def test_peer_rules_leave_out_nonfinite_neighbours(name, params, kinds):
    own, neigh = neighbourhood()
    w = torch.full((7,), 1 / 7)
    rule = build_peer_rule(name, **params)
    result = peer(rule, own, spoil(neigh, kinds), w)
    out = result.vector
    assert torch.isfinite(out).all()
    assert report_of(result) == (sorted(kinds), False) and result.nonfinite_count == len(kinds)
    assert not result.own_replaced and not result.kept[[r + 1 for r in kinds]].any()
    # the same result as running the rule on the finite rows alone, weights renormalised
    keep = [r for r in range(6) if r not in kinds]
    w_kept = torch.cat([w[:1], w[1:][keep]])
    if name not in ("trimmed_mean",) or 2 * params["b"] < len(keep) + 1:
        assert torch.allclose(out, peer(rule, own, neigh[keep], w_kept / w_kept.sum()).vector, atol=1e-6)


@pytest.mark.parametrize("name, params", STATELESS)
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_peer_rules_replace_a_nonfinite_own_model(name, params, kind):
    own, neigh = neighbourhood(seed=1)
    bad_own = own.clone()
    bad_own[3] = BAD[kind]
    result = peer(build_peer_rule(name, **params), bad_own, spoil(neigh, {2: "nan"}), None)
    assert torch.isfinite(result.vector).all()
    assert report_of(result) == ([2], True) and result.nonfinite_count == 2 and result.own_replaced


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_finite_rows_is_the_elementwise_test(dtype):
    """The row-sum shortcut of fedepic.vectors.finite_rows equals isfinite(...).all(dim=1): a finite row
    whose sum overflows is finite, inf - inf (a NaN sum) is not, and an empty stack has no rows."""
    from fedepic.vectors import all_finite, finite_rows

    big = torch.finfo(dtype).max
    stack = torch.tensor([[big, big, 1.0], [math.inf, -math.inf, 0.0], [math.nan, 0.0, 0.0], [1.0, 2.0, 3.0],
                          [-big, -big, 0.0], [0.0, -math.inf, 0.0]], dtype=dtype)
    assert finite_rows(stack).tolist() == torch.isfinite(stack).all(dim=1).tolist() == [True, False, False, True,
                                                                                         True, False]
    assert [all_finite(row) for row in stack] == [True, False, False, True, True, False]
    assert finite_rows(torch.zeros(0, 5, dtype=dtype)).tolist() == []


def test_peer_policy_example():
    """The former split_finite example through aggregate(): what the rule sees, and the report."""
    own = torch.zeros(2)
    neigh = torch.tensor([[1.0, 0.0], [math.nan, 0.0], [math.inf, 1.0]])
    seen = {}

    def spy(stack, own_index, weights, state):
        seen.update(stack=stack.clone(), own_index=own_index, weights=weights)
        return Aggregate(stack[own_index].clone(), torch.ones(len(stack), dtype=torch.bool))

    out = peer(spy, own, neigh, torch.tensor([0.4, 0.2, 0.2, 0.2]))
    assert torch.equal(seen["stack"], torch.cat([own[None], neigh[:1]])) and seen["own_index"] == 0
    assert torch.allclose(seen["weights"], torch.tensor([2 / 3, 1 / 3]))
    assert report_of(out) == ([1, 2], False) and out.kept.tolist() == [True, True, False, False]
    lost = peer(spy, torch.full((2,), math.nan), neigh[1:], None)  # nothing finite: own unchanged
    assert lost.nonfinite_count == 3 and torch.isnan(lost.vector).all() and not lost.kept.any()


def test_scclip_delta_radius_ignores_nonfinite_neighbours():
    """Before: a NaN distance made the quantile radius NaN and `norms > nan` is False, so no one was clipped."""
    own = torch.tensor([0.0])
    neigh = torch.tensor([[1.0], [2.0], [3.0], [100.0], [math.nan]])
    result = peer(build_peer_rule("scclip", tau=None, delta=0.25), own, neigh, None)
    assert torch.allclose(result.vector, torch.tensor([(1 + 2 + 3 + 27.25) / 5]))  # as without the NaN row
    assert report_of(result)[0] == [4]


@pytest.mark.parametrize("detector", ["robust", "epic"])
@pytest.mark.parametrize("reject_score", [30.0, None])
def test_gp_flags_and_never_aggregates_nonfinite_neighbours(detector, reject_score):
    own, neigh = neighbourhood(m=5, seed=2)
    ids = [10, 11, 12, 13, 14]
    rule = make_gp(patience=2, detector=detector, epic_fraction=0.4, reject_score=reject_score)
    state = PurificationState()
    spoilt = spoil(neigh, {1: "nan", 3: "inf"})
    new, report = rule.aggregate(own, spoilt, ids, None, state)
    assert torch.isfinite(new).all()
    assert report.nonfinite == [11, 13] and not report.own_nonfinite
    assert {11, 13} <= set(report.flagged) and not {11, 13} & set(report.kept)
    assert report.scores[11] == math.inf
    assert all(torch.isfinite(r).all() for r in state.records.values()) and 11 not in state.records
    new, report = rule.aggregate(new, spoilt, ids, None, state)  # second suspicious round: confirmed
    assert torch.isfinite(new).all() and {11, 13} <= set(report.confirmed)


def test_gp_replaces_a_nonfinite_own_model():
    own, neigh = neighbourhood(m=4, seed=3)
    own[0] = math.nan
    new, report = make_gp().aggregate(own, spoil(neigh, {2: "inf"}), [1, 2, 3, 4], None,
                                                   PurificationState())
    assert torch.isfinite(new).all() and report.own_nonfinite and report.nonfinite == [3]


@pytest.mark.parametrize("kinds", [{2: "nan"}, {5: "inf"}, {0: "nan", 5: "-inf"}])
def test_epic_on_updates_drops_nonfinite_updates(kinds):
    gen = torch.Generator().manual_seed(4)
    updates = spoil(torch.ones(8, 6) + 0.05 * torch.randn(8, 6, generator=gen), kinds)
    sel = epic_select_updates(updates, fraction=0.3)
    assert sel.nonfinite == tuple(sorted(kinds))
    assert not sel.keep[list(kinds)].any()
    finite = [r for r in range(8) if r not in kinds]
    assert torch.equal(sel.keep[finite], epic_select_updates(updates[finite], fraction=0.3).keep)
    assert set(sel.dropped) >= set(kinds)
    assert all(int(r) not in kinds for r in sel.medoids)


def test_dfl_node_reports_nonfinite_neighbours_by_id():
    from fedepic.config import load_config
    from fedepic.peer_node import NodeState, aggregate_vectors

    cfg = load_config("dfl_smoke.yaml", [])
    own, neigh = neighbourhood(m=4, seed=5)
    spoilt = spoil(neigh, {0: "nan", 2: "inf"})
    for strategy in ("gossip", "median", "trimmed_mean", "krum", "scclip", "epic", "gp", "exclude"):
        new, report = aggregate_vectors(strategy, cfg, own, spoilt, [7, 8, 9, 10], None, NodeState("m"))
        assert torch.isfinite(new).all(), strategy
        assert report.nonfinite == [7, 9] and not report.own_nonfinite, strategy
        assert not {7, 9} & set(report.kept), strategy


def test_dfl_krum_with_a_single_neighbour():
    from fedepic.config import load_config
    from fedepic.peer_node import NodeState, aggregate_vectors

    cfg = load_config("dfl_smoke.yaml", ["defense.trim=2"])
    own, neigh = neighbourhood(m=1, seed=6)
    new, report = aggregate_vectors("krum", cfg, own, neigh, [3], None, NodeState("m"))
    assert torch.equal(new, own) and report.kept == [3]


# --------------------------------------------------------------------------- server strategies


def honest_updates(m: int, d: int = 400, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen) + 0.05 * torch.randn(m, d, generator=gen)


def reply(vector, client_id: int, examples: int = 10):
    """A train reply Message as a ClientApp builds it (two arrays, the metrics the strategies read)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.from_numpy(vector[:300].reshape(3, 100).copy()),
                               "b": torch.from_numpy(vector[300:].copy())}),
        "metrics": MetricRecord({"num-examples": examples, "partition-id": client_id}),
    })
    return Message(content=content, dst_node_id=client_id + 100, message_type="train")


@pytest.mark.parametrize("name", ["fedavg", "krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg", "epic"])
@pytest.mark.parametrize("kinds", [{2: "nan"}, {6: "inf"}, {2: "nan", 6: "inf"}])
def test_server_strategies_leave_out_nonfinite_replies(task_identity, name, kinds):
    import numpy as np

    from strategies.epic_server import record_vector
    from strategies.server import build_server_strategy

    n = 12
    updates = spoil(honest_updates(n, d=400, seed=9), kinds).numpy().astype(np.float32)
    replies = [reply(updates[i], client_id=i) for i in range(n)]
    tracked = build_server_strategy(name, fl_cfg(n, 1))
    outcome = tracked.aggregate(1, replies, torch.from_numpy(updates.copy()))
    assert outcome.arrays is not None, name
    assert np.isfinite(record_vector(outcome.arrays).numpy()).all(), name
    assert outcome.nonfinite == [i in kinds for i in range(n)] and outcome.nonfinite_count == len(kinds)
    assert all(outcome.excluded[i] for i in kinds)
    if outcome.trimmed_share is not None:
        assert all(outcome.trimmed_share[i] == 1.0 for i in kinds)
    if name == "fedavg":  # the plain mean of the finite replies
        finite = [i for i in range(n) if i not in kinds]
        np.testing.assert_allclose(record_vector(outcome.arrays).numpy(), updates[finite].mean(axis=0), rtol=1e-5)


def test_server_round_with_only_nonfinite_replies_is_skipped(task_identity):
    import numpy as np

    from strategies.server import build_server_strategy

    updates = np.full((3, 400), np.nan, dtype=np.float32)
    tracked = build_server_strategy("fedavg", fl_cfg(3, 0))
    outcome = tracked.aggregate(1, [reply(u, client_id=i) for i, u in enumerate(updates)], torch.from_numpy(updates))
    assert outcome.arrays is None and outcome.excluded == [True] * 3 and outcome.nonfinite_count == 3


def test_epic_server_alone_drops_nonfinite_updates(task_identity):
    import numpy as np

    from strategies.epic_server import EpicServer, record_vector

    updates = spoil(honest_updates(9, d=400, seed=10), {4: "nan"}).numpy().astype(np.float32)
    strategy = EpicServer(fraction=0.1, threshold=1, min_medoids=2, num_malicious_nodes=0)
    arrays, _ = strategy.aggregate_train(1, [reply(u, client_id=i) for i, u in enumerate(updates)])
    assert np.isfinite(record_vector(arrays).numpy()).all() and 4 in strategy.dropped_history[1]


# --------------------------------------------------------------------------- model attacks

ATTACKS = [("none", {}), ("sign_flip", {}), ("gaussian", {"sigma": 0.5}), ("scaling", {"factor": 10.0}),
           ("alie", {"f": 1, "n": None, "z": None}), ("ipm", {"epsilon": 0.1}), ("minmax", {}),
           ("minmax", {"perturbation": "unit_vec"}), ("minmax", {"perturbation": "sign"})]


@pytest.mark.parametrize("name, params", ATTACKS)
@pytest.mark.parametrize("kinds", [{1: "nan"}, {3: "inf"}, {1: "nan", 3: "inf"}])
def test_model_attacks_leave_out_nonfinite_honest_rows(name, params, kinds):
    from fedepic.attacks.model_attacks import run_model_attack

    _, honest = neighbourhood(m=6, seed=11)
    own = honest[0] + 0.01
    spoilt = spoil(honest, kinds)
    out = run_model_attack(name, spoilt, own, torch.Generator().manual_seed(0), **params)
    assert torch.isfinite(out.update).all() and out.nonfinite == len(kinds)
    finite = [r for r in range(6) if r not in kinds]
    clean = run_model_attack(name, honest[finite], own, torch.Generator().manual_seed(0), **params)
    assert torch.allclose(out.update, clean.update) and clean.nonfinite == 0


@pytest.mark.parametrize("name, params", ATTACKS)
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_model_attacks_replace_a_nonfinite_own_update(name, params, kind):
    from fedepic.attacks.model_attacks import apply_model_attack, run_model_attack

    _, honest = neighbourhood(m=5, seed=12)
    own = honest[0].clone()
    own[2] = BAD[kind]
    out = run_model_attack(name, spoil(honest, {4: "nan"}), own, torch.Generator().manual_seed(0), **params)
    assert torch.isfinite(out.update).all() and out.nonfinite == 2
    assert torch.equal(apply_model_attack(name, spoil(honest, {4: "nan"}), own, torch.Generator().manual_seed(0),
                                          **params), out.update)


def test_minmax_was_nan_with_one_nonfinite_honest_row_and_falls_back_when_too_few_remain():
    from fedepic.attacks.model_attacks import minmax, run_model_attack

    _, honest = neighbourhood(m=4, seed=13)
    assert torch.isfinite(minmax(spoil(honest, {2: "inf"}), honest[0])).all()
    two_bad = spoil(honest[:3], {0: "nan", 1: "inf"})  # one finite row left: std needs two
    out = run_model_attack("minmax", two_bad, honest[2])
    assert torch.equal(out.update, honest[2]) and out.nonfinite == 2
    with pytest.raises(ValueError, match="at least 2"):  # too few rows to begin with is still an error
        minmax(honest[:1], honest[0])


@pytest.mark.parametrize("name", ["fedtrimmedavg", "krum"])
def test_tracked_strategy_takes_its_nonfinite_policy_from_aggregate(task_identity, monkeypatch, name):
    """One place for the non-finite policy: TrackedStrategy runs its rule through
    strategies.aggregate.aggregate (called once, on all the rows) and its outcome is that report's
    server notes, which engine=local records too. Hand-made rows, each constant: 0, 1, 2, 3, 10 and a
    NaN one. The trimmed mean (f = 1) of the 5 finite rows cuts row 0 and row 4 everywhere: mean 2,
    shares [1, 0, 0, 0, 1] and 1.0 for the NaN row, nobody excluded whole but the NaN row. Krum
    (f = 1) keeps one middle row and excludes the others."""
    import numpy as np

    import strategies.server as server
    from strategies.epic_server import record_vector

    values = [0.0, 1.0, 2.0, 3.0, 10.0, float("nan")]
    updates = np.array([[v] * 400 for v in values], dtype=np.float32)
    calls = []
    real = server.aggregate

    def counted(rule, stack, own_index=None, weights=None, state=None):
        out = real(rule, stack, own_index, weights, state)
        calls.append(out)
        return out

    monkeypatch.setattr(server, "aggregate", counted)
    tracked = server.build_server_strategy(name, fl_cfg(6, 1))
    outcome = tracked.aggregate(1, [reply(u, client_id=i) for i, u in enumerate(updates)], torch.from_numpy(updates))
    assert len(calls) == 1 and calls[0].nonfinite.tolist() == [False] * 5 + [True]
    assert (outcome.excluded, outcome.trimmed_share) == calls[0].server_notes()
    assert outcome.nonfinite == [False] * 5 + [True]
    vector = record_vector(outcome.arrays)
    if name == "fedtrimmedavg":
        assert torch.equal(vector, torch.full((400,), 2.0))
        assert outcome.excluded == [False] * 5 + [True]
        assert outcome.trimmed_share == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    else:  # Krum's scores (n - f - 2 = 2 nearest): rows 1 and 2 tie lowest at 400 * (1 + 1); row 1 first
        assert torch.equal(vector, torch.full((400,), 1.0))
        assert outcome.excluded == [True, False, True, True, True, True] and outcome.trimmed_share is None
