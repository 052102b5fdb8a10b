"""GP and exclude in the one rule signature of strategies/aggregate.py: called through
``strategies.aggregate.aggregate`` exactly as gossip is, on a hand-made neighbourhood, against the formulas
(strategies/gradient_purification.py: mixing as deltas, rules 2, 5, 6 and 8)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gp_factory import make_gp

from fedepic.config import PurificationConfig
from strategies.aggregate import aggregate
from strategies.exclude import ExcludeDetected
from strategies.gossip import Gossip

# own (id 7) at row 1, not row 0; id 9 is a moderate outlier (robust score about 9.3: flagged, below
# reject_score 30, so GP still mixes it in its first round), id 2 sends NaN
IDS = [3, 7, 5, 9, 2, 4]
STACK = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [4.0, 4.0], [math.nan, 0.0], [0.0, -1.0]])
WEIGHTS = torch.tensor([0.2, 0.3, 0.2, 0.1, 0.1, 0.1])
OWN = 1


def mixed(rows: list[int]) -> torch.Tensor:
    """own + sum_{r in rows} w'_r (v_r - own), w' the weights renormalised over the finite rows (the
    policy: the NaN row's 0.1 spread in proportion, so every weight is divided by 0.9)."""
    own = STACK[OWN]
    return own + sum((WEIGHTS[r] / 0.9) * (STACK[r] - own) for r in rows)


def exclude_rule() -> ExcludeDetected:
    """``exclude`` with the schema's defaults (as ``gp_factory.make_gp`` builds GP)."""
    keys = {**dataclasses.asdict(PurificationConfig()), "target": "weights", "oracle_round": None,
            "known_malicious": ()}
    keys.pop("oracle_at")
    return ExcludeDetected(**keys)


def test_gp_exclude_and_gossip_are_called_the_same_way():
    rules = {"gossip": Gossip(), "gp": make_gp(), "exclude": exclude_rule()}
    states = {name: {"ids": IDS} for name in rules}
    out = {}

    def play(round_: int) -> None:
        for name, rule in rules.items():
            states[name]["round"] = round_
            out[name, round_] = aggregate(rule, STACK, OWN, WEIGHTS, states[name])
            assert out[name, round_].nonfinite.tolist() == [False, False, False, False, True, False]
            assert out[name, round_].shares is None  # none of the three cuts coordinates

    finite = [0, 1, 2, 3, 5]
    everyone = [True, True, True, True, False, True]
    play(1)
    # round 1: gossip mixes every finite row; GP too (9 is suspicious, not blatant: rule 6), and records
    # 9's contribution; exclude rejects the suspect for the round (its weight stays with the node)
    assert torch.allclose(out["gossip", 1].vector, mixed(finite)) and out["gossip", 1].kept.tolist() == everyone
    assert torch.allclose(out["gp", 1].vector, mixed(finite)) and out["gp", 1].kept.tolist() == everyone
    assert torch.allclose(out["gp", 1].vector, torch.tensor([0.6, 0.5]) / 0.9)
    assert out["gp", 1].info["flagged"] == [9, 2] and out["gp", 1].info["purified"] == []
    assert out["gp", 1].info["scores"][2] == math.inf  # the NaN sender counts as evidence (rule 8)
    record = (0.1 / 0.9) * (STACK[3] - STACK[OWN])
    assert torch.allclose(states["gp"]["gp"]["9"], record)  # r_ij = w_ij (v_j - v_i), in the plain state
    assert torch.allclose(out["exclude", 1].vector, mixed([0, 1, 2, 5]))
    assert out["exclude", 1].kept.tolist() == [True, True, True, False, False, True]
    play(2)
    # round 2: 9 and 2 flagged twice in a row (patience 2) are confirmed: not mixed, and GP subtracts
    # 9's record (2 never had one); exclude only drops them
    assert torch.allclose(out["gossip", 2].vector, mixed(finite))
    assert torch.allclose(out["gp", 2].vector, mixed([0, 1, 2, 5]) - record, atol=1e-7)
    assert torch.allclose(out["gp", 2].vector, torch.tensor([-0.2, -0.3]) / 0.9)
    assert out["gp", 2].kept.tolist() == [True, True, True, False, False, True]
    assert out["gp", 2].info["purified"] == [9, 2] and out["gp", 2].info["confirmed"] == [2, 9]
    assert torch.allclose(out["exclude", 2].vector, mixed([0, 1, 2, 5]))
    assert out["exclude", 2].info["purified"] == [9, 2] and states["exclude"]["gp"] == {}
    # the memory is in the state in plain form; the call's row names are gone again
    assert states["gp"]["gp.confirmed"] == [2, 9] and states["gp"]["gp.rounds"] == 2
    assert "9" not in states["gp"]["gp"] and "rows" not in states["gp"]


def test_gradient_tracking_is_two_calls_of_the_same_signature():
    """Trackers first: GP screens them, mixes and records them (target gradient); then the models, mixed
    over the same neighbours, a NaN model left out by the policy (its weight spread over the rest)."""
    gp = make_gp(target="gradient")
    models = torch.tensor([[2.0], [1.0], [0.0], [5.0], [3.0], [math.nan]])  # id 4's model is NaN
    trackers = torch.nan_to_num(STACK, nan=0.0)  # every tracker finite this time
    state = {"ids": IDS, "round": 1, "tracking": "trackers"}
    y = aggregate(gp, trackers, OWN, WEIGHTS, state)
    assert y.kept.all() and torch.allclose(y.vector, trackers[OWN] + sum(
        WEIGHTS[r] * (trackers[r] - trackers[OWN]) for r in (0, 2, 3, 4, 5)))
    assert y.info["flagged"] == [9] and state["gp.verdict"] == [3, 5, 9, 2, 4]
    state["tracking"] = "models"
    x = aggregate(gp, models, OWN, WEIGHTS, state)
    w = WEIGHTS / 0.9  # the NaN model's weight spread in proportion
    assert torch.allclose(x.vector, models[OWN] + sum(w[r] * (models[r] - models[OWN]) for r in (0, 2, 3, 4)))
    assert x.kept.tolist() == [True, True, True, True, True, False] and x.info == {}
    assert "gp.verdict" not in state and set(state["gp"]) == {"3", "5", "9", "2", "4"}  # the trackers' records


def test_gp_needs_the_row_names():
    with pytest.raises(ValueError, match="state\\['ids'\\]"):
        aggregate(make_gp(), STACK, OWN, WEIGHTS, {})
    with pytest.raises(ValueError, match="dsgt"):
        aggregate(make_gp(target="gradient"), STACK, OWN, WEIGHTS, {"ids": IDS})
