"""BALANCE, a peer rule of the one signature (``strategies/aggregate.py``).

Paper: Minghong Fang, Zifan Zhang, Hairi, Prashant Khanduri, Jia Liu, Songtao Lu, Yuchen Liu, Neil Gong,
"Byzantine-Robust Decentralized Federated Learning", ACM CCS 2024, arXiv:2406.10416,
https://arxiv.org/abs/2406.10416. (The issue's brief lists the authors as "Fang, Xu, Guo, Gong, Yang,
Song"; the arXiv page lists the eight above.) The abstract: "each client leverages its own local model
as a similarity reference to determine if the received model is malicious or benign."

The rule, as the issue states it (BALANCE, "Byzantine-robust averaging through local similarity in
decentralization"): node i accepts neighbour j's model when it lies close to its own,

    ||x_i - x_j|| <= gamma * exp(-kappa * t / T) * ||x_i||,

with t the round and T the rounds (the paper's lambda(t) = t / T), and mixes its own model with the
mean of the accepted ones,

    x_i <- alpha * x_i + (1 - alpha) * mean_{j accepted} x_j        (x_i unchanged when none is accepted).

Example (own [1, 0]; neighbours at distances 0.1, 0.2 and 2; gamma = 0.5, kappa = 1, t = 0: the
threshold is 0.5 ||x_i|| = 0.5, so the far one is rejected and x_i <- 0.5 [1, 0] + 0.5 [1, -0.05])::

    >>> import torch
    >>> stack = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.2], [1.0, 2.0]])
    >>> out = Balance(0.5, 1.0, 0.5, rounds=10)(stack, 0, None, {"round": 0})
    >>> out.kept.tolist(), out.vector
    ([True, True, True, False], tensor([ 1.0000, -0.0250]))

Cost: O(m D) for the m distances and the mean; O(D) extra memory.

The round: the rule reads t from ``state["round"]`` and T from ``state["rounds"]`` (else its
``rounds``, the config's ``rounds``): both peer engines put them there for the call
(``fedepic.peer_node.rule_context``; t is the round the node trained in, 1-based), so the radius decays
as exp(-kappa t / T) from round to round as in the paper. Called without a round (a direct call), the
rule uses t = 0, the constant threshold gamma ||x_i||, and says so in ``info["round"]`` (None).
Deviations and readings:
- ``weights`` (the mixing weights) are ignored: the paper averages the accepted models equally and
  weighs own by alpha.
- The order of a round is fedepic's D-PSGD "train then aggregate": x_i is the node's model after this
  round's local training (inferred to be the paper's reference model; its Algorithm interleaves a
  gradient step, which fedepic's local training is).
- A non-finite neighbour is left out before the test (``strategies.aggregate.aggregate``).
- Defaults (``defense.balance``): gamma 0.3, kappa 1, alpha 0.5 (inferred: the paper's default setting
  as remembered, not re-read here).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, self_first
from strategies.gossip import own_only, split_own


class Balance:
    """BALANCE (Fang et al., CCS 2024) at one node (module docstring).

    Parameters
    ----------
    gamma : float
        gamma, the acceptance radius relative to ||x_i|| (``defense.balance.gamma``).
    kappa : float
        kappa, the decay rate of the radius over the rounds (``defense.balance.kappa``).
    alpha : float
        alpha, the weight of the node's own model (``defense.balance.alpha``).
    rounds : int
        T (``rounds``).

    ``info``: ``threshold`` (the radius used), ``round`` (t, or None when the caller gave none).
    """

    def __init__(self, gamma: float, kappa: float, alpha: float, rounds: int) -> None:
        if not gamma > 0:
            raise ValueError(f"balance: gamma must be > 0, got {gamma!r}")
        if not kappa >= 0:
            raise ValueError(f"balance: kappa must be >= 0, got {kappa!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"balance: alpha must lie in [0, 1], got {alpha!r}")
        if int(rounds) != rounds or rounds < 1:
            raise ValueError(f"balance: rounds must be a positive integer, got {rounds!r}")
        self.gamma, self.kappa, self.alpha, self.rounds = float(gamma), float(kappa), float(alpha), int(rounds)

    def threshold(self, own_norm: float, rnd: Optional[int], rounds: Optional[int] = None) -> float:
        """gamma exp(-kappa t / T) ||x_i|| (t = 0 when ``rnd`` is None; T = ``rounds``, else the rule's)."""
        return self.gamma * math.exp(-self.kappa * (rnd or 0) / (rounds or self.rounds)) * own_norm

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, _ = split_own(stack, own_index, weights)
        rnd = state.get("round")
        radius = self.threshold(float(own.double().norm()), rnd, state.get("rounds"))
        info = {"threshold": radius, "round": rnd}
        if neighbours.shape[0] == 0:
            return Aggregate(own.clone(), own_only(stack, own_index).kept, info=info)
        accepted = ((neighbours.double() - own.double()).norm(dim=1) <= radius).cpu()
        kept = torch.zeros(stack.shape[0], dtype=torch.bool)
        kept[own_index] = True
        kept[self_first(stack.shape[0], own_index)[1:][accepted]] = True
        if not bool(accepted.any()):
            return Aggregate(own.clone(), kept, info=info)
        mixed = self.alpha * own + (1 - self.alpha) * neighbours[accepted.to(neighbours.device)].mean(dim=0)
        return Aggregate(mixed, kept, info=info)
