"""The rules of issue 33 from Blades / FLPoison and the decentralized literature: DnC, SignGuard, FLTrust
(server rules) and BALANCE, MOZI (peer rules). No reference implementation is installed, so each is
checked against its paper's formula on hand-made cases whose values are computed here by hand."""

from __future__ import annotations

import doctest

import pytest
import torch

from fedepic.config import load_config
from fedepic.extensions import PEER_RULES, SERVER_RULES
from strategies.aggregate import aggregate


def fl_cfg(*overrides: str):
    return load_config(None, ["mode=federated", "clients.count=10", *overrides])


def dfl_cfg(*overrides: str):
    return load_config(None, ["mode=decentralized", "strategies=[gossip]", *overrides])


# --------------------------------------------------------------------------- the round hook


def test_the_round_and_server_update_reach_the_rule_for_the_call_only():
    """RuleAggregation puts the round (and the server's update, when the round has one) in the rule's
    state for the call and takes them out again, so checkpoints never hold them."""
    from fedepic.local_backend import RuleAggregation
    from fedepic.server_rounds import ClientReply, NodeWork

    seen = {}

    def spy(stack, own_index, weights, state):
        seen.update(state)
        state["memory"] = 1  # a rule's own memory stays
        from strategies.aggregate import Aggregate
        return Aggregate(stack.mean(dim=0), torch.ones(stack.shape[0], dtype=torch.bool))

    agg = RuleAggregation(fl_cfg("strategies=[fedavg]"), "fedavg")
    agg.rule = spy
    work = NodeWork([ClientReply(i, torch.zeros(2), {"num-examples": 1}) for i in range(3)], [], 3,
                    server_update=torch.ones(2))
    agg(work, torch.zeros(3, 2), 7)
    assert seen["round"] == 7 and torch.equal(seen["server_update"], torch.ones(2))
    assert agg.state_dict() == {"rule": {"memory": 1}}


# --------------------------------------------------------------------------- DnC


def test_dnc_on_a_rank_one_stack_drops_the_largest_projections():
    """Rows on one axis: v is that axis and s_i = (x_i - mean)^2. x = 0, 1, 2, 3, 10: mean 3.2,
    s = 10.24, 4.84, 1.44, 0.04, 46.24; m = 2, c = 1 keeps the 3 lowest (rows 1, 2, 3): mean 2."""
    from strategies.dnc import DivideAndConquer

    stack = torch.zeros(5, 3)
    stack[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    out = aggregate(DivideAndConquer(2, 1.0, 3, 3, seed=1), stack, None, None, {"round": 1})
    assert out.kept.tolist() == [False, True, True, True, False]
    assert torch.allclose(out.vector, torch.tensor([2.0, 0.0, 0.0]))
    assert out.info["scores"] == pytest.approx([10.24, 4.84, 1.44, 0.04, 46.24])
    # c = 0.5: floor(0.5 * 2) = 1 removed, the far row only
    half = DivideAndConquer(2, 0.5, 1, 3, seed=1)(stack, None, None, {"round": 1})
    assert half.kept.tolist() == [True, True, True, True, False]


def test_dnc_subsamples_b_coordinates_from_the_seed_and_round():
    """b < D: each iteration's scores are those of the drawn columns, drawn by the generator the round's
    seed gives (torch.Generator().manual_seed(seed * 1_000_003 + round), randperm(D)[:b])."""
    from strategies.dnc import DivideAndConquer, lowest, outlier_scores

    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(8, 50, generator=gen)
    stack[2] += 3.0
    rule = DivideAndConquer(2, 1.0, 4, 10, seed=5)
    out = rule(stack, None, None, {"round": 3})
    draws = torch.Generator().manual_seed(5 * 1_000_003 + 3)
    good = torch.ones(8, dtype=torch.bool)
    for _ in range(4):
        cols = torch.randperm(50, generator=draws)[:10]
        good &= lowest(outlier_scores(stack[:, cols]), 6)
    assert out.kept.tolist() == good.tolist() and not out.kept[2]
    assert torch.allclose(out.vector, stack[good].mean(dim=0))
    # the same round gives the same draws; another round other ones
    assert rule(stack, None, None, {"round": 3}).info == out.info
    assert rule(stack, None, None, {"round": 4}).info["scores"] != out.info["scores"]
    with pytest.raises(ValueError, match="dnc: needs the server round"):
        rule(stack, None, None, {})


def test_dnc_is_translation_equivariant_and_falls_back_when_the_intersection_is_empty():
    from strategies.dnc import DivideAndConquer

    gen = torch.Generator().manual_seed(1)
    stack = torch.randn(6, 20, generator=gen)
    shift = torch.randn(20, generator=gen) * 100
    rule = DivideAndConquer(1, 1.0, 3, 8, seed=0)
    a, b = rule(stack, None, None, {"round": 1}), rule(stack + shift, None, None, {"round": 1})
    assert a.kept.tolist() == b.kept.tolist()
    assert torch.allclose(a.vector + shift, b.vector, atol=1e-4)
    # 2 rows, 1 removed per iteration, 5 iterations: the draws may drop both; never an empty mean
    two = DivideAndConquer(1, 1.0, 5, 1, seed=0)(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, None, {"round": 2})
    assert int(two.kept.sum()) >= 1 and torch.isfinite(two.vector).all()


def test_dnc_binds_from_the_config():
    cfg = fl_cfg("defense.byzantine=3", "defense.dnc.iterations=2", "defense.dnc.subsample=7",
                 "defense.dnc.filter_fraction=0.5", "seed=11")
    rule = SERVER_RULES.build("dnc", cfg)
    assert (rule.num_malicious_nodes, rule.iterations, rule.subsample, rule.filter_fraction, rule.seed) == \
        (3, 2, 7, 0.5, 11)


# --------------------------------------------------------------------------- SignGuard


def test_signguard_drops_the_other_sign_cluster_and_clips_to_the_median_norm():
    """Norms 2, sqrt(12), sqrt(3.25) x2, 2: median M = 2, band (0.2, 6) keeps all. Sign features (beta = 1):
    (1, 0, 0) for rows 0-3, (0, 0, 1) for row 4: two clusters, the larger is rows 0-3. Row 1 is clipped
    to norm 2: [3, 1, 1, 1] * 2 / sqrt(12); the mean of the four is computed by hand."""
    from strategies.signguard import SignGuard

    g = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.5, 1.0],
                      [-1.0, -1.0, -1.0, -1.0]])
    out = aggregate(SignGuard(0.1, 3.0, 1.0, seed=0), g, None, torch.ones(5), {"round": 1})
    assert out.kept.tolist() == [True, True, True, True, False]
    assert out.info["median_norm"] == pytest.approx(2.0) and out.info["block"] == [0, 4]
    r1 = torch.tensor([3.0, 1.0, 1.0, 1.0]) * 2 / 12 ** 0.5
    expected = (torch.tensor([1.0, 1.0, 1.0, 1.0]) + r1 + torch.tensor([2.0, 2.0, 1.5, 1.5])) / 4
    assert torch.allclose(out.vector, expected)


def test_signguard_norm_band_is_relative_to_the_median_norm():
    """Equal sign shares (one cluster: a zero bandwidth groups equal features); norms 1, 1, 1, 1, 0.05, 10:
    M = 1, L M = 0.1 and R M = 3 leave out rows 4 and 5; the mean of four [.5]*4 rows is [.5]*4."""
    from strategies.signguard import SignGuard

    base = torch.full((4,), 0.5)
    g = torch.stack([base, base, base, base, base * 0.05, base * 10])
    out = SignGuard(0.1, 3.0, 0.5, seed=0)(g, None, None, {"round": 1})
    assert out.info["norm_kept"] == [0, 1, 2, 3] and out.info["sign_kept"] == [0, 1, 2, 3, 4, 5]
    assert out.kept.tolist() == [True] * 4 + [False] * 2
    assert torch.allclose(out.vector, base)
    # nothing in both filters: no aggregate, the server keeps its model
    tight = SignGuard(0.99, 1.01, 1.0, seed=0)(torch.tensor([[-2.0, -2.0], [1.0, 1.0], [3.0, 3.0]]), None, None,
                                              {"round": 1})
    assert tight.vector is None and not tight.kept.any()


def test_signguard_block_is_drawn_from_the_seed_and_round():
    from strategies.signguard import SignGuard

    rule = SignGuard(0.1, 3.0, 0.1, seed=3)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    start = int(torch.randint(0, 1000 - 100, (1,), generator=gen))
    out = rule(torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)), None, None, {"round": 2})
    assert out.info["block"] == [start, 100]


# sklearn 1.x MeanShift(bandwidth=estimate_bandwidth(X, quantile=0.5), bin_seeding=True, cluster_all=False)
# labels on these features (random points and sign features), computed once with scikit-learn 1.9.1, which
# fedepic does not install; on 300 such cases 297 agreed, the 3 others where a point lies within 1e-15 of the
# bandwidth (sklearn's k-d tree arithmetic decides those)
SKLEARN_CASES = [
    ([[0.269787, 0.040974, 0.016528], [0.81327, 0.912756, 0.606636], [0.729497, 0.543625, 0.935072], [0.815854, 0.002739, 0.857404], [0.033586, 0.729655, 0.175656], [0.863179, 0.541461, 0.299712], [0.422687, 0.02832, 0.124283], [0.670624, 0.64719, 0.615385], [0.383678, 0.99721, 0.980835], [0.685542, 0.650459, 0.688447], [0.388921, 0.135097, 0.721488], [0.525354, 0.310242, 0.485835], [0.889488, 0.934044, 0.357795], [0.57153, 0.321869, 0.5943], [0.337911, 0.391619, 0.890274], [0.227158, 0.623187, 0.084015], [0.832644, 0.787098, 0.239369], [0.876484, 0.058568, 0.336117], [0.150279, 0.450339, 0.796324], [0.230642, 0.052021, 0.404552], [0.198513, 0.090753, 0.580332], [0.298696, 0.671995, 0.199515], [0.942113, 0.36511, 0.105495], [0.629108, 0.927155, 0.440377], [0.95459, 0.499896, 0.425229], [0.620213, 0.995097, 0.948944]],
     [0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1]),
    ([[0.795082, 0.0, 0.911504], [0.901639, 0.0, 0.79646], [0.844262, 0.0, 0.858407], [0.827869, 0.0, 0.876106], [0.713115, 0.0, 1.0], [0.795082, 0.0, 0.911504], [0.959016, 0.0, 0.734513], [0.852459, 0.0, 0.849558], [0.877049, 0.0, 0.823009], [1.0, 0.0, 0.690265], [0.754098, 0.0, 0.955752], [0.803279, 0.0, 0.902655], [0.721311, 0.0, 0.99115], [0.819672, 0.0, 0.884956], [0.877049, 0.0, 0.823009], [0.819672, 0.0, 0.884956], [0.852459, 0.0, 0.849558], [0.836066, 0.0, 0.867257], [0.836066, 0.0, 0.867257], [0.745902, 0.0, 0.964602]],
     [0, 1, 0, 0, -1, 0, 1, 0, 0, 1, -1, 0, -1, 0, 0, 0, 0, 0, 0, -1]),
    ([[0.5, 0.0, 0.25], [0.25, 1.0, 0.5], [0.75, 0.75, 0.25], [0.5, 0.25, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75], [0.75, 0.75, 0.5], [0.25, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.75, 0.0], [0.5, 0.25, 0.0], [0.0, 0.75, 0.75], [0.25, 0.75, 0.25], [0.75, 0.0, 0.5]],
     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1]),
    ([[0.9977, 0.940296, 0.080958], [0.59404, 0.476097, 0.051435], [0.704395, 0.505714, 0.626342], [0.135884, 0.193089, 0.713232], [0.926459, 0.355985, 0.983956], [0.219056, 0.188028, 0.728418], [0.257392, 0.954305, 0.047171], [0.568028, 0.802412, 0.74114], [0.959731, 0.228807, 0.616143], [0.13018, 0.14552, 0.740095], [0.695428, 0.775018, 0.873031], [0.186801, 0.715155, 0.811404], [0.243027, 0.489297, 0.319844], [0.098297, 0.860296, 0.752193], [0.010807, 0.40059, 0.817915], [0.958578, 0.245151, 0.951956]],
     [-1, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("points, labels", SKLEARN_CASES)
def test_mean_shift_gives_sklearns_labels(points, labels):
    from strategies.signguard import mean_shift_labels

    assert mean_shift_labels(torch.tensor(points, dtype=torch.float64)).tolist() == labels


def test_signguard_binds_from_the_config_and_refuses_an_empty_band():
    from fedepic.errors import ConfigError

    cfg = fl_cfg("defense.signguard.lower=0.2", "defense.signguard.upper=2.5",
                 "defense.signguard.coordinate_fraction=0.3", "seed=4")
    rule = SERVER_RULES.build("signguard", cfg)
    assert (rule.lower, rule.upper, rule.coordinate_fraction, rule.seed) == (0.2, 2.5, 0.3, 4)
    with pytest.raises(ConfigError, match="defense.signguard.lower"):
        fl_cfg("defense.signguard.lower=3.0")


# --------------------------------------------------------------------------- BALANCE


def test_balance_accepts_within_the_decaying_radius_and_mixes_with_alpha():
    """own = [3, 4] (norm 5); neighbours at distances 0.5, 1.0, 2.0, 10. gamma = 0.3, kappa = 1, T = 10:
    t = 0 -> radius 1.5 (accepts the first two); t = 10 -> 1.5 / e = 0.552 (the first only).
    alpha = 0.25: x = 0.25 own + 0.75 mean(accepted)."""
    from strategies.balance import Balance

    own = torch.tensor([3.0, 4.0])
    neigh = own + torch.tensor([[0.5, 0.0], [0.0, -1.0], [2.0, 0.0], [0.0, 10.0]])
    stack = torch.cat([own[None], neigh])
    rule = Balance(0.3, 1.0, 0.25, rounds=10)
    first = aggregate(rule, stack, 0, torch.full((5,), 0.2), {"round": 0})
    assert first.kept.tolist() == [True, True, True, False, False]
    assert first.info["threshold"] == pytest.approx(1.5)
    assert torch.allclose(first.vector, 0.25 * own + 0.75 * (neigh[0] + neigh[1]) / 2)
    last = rule(stack, 0, None, {"round": 10})
    assert last.info["threshold"] == pytest.approx(1.5 / torch.e) and last.kept.tolist() == [True, True] + [False] * 3
    assert torch.allclose(last.vector, 0.25 * own + 0.75 * neigh[0])
    # without the round (today's peer engines): t = 0, no decay
    assert rule(stack, 0, None, {}).info == {"threshold": pytest.approx(1.5), "round": None}
    # nobody within the radius: own unchanged; own at another row
    alone = rule(torch.stack([neigh[3], own]), 1, None, {"round": 0})
    assert torch.equal(alone.vector, own) and alone.kept.tolist() == [False, True]


# --------------------------------------------------------------------------- MOZI


def test_mozi_keeps_the_closest_rho_share_and_falls_back_to_the_closest():
    """Distances from own [0, 0]: 1, 3, 2, 10. rho = 0.5 keeps floor(2) = 2, rows 1 and 3 (distances
    1 and 2); alpha = 0.6: 0.6 own + 0.4 mean. rho = 0.2: floor(0.8) = 0 -> the closest alone."""
    from strategies.mozi import Mozi

    stack = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, -2.0], [10.0, 0.0]])
    out = aggregate(Mozi(0.5, 0.6), stack, 0, None)
    assert out.kept.tolist() == [True, True, False, True, False] and out.info["selected"] == [1, 3]
    assert torch.allclose(out.vector, 0.4 * torch.tensor([0.5, -1.0]))
    few = Mozi(0.2, 0.6)(stack, 0, None, {})
    assert few.info["selected"] == [1] and torch.allclose(few.vector, torch.tensor([0.4, 0.0]))


def test_peer_rules_bind_from_the_config():
    cfg = dfl_cfg("defense.balance.gamma=0.7", "defense.balance.kappa=2", "defense.balance.alpha=0.1",
                  "rounds=9", "defense.mozi.rho=0.3", "defense.mozi.alpha=0.8")
    balance, mozi = PEER_RULES.build("balance", cfg), PEER_RULES.build("mozi", cfg)
    assert (balance.gamma, balance.kappa, balance.alpha, balance.rounds) == (0.7, 2.0, 0.1, 9)
    assert (mozi.rho, mozi.alpha) == (0.3, 0.8)


@pytest.mark.parametrize("name", ["balance", "mozi"])
def test_consensus_is_a_fixed_point(name):
    x = torch.tensor([1.0, -2.0, 3.0])
    rule = PEER_RULES.build(name, dfl_cfg())
    assert torch.allclose(aggregate(rule, x.repeat(5, 1), 0, torch.full((5,), 0.2)).vector, x)


# --------------------------------------------------------------------------- FLTrust


def test_fltrust_weights_by_relu_cosine_and_rescales_to_the_server_norm():
    """g0 = [0, 2] (norm 2). g1 = [0, 5] (cos 1), g2 = [3, 3] (cos 1/sqrt 2), g3 = [1, -1] (cos -1/sqrt 2 -> 0),
    g4 = 0 (trust 0). Rescaled to norm 2: [0, 2] and [sqrt 2, sqrt 2];
    g = (1 [0, 2] + (1/sqrt 2) [sqrt 2, sqrt 2]) / (1 + 1/sqrt 2) = [1, 3] / 1.7071."""
    from strategies.fltrust import FLTrust

    stack = torch.tensor([[0.0, 5.0], [3.0, 3.0], [1.0, -1.0], [0.0, 0.0]])
    out = aggregate(FLTrust(), stack, None, torch.ones(4), {"server_update": torch.tensor([0.0, 2.0])})
    assert out.kept.tolist() == [True, True, False, False]
    assert out.info["trust"] == pytest.approx([1.0, 2 ** -0.5, 0.0, 0.0])
    assert torch.allclose(out.vector, torch.tensor([1.0, 3.0]) / (1 + 2 ** -0.5))
    # scaling a client's update changes nothing (its norm is replaced by ||g0||)
    scaled = stack.clone()
    scaled[1] *= 100
    assert torch.allclose(FLTrust()(scaled, None, None, {"server_update": torch.tensor([0.0, 2.0])}).vector,
                          out.vector)
    # no positive trust: no aggregate; no server update: an error naming the key
    assert FLTrust()(stack[2:], None, None, {"server_update": torch.tensor([0.0, 2.0])}).vector is None
    with pytest.raises(ValueError, match="server_update"):
        FLTrust()(stack, None, None, {})


def test_the_root_set_is_seeded_clean_and_its_update_is_a_parameter_update():
    from fedepic.data import load_dataset
    from fedepic.root_set import root_client, root_rows, server_update
    from fedepic.server_rounds import Evaluator, Target
    from fedepic.client_work import model_for

    cfg = fl_cfg("data.name=synthetic", "data.synthetic_train=300", "data.synthetic_test=50", "model.name=mlp",
                 "defense.fltrust.root_size=40", "seed=3", "strategies=[fltrust]")
    data = load_dataset(cfg.data)
    rows = root_rows(cfg, data)
    assert len(rows) == 40 == len(set(rows.tolist())) and rows.tolist() == sorted(rows.tolist())
    assert rows.tolist() == root_rows(cfg, data).tolist()
    client = root_client(cfg, data)
    assert torch.equal(client.y, data.train_y[torch.from_numpy(rows)]) and not client.poisoned.any()
    like = {k: v.detach().clone() for k, v in model_for(cfg, data).state_dict().items()}
    mask = Evaluator(cfg, data, Target()).parameters
    g0 = server_update(cfg, data, like, 1, mask)
    assert g0.shape == (int(mask.sum()),) and float(g0.norm()) > 0
    assert torch.equal(g0, server_update(cfg, data, like, 1, mask))


def test_fltrust_is_refused_under_per_step():
    from fedepic.errors import ConfigError

    with pytest.raises(ConfigError, match="server.protocol"):
        fl_cfg("strategies=[fltrust]", "server.protocol=per_step", "model.name=mlp")


@pytest.mark.parametrize("module", ["strategies.dnc", "strategies.signguard", "strategies.balance",
                                    "strategies.mozi", "strategies.fltrust"])
def test_docstring_examples(module):
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
