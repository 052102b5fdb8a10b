"""The model attacks the robust-aggregation literature compares against (fedepic issue 33): bit flipping,
min-sum, Fang et al.'s attacks on Krum and the trimmed mean, ByzFL's optimized ALIE / IPM, mimic and
dissensus, each on hand-made cases computed from its formula (and against ByzFL's values where ByzFL has
the attack)."""

from __future__ import annotations

import math

import pytest
import torch

from fedepic.attacks.model_attacks import apply_model_attack, sign_flip
from fedepic.attacks.minsum import minsum
from fedepic.extensions import MODEL_ATTACKS

HONEST = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]])
OWN = torch.tensor([1.0, -2.0, 0.5])


# ------------------------------------------------------------------------------------- bit flip


def test_bit_flip_is_sign_flip_under_the_literature_name():
    assert MODEL_ATTACKS.get("bit_flip").target == MODEL_ATTACKS.get("sign_flip").target
    assert not MODEL_ATTACKS.has("bit_flip", "needs_honest")
    assert torch.equal(apply_model_attack("bit_flip", HONEST, OWN), torch.tensor([-1.0, 2.0, -0.5]))
    assert torch.equal(apply_model_attack("bit_flip", HONEST, OWN), sign_flip(HONEST, OWN))


# ------------------------------------------------------------------------------------- min-sum


def _sum_sq(m: torch.Tensor, honest: torch.Tensor) -> float:
    return float((honest.double() - m.double()).square().sum())


@pytest.mark.parametrize("kind", ["std", "unit_vec", "sign"])
def test_minsum_meets_the_sum_budget_with_equality(kind):
    budget = max(_sum_sq(h, HONEST) for h in HONEST)
    mal = minsum(HONEST, OWN, None, perturbation=kind)
    assert _sum_sq(mal, HONEST) == pytest.approx(budget, rel=1e-6)
    mu = HONEST.mean(dim=0)
    step = mal - mu
    assert _sum_sq(mu + 1.001 * step, HONEST) > budget  # gamma is the largest allowed


def test_minsum_hand_made_value():
    # honest rows (0, 0), (2, 0), (1, 3): mu = (1, 1); |e_i| = sqrt2, sqrt2, 2 -> max 2;
    # std = (1, sqrt3), p = -(1, sqrt3), |p| = 2 -> gamma = 1, m = (0, 1 - sqrt3)
    honest = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    out = minsum(honest, torch.zeros(2))
    assert torch.allclose(out, torch.tensor([0.0, 1.0 - math.sqrt(3.0)]), atol=1e-6)
    assert torch.equal(minsum(torch.ones(3, 2), torch.zeros(2)), torch.ones(2))  # no spread: mu


def test_minsum_is_registered_and_omniscient():
    assert MODEL_ATTACKS.has("minsum", "needs_honest")
    assert torch.equal(apply_model_attack("minsum", HONEST, OWN), minsum(HONEST, OWN))
