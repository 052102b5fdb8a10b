"""The dissensus attack on decentralized learning: the Byzantine neighbours of a node pull it away from
its benign neighbours, against the direction gossip would move it.

Paper: Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust decentralized learning via
ClippedGossip", arXiv:2202.01545, 2022 (https://arxiv.org/abs/2202.01545); code
``epfml/byzantine-robust-decentralized-optimizer`` (``codes/attacks.py``, ``DissensusWorker``).

For a benign receiver i with model x_i, benign neighbours j and Byzantine neighbours k, with gossip
weights w (Metropolis-Hastings, the same as fedepic's gossip), every Byzantine neighbour sends

    x_i - eps * sum_{benign j} w_ij (x_j - x_i) / sum_{byzantine k} w_ik,

so that under gossip the Byzantine terms cancel eps times the benign pull: the receiver moves by
(1 - eps) times the benign disagreement, away from consensus when eps > 1. The authors' code computes
``tm - epsilon * partial_sum / partial_byz_weights`` with ``partial_sum = sum w (nm - tm)`` over the
target's benign neighbours and ``partial_byz_weights`` the target's weights of its Byzantine ones.

Example (receiver 0, two benign neighbours at 1 and 3 of weight 1/4, one Byzantine of weight 1/4,
eps = 1: 0 - (1/4 + 3/4) / (1/4) = -4)::

    >>> import torch
    >>> dissensus(torch.tensor([[1.0], [3.0]]), torch.zeros(1), None, epsilon=1.0, receiver=torch.zeros(1),
    ...           honest_weights=torch.tensor([0.25, 0.25]), byzantine_weight=0.25)
    tensor([-4.])

Cost: O(m D) per receiver. Deviations: the attack is crafted per receiver (fedepic's router gives each
benign neighbour its own model for this attack, whatever ``attack.per_neighbour``; in the authors'
code each Byzantine node has one target); the weights are fedepic's Metropolis-Hastings gossip
weights whatever the peer rule (the authors' code falls back to 1 / (degree + 1) for non-gossip
rules); the benign neighbours holding NaN / inf are left out of the sum (the router does not pass
them); ``eps`` (``attack.dissensus_eps``) defaults to 1.0, a fedepic choice. Without a receiver
(called outside the router) there is nothing to pull against and the attacker sends its own vector;
the config refuses it in mode=federated.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fedepic.attacks.model_attacks import finite_inputs
from fedepic.vectors import all_finite


@finite_inputs
def dissensus(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, epsilon: float,
              receiver: Optional[Tensor] = None, honest_weights: Optional[Tensor] = None,
              byzantine_weight: Optional[float] = None) -> Tensor:
    """``receiver - eps * sum_j w_j (h_j - receiver) / byzantine_weight`` (module docstring); ``honest``
    are the receiver's benign neighbours, ``honest_weights`` its gossip weights for them."""
    if receiver is None or not all_finite(receiver) or not byzantine_weight:
        return own.clone()
    if honest.shape[0] == 0:
        return receiver.clone()
    weights = torch.full((honest.shape[0],), 1.0 / (honest.shape[0] + 1)) if honest_weights is None \
        else honest_weights
    if weights.shape != (honest.shape[0],):
        raise ValueError(f"dissensus: {tuple(weights.shape)} weights for {honest.shape[0]} honest rows")
    pull = (weights.to(honest.dtype)[:, None] * (honest - receiver)).sum(dim=0)
    return receiver - epsilon * pull / byzantine_weight
