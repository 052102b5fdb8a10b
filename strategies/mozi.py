"""MOZI / UBAR without its performance stage, a peer rule of the one signature (``strategies/aggregate.py``).

Papers: Shangwei Guo, Tianwei Zhang, Xiaofei Xie, Lei Ma, Tao Xiang, Yang Liu, "Towards Byzantine-resilient
Learning in Decentralized Systems", arXiv:2002.08569, 2020 (MOZI), https://arxiv.org/abs/2002.08569; and
Shangwei Guo, Tianwei Zhang, Han Yu, Xiaofei Xie, Lei Ma, Tao Xiang, Yang Liu, "Byzantine-resilient
Decentralized Stochastic Gradient Descent", IEEE Transactions on Circuits and Systems for Video Technology
(TCSVT) 2021 (UBAR; link not verified here). (Author lists as remembered; the issue's brief
names "Guo, Zhang, Wang, Hu, Chen, Zhang".)

Read as ClippedGossip's code implements it (He, Karimireddy, Jaggi, ``epfml/byzantine-robust-decentralized-
optimizer``, ``codes/aggregator.py``, class ``Mozi``), which the issue names as the reference::

    # Step 1: compute distance
    dist2i = sorted(((i, ||x_i - v||) for i, v in enumerate(neighbor_inputs)), key=distance)
    ns = dist2i[: int(self.rho * len(neighbor_inputs))]          # stage 1: the closest rho share
    ...
    for j, v in ns:
        if i_loss >= neighbor_losses[j]:                         # stage 2: loss on own batch <= own loss
            nr.append(j)
    if len(nr) == 0:
        nr = [dist2i[0][0]]                                      # fallback: the closest neighbour
    avg_nr = sum(neighbor_inputs[j] for j in nr) / len(nr)
    output = self.alpha * local_inputs + (1 - self.alpha) * avg_nr - self.lr * grad

This module implements stage 1 and the mixing:

    N_s = the floor(rho m) neighbours closest to x_i (Euclidean),   N_r = N_s, or {the closest} if N_s is empty,
    x_i <- alpha x_i + (1 - alpha) mean_{j in N_r} x_j.

Example (own [0]; neighbours 0.1, -0.3, 5; rho = 0.7 keeps floor(2.1) = 2, the two closest)::

    >>> import torch
    >>> out = MoziStageOne(0.7, 0.5)(torch.tensor([[0.0], [0.1], [-0.3], [5.0]]), 0, None, {})
    >>> out.kept.tolist(), out.vector
    ([True, True, True, False], tensor([-0.0500]))

Cost: O(m D) for the distances and the mean, O(m log m) for the sort; O(D) extra memory.

Deviations (this is "MOZI without its performance stage"):
- **Stage 2 is missing.** It needs each kept neighbour's loss on the node's own minibatch, i.e. the
  node's model, data and loss function inside the rule. The one rule signature carries vectors only,
  and the peer engines call stateless rules with a fresh ``state`` (``fedepic/peer_node.py``'s
  ``peer_aggregate``), which the issue asks not to edit while those files move; a ``loss`` callable
  placed in ``state`` by the node would be the smallest hook, and it needs that edit. Without stage 2
  a neighbour that is close to own but worse on own data (a subtle poison) is kept.
- ``- lr * grad``, the code's local step, is not part of the rule: fedepic's D-PSGD trains before it
  aggregates (``fedepic/peer_node.py``).
- ``weights`` are ignored (the code averages N_r equally and weighs own by alpha). Ties of distance go
  to the lower row (a stable sort). Non-finite neighbours are left out first
  (``strategies.aggregate.aggregate``), and m counts the finite ones.
- Defaults (``defense.mozi``): rho 0.4, alpha 0.5, ClippedGossip's runs (``aggmozi0.4,0.5``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, self_first
from strategies.gossip import own_only, split_own


class MoziStageOne:
    """MOZI / UBAR's distance stage and mixing at one node (module docstring).

    Parameters
    ----------
    rho : float
        The share of neighbours stage 1 keeps, the closest ones (``defense.mozi.rho``).
    alpha : float
        The weight of the node's own model (``defense.mozi.alpha``).

    ``info``: ``selected`` (the rows of N_r, closest first).
    """

    def __init__(self, rho: float, alpha: float) -> None:
        if not 0 <= rho <= 1:
            raise ValueError(f"mozi: rho must lie in [0, 1], got {rho!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"mozi: alpha must lie in [0, 1], got {alpha!r}")
        self.rho, self.alpha = float(rho), float(alpha)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, _ = split_own(stack, own_index, weights)
        m = neighbours.shape[0]
        if m == 0:
            return own_only(stack, own_index)
        order = torch.sort((neighbours.double() - own.double()).norm(dim=1).cpu(), stable=True).indices
        chosen = order[:max(1, int(self.rho * m))]
        rows = self_first(stack.shape[0], own_index)[1:][chosen]
        kept = torch.zeros(stack.shape[0], dtype=torch.bool)
        kept[own_index] = True
        kept[rows] = True
        mixed = self.alpha * own + (1 - self.alpha) * neighbours[chosen.to(neighbours.device)].mean(dim=0)
        return Aggregate(mixed, kept, info={"selected": rows.tolist()})
