"""EPIC on client updates (strategies/epic_server.py) and the server strategy registry (strategies/server.py):
the pure math, and the Flower wrappers on hand-made reply Messages (no running app)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedepic.extensions import SERVER_STRATEGIES
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from strategies.epic_server import EpicServer, epic_select_updates, medoid_count, record_vector
from strategies.server import (
    build_server_strategy, exact_trim_beta, mean_client_metrics,
)


def fl_cfg(clients: int, f: int):
    """A federated config with `clients` clients whose robust rules assume (and trim) f attackers."""
    from fedepic.config import load_config

    return load_config(None, ["mode=federated", f"clients.count={clients}", f"defense.byzantine={f}",
                              f"defense.trim={f}"])


def honest_updates(m: int, d: int = 500, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    return direction + 0.05 * torch.randn(m, d, generator=gen)


def reply(vector: np.ndarray, client_id: int, examples: int = 10, **metrics: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.from_numpy(vector[:300].reshape(3, 100).copy()),
                               "b": torch.from_numpy(vector[300:].copy())}),
        "metrics": MetricRecord({"num-examples": examples, "partition-id": client_id, **metrics}),
    })
    return Message(content=content, dst_node_id=client_id + 100, message_type="train")


# --------------------------------------------------------------------------- pure selection


def test_scaled_update_among_similar_ones_is_dropped():
    updates = honest_updates(9)
    updates[4] = 10 * updates[4]
    sel = epic_select_updates(updates, fraction=0.1)
    assert sel.dropped == [4]
    assert sel.keep.sum() == 8
    assert sel.sizes.sum() == 9  # every update belongs to one medoid's cluster


def test_several_attackers_are_isolated_when_their_count_is_assumed():
    updates = honest_updates(12, seed=1)
    for bad, factor in ((2, 8.0), (7, -6.0), (11, 12.0)):
        updates[bad] = factor * updates[bad]
    sel = epic_select_updates(updates, fraction=0.1, num_malicious=3)
    assert sel.dropped == [2, 7, 11]


def test_honest_updates_are_all_kept_with_the_default_budget():
    sel = epic_select_updates(honest_updates(10, seed=2), fraction=0.1)
    assert int(sel.keep.sum()) >= 9  # two medoids: at most one honest singleton


def test_selection_is_translation_invariant():
    """Models and updates give the same drops: the global model cancels in every distance."""
    updates = honest_updates(8, seed=3)
    updates[0] *= 9
    global_model = torch.randn(500) * 3
    a = epic_select_updates(updates, 0.2)
    b = epic_select_updates(updates + global_model, 0.2)
    assert torch.equal(a.keep, b.keep)


def test_fewer_than_three_updates_are_kept():
    assert epic_select_updates(honest_updates(2), 0.5).keep.all()
    assert epic_select_updates(honest_updates(1), 0.5).keep.all()


def test_medoid_count_bounds():
    assert medoid_count(20, 0.1) == 2
    assert medoid_count(20, 0.1, num_malicious=4) == 5
    assert medoid_count(10, 0.5) == 5
    assert medoid_count(3, 1.0) == 2  # at most m - 1: one cluster keeps two updates
    with pytest.raises(ValueError):
        medoid_count(0, 0.1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        epic_select_updates(torch.zeros(5), 0.1)
    with pytest.raises(ValueError):
        epic_select_updates(torch.zeros(5, 3), 0.0)
    with pytest.raises(ValueError):
        EpicServer(fraction=1.5, threshold=1, min_medoids=2, num_malicious_nodes=0)


# --------------------------------------------------------------------------- Flower wrapper


def test_epic_server_drops_the_scaled_reply_and_averages_the_rest(task_identity):
    updates = honest_updates(6, d=400, seed=4).numpy().astype(np.float32)
    updates[3] *= 10
    replies = [reply(updates[i], client_id=i, examples=10 + i) for i in range(6)]
    strategy = EpicServer(fraction=0.1, threshold=1, min_medoids=2, num_malicious_nodes=0)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.dropped_history == {1: [3]}
    kept = [i for i in range(6) if i != 3]
    weights = np.array([10 + i for i in kept], dtype=np.float64)
    expected = (updates[kept] * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(record_vector(arrays).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics is not None


def test_record_vector_follows_key_order(task_identity):
    vec = np.arange(400, dtype=np.float32)
    msg = reply(vec, 0)
    np.testing.assert_array_equal(record_vector(msg.content["arrays"]).numpy(), vec)


# --------------------------------------------------------------------------- registry


def test_every_name_builds_a_fresh_strategy():
    params = fl_cfg(20, 4)
    names = [n for n in SERVER_STRATEGIES.names() if not SERVER_STRATEGIES.has(n, "reference")]
    built = [build_server_strategy(name, params) for name in names]
    assert len({id(t.strategy) for t in built}) == len(names)
    assert built[names.index("bulyan")].strategy.num_malicious_nodes == 4  # 4*4+3 <= 20
    assert build_server_strategy("bulyan", fl_cfg(10, 4)).strategy.num_malicious_nodes == 1  # capped at (n-3)//4
    assert build_server_strategy("multikrum", params).strategy.num_nodes_to_select == 16  # n - f
    assert build_server_strategy("fedtrimmedavg", params).strategy.num_trim == 4
    assert build_server_strategy("epic", params).strategy.min_medoids == params.defense.epic.min_medoids
    with pytest.raises(ValueError, match="unknown server strategy 'nope'"):
        build_server_strategy("nope", params)
    with pytest.raises(ValueError, match="reference"):
        build_server_strategy("centralized-epic", params)


def test_byzantine_null_assumes_the_configured_attackers():
    from fedepic.config import load_config

    cfg = load_config("server_noniid.yaml", [])
    assert cfg.defense.byzantine is None and build_server_strategy("krum", cfg).strategy.num_malicious_nodes == 4
    # null is the default, as in ByzFL and the papers: f follows the configured attackers
    plain = load_config(None, ["mode=federated", "clients.count=10", "clients.malicious_ids=[0,1,2]"])
    assert plain.defense.byzantine is None and build_server_strategy("krum", plain).strategy.num_malicious_nodes == 3


def test_byzantine_null_at_a_peer_is_the_most_malicious_neighbours_of_a_benign_node():
    """A peer rule aggregates a neighbourhood: f is what a benign node can see there, not the total."""
    from fedepic.config import load_config
    from fedepic.extensions import PEER_RULES, PRE_AGGREGATION, assumed_byzantine

    def f(*overrides: str) -> int:
        return assumed_byzantine(load_config(None, ["mode=decentralized", "strategies=[gossip]", *overrides]), {})

    # a ring of 6 with attackers 0 and 2: node 1 sees both, every other benign node at most one
    assert f("clients.count=6", "clients.malicious_ids=[0,2]", "topology.name=ring") == 2
    assert f("clients.count=6", "clients.malicious_ids=[0,3]", "topology.name=ring") == 1
    assert f("clients.count=6", "clients.malicious_ids=[0,1,2]", "topology.name=complete") == 3
    assert f("clients.count=6", "clients.malicious_ids=[]", "topology.name=complete") == 0
    assert f("clients.count=6", "clients.malicious_ids=[0,3]", "topology.name=ring", "defense.byzantine=5") == 5
    cfg = load_config("noniid.yaml", ["strategies=[krum]", "defense.pre_aggregation=[nnm]"])
    assert PEER_RULES.build("krum", cfg).f == PRE_AGGREGATION.build("nnm", cfg).f == 2 < len(cfg.clients.malicious_ids)


@pytest.mark.parametrize("name", ["krum", "multikrum", "bulyan", "epic"])
def test_tracked_strategies_report_the_excluded_attacker(task_identity, name):
    updates = honest_updates(8, d=400, seed=5).numpy().astype(np.float32)
    updates[5] *= 12
    replies = [reply(updates[i], client_id=i) for i in range(8)]
    stack = torch.from_numpy(updates.copy())
    tracked = build_server_strategy(name, fl_cfg(8, 1))
    outcome = tracked.aggregate(1, replies, stack)
    assert outcome.arrays is not None
    assert outcome.excluded[5] is True
    if name == "krum":  # Krum's aggregate is exactly the chosen client's model
        chosen = [i for i, ex in enumerate(outcome.excluded) if not ex]
        assert len(chosen) == 1
        np.testing.assert_allclose(record_vector(outcome.arrays).numpy(), updates[chosen[0]], rtol=1e-6)
    if name == "multikrum":
        assert sum(outcome.excluded) == 1  # m = n - f = 7 selected
    if name == "bulyan":
        assert outcome.trimmed_share[5] == 1.0


def test_trimmed_mean_reports_the_outlier_as_always_trimmed(task_identity):
    updates = honest_updates(10, d=400, seed=6).numpy().astype(np.float32)
    updates[2] += 50
    replies = [reply(updates[i], client_id=i) for i in range(10)]
    tracked = build_server_strategy("fedtrimmedavg", fl_cfg(10, 2))
    outcome = tracked.aggregate(1, replies, torch.from_numpy(updates.copy()))
    assert outcome.excluded is None
    assert outcome.trimmed_share[2] == 1.0
    assert max(s for i, s in enumerate(outcome.trimmed_share) if i != 2) < 0.9


def test_the_rules_report_their_shares():
    """The shares a round records are the rules' own reports (Aggregate.shares), on hand-made rows."""
    from strategies.aggregate import aggregate
    from strategies.bulyan import closest_to_median
    from strategies.median import MedianRule
    from strategies.trimmed_mean import TrimmedMeanRule

    stack = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, -100.0]])
    # one value cut per tail and column: rows 0 and 3 in column 0, rows 3 and 2 in column 1
    assert TrimmedMeanRule(1)(stack, None, None, {}).shares.tolist() == [0.5, 0.0, 0.5, 1.0]
    assert TrimmedMeanRule(0)(stack, None, None, {}).shares.tolist() == [0.0] * 4
    assert MedianRule()(stack, None, None, {}).shares.tolist() == [0.5, 0.0, 0.5, 1.0]  # (4 - 1) // 2 = 1 per side
    # median per column: 1.5 and 0.5; the 2 closest values are rows 1, 2 (col 0) and rows 0, 1 (col 1)
    assert closest_to_median(stack, 2)[1].tolist() == [0.5, 0.0, 0.5, 1.0]
    # through aggregate(): a NaN row is left out first and reported cut whole
    spoilt = torch.cat([stack, torch.tensor([[float("nan"), 0.0]])])
    assert aggregate(TrimmedMeanRule(1), spoilt).shares.tolist() == [0.5, 0.0, 0.5, 1.0, 1.0]


def partitioned_shares(stack: torch.Tensor, beta: float) -> list[float]:
    """The trimmed-tail shares by np.partition of the two ranks: the reference."""
    import numpy as np

    n = stack.shape[0]
    cut = int(beta * n)
    if cut == 0 or n == 0:
        return [0.0] * n
    x = stack.numpy()
    ordered = np.partition(x, (cut, n - cut - 1), axis=0)
    return ((x < ordered[cut]) | (x > ordered[n - cut - 1])).mean(axis=1).tolist()


@pytest.mark.parametrize("extra", [-3, 0, 1, 18, 60])  # rows: both sides of SMALL_STACK and of NETWORK_ROWS
def test_trimmed_mean_shares_equal_the_partition_reference(extra):
    """The trimmed mean's and the median's reported shares (the sorting network up to NETWORK_ROWS
    finite rows, torch.sort beyond) are exactly those of np.partition: ties and signed zeros included;
    a NaN row is left out by aggregate() and the others' shares are those of the finite rows."""
    from strategies.aggregate import aggregate
    from strategies.median import MedianRule, SMALL_STACK
    from strategies.trimmed_mean import TrimmedMeanRule

    rows = SMALL_STACK + extra
    gen = torch.Generator().manual_seed(rows)
    stack = torch.randint(-3, 4, (rows, 400), generator=gen).float() / 4  # many ties
    stack[:, :50] = torch.randn(rows, 50, generator=gen)
    stack[0, 60], stack[1, 60] = 0.0, -0.0
    for cut in (1, rows // 3):
        assert TrimmedMeanRule(cut)(stack, None, None, {}).shares.tolist() == partitioned_shares(stack, (cut + 0.25) / rows)
    median_cut = (rows - 1) // 2
    assert MedianRule()(stack, None, None, {}).shares.tolist() == partitioned_shares(stack, (median_cut + 0.25) / rows)
    stack[1, 0] = float("nan")
    finite = torch.cat([stack[:1], stack[2:]])
    want = partitioned_shares(finite, 1.25 / (rows - 1))
    assert aggregate(TrimmedMeanRule(1), stack).shares.tolist() == [want[0], 1.0, *want[1:]]


def test_client_metrics_mean_skips_ids_and_unknowns():
    records = [RecordDict({"m": MetricRecord({"num-examples": 1, "partition-id": 3, "train-loss": 1.0,
                                              "epic-poison-recall": -1.0})}),
               RecordDict({"m": MetricRecord({"num-examples": 3, "partition-id": 4, "train-loss": 2.0,
                                              "epic-poison-recall": 0.5})})]
    out = mean_client_metrics(records, "num-examples")
    assert "partition-id" not in out
    assert out["train-loss"] == pytest.approx(1.75)
    assert out["epic-poison-recall"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- exact trimming


def valid_trims(limit: int = 200):
    return [(n, f) for n in range(1, limit + 1) for f in range((n - 1) // 2 + 1)]


def test_flower_beta_f_over_n_undercuts_and_exact_beta_does_not():
    """Flower cuts int(beta * n) per side: f / n undercuts for 368 pairs, exact_trim_beta for none."""
    assert sum(int((f / n) * n) != f for n, f in valid_trims()) == 368
    assert int((1 / 49) * 49) == 0
    for n, f in valid_trims():
        beta = exact_trim_beta(n, f)
        assert 0.0 <= beta < 0.5, (n, f)
        assert int(beta * n) == f, (n, f)


def test_flower_trim_mean_cuts_exactly_f_for_every_n_and_f():
    """Flower's own trim_mean with exact_trim_beta equals the mean of the middle n - 2f sorted values."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    rng = np.random.default_rng(0)
    for n, f in valid_trims():
        x = rng.permutation(n).astype(np.float64)[:, None] ** 2  # distinct values: the cut is visible
        expected = np.sort(x, axis=0)[f:n - f].mean(axis=0)
        np.testing.assert_array_equal(trim_mean(x, exact_trim_beta(n, f)), expected, err_msg=f"{(n, f)}")


def test_exact_trim_beta_refuses_invalid_pairs():
    for n, f in ((4, 2), (1, 1), (0, 0), (5, -1)):
        with pytest.raises(ValueError):
            exact_trim_beta(n, f)


def test_fedtrimmedavg_trims_one_of_49(task_identity):
    """(49, 1): Flower's f / n trimmed nothing; the strategy now cuts the outlier in every coordinate."""
    updates = honest_updates(49, d=400, seed=7).numpy().astype(np.float32)
    updates[3] += 1000
    replies = [reply(updates[i], client_id=i) for i in range(49)]
    tracked = build_server_strategy("fedtrimmedavg", fl_cfg(49, 1))
    outcome = tracked.aggregate(1, replies, torch.from_numpy(updates.copy()))
    ordered = np.sort(updates, axis=0)
    np.testing.assert_allclose(record_vector(outcome.arrays).numpy(), ordered[1:48].mean(axis=0), rtol=1e-5)
    assert outcome.trimmed_share[3] == 1.0


def test_fedtrimmedavg_lowers_the_cut_when_replies_are_missing(task_identity):
    """f = 3 assumed for 8 clients but only 5 replied: cut (5 - 1) // 2 = 2 per side, not fail."""
    updates = honest_updates(5, d=400, seed=8).numpy().astype(np.float32)
    replies = [reply(updates[i], client_id=i) for i in range(5)]
    tracked = build_server_strategy("fedtrimmedavg", fl_cfg(8, 3))
    outcome = tracked.aggregate(1, replies, torch.from_numpy(updates.copy()))
    np.testing.assert_allclose(record_vector(outcome.arrays).numpy(), np.median(updates, axis=0), rtol=1e-6)


def _carried(strategy) -> dict:
    """A strategy's attributes, plain values as they are and objects by type (functions, selection rules)."""
    plain = (int, float, str, bool, type(None), dict, list, tuple)
    return {k: repr(v) if isinstance(v, plain) else type(v).__name__ for k, v in vars(strategy).items()}


FLOWER_STRATEGIES = [n for n in SERVER_STRATEGIES.names() if not SERVER_STRATEGIES.has(n, "reference")]


@pytest.mark.parametrize("name", FLOWER_STRATEGIES)
def test_a_restored_strategy_equals_the_one_that_aggregated(task_identity, name):
    """What a checkpoint saves (TrackedStrategy.state_dict) is all a strategy carries from a round to the
    next: a fresh one loaded with it matches the one that aggregated two rounds. A stateful rule such as
    FedAdam (m_t, v_t, current_arrays) fails this until its state is added there."""
    updates = honest_updates(8, d=400, seed=7).numpy().astype(np.float32)
    params = fl_cfg(8, 1)
    used = build_server_strategy(name, params)
    for rnd in (1, 2):
        used.aggregate(rnd, [reply(updates[i] + rnd, client_id=i) for i in range(8)], torch.from_numpy(updates + rnd))
    restored = build_server_strategy(name, params)
    restored.load_state_dict(used.state_dict())
    per_round = {"beta"}  # ExactTrimmedAvg sets it from the round's reply count before every aggregation
    assert {k: v for k, v in _carried(restored.strategy).items() if k not in per_round} == \
        {k: v for k, v in _carried(used.strategy).items() if k not in per_round}
