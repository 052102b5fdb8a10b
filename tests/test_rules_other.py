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


@pytest.mark.parametrize("module", ["strategies.dnc"])
def test_docstring_examples(module):
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
