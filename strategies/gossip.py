"""Plain gossip averaging for decentralized FL, plus the shared input checks of the peer rules.

Paper: Xiangru Lian, Ce Zhang, Huan Zhang, Cho-Jui Hsieh, Wei Zhang, Ji Liu, "Can Decentralized
Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
Gradient Descent", NeurIPS 2017, arXiv:1705.09056 (D-PSGD).

Every peer rule in ``strategies/`` has the one signature of ``strategies/aggregate.py``::

    rule(stack: Tensor[n, D], own_index: int, weights: Tensor[n] | None, state: dict) -> Aggregate

``stack`` holds the node's own model vector after local training (row ``own_index``) and the models
received this round (the other rows, one per neighbour); ``weights`` are the node's
Metropolis–Hastings mixing weights per row (the self weight at ``own_index``), summing to 1, or None
for uniform weights. A rule assumes finite rows: call it through ``strategies.aggregate.aggregate``,
which applies the non-finite policy (rows dropped, weights renormalised, a non-finite own replaced).
The stateful rules (``GradientPurification``, ``ExcludeDetected``) too: they read the senders of the
rows from ``state["ids"]`` and keep their per-neighbour records in ``state``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, renormalised_weights, resolve_weights, self_first

__all__ = ["Gossip", "check_stack", "gossip_subset", "own_only", "renormalised_weights", "resolve_weights",
           "split_own", "weighted_delta"]


def check_stack(own: Tensor, neighbours: Tensor) -> None:
    """Raise ValueError unless ``own`` is [D] and ``neighbours`` is [m, D] with the same D."""
    if own.dim() != 1:
        raise ValueError(f"own must be a 1-D model vector, got shape {tuple(own.shape)}")
    if neighbours.dim() != 2 or neighbours.shape[1] != own.shape[0]:
        raise ValueError(
            f"neighbours must have shape [m, {own.shape[0]}], got {tuple(neighbours.shape)}"
        )


def split_own(stack: Tensor, own_index: Optional[int], weights: Optional[Tensor]
              ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A peer's ``stack`` [n, D] as (own [D], the other rows [n-1, D] in stack order, ``weights``
    reordered self first [n] or None). With own at row 0 (the callers' layout) the rows are views."""
    if own_index is None:
        raise ValueError("a peer rule needs own_index (the row of the node's own vector)")
    if stack.dim() != 2 or not 0 <= own_index < stack.shape[0]:
        raise ValueError(f"own_index {own_index} outside a stack of shape {tuple(stack.shape)}")
    if own_index == 0:
        return stack[0], stack[1:], weights
    order = self_first(stack.shape[0], own_index)
    w = None if weights is None else torch.as_tensor(weights)
    w = None if w is None else w[order.to(w.device)]
    return stack[own_index], stack[order[1:].to(stack.device)], w


def own_only(stack: Tensor, own_index: int) -> Aggregate:
    """The node keeps its own row: the vector a copy of it, only own kept."""
    kept = torch.zeros(stack.shape[0], dtype=torch.bool)
    kept[own_index] = True
    return Aggregate(stack[own_index].clone(), kept)


def weighted_delta(own: Tensor, neighbours: Tensor, neighbour_weights: Tensor) -> Tensor:
    """Return ``sum_j w_j (x_j - own)`` over the rows of ``neighbours``."""
    if neighbours.shape[0] == 0:
        return torch.zeros_like(own)
    return neighbour_weights @ (neighbours - own)


class Gossip:
    """D-PSGD gossip averaging (Lian et al., "Can decentralized algorithms outperform centralized
    algorithms?", NeurIPS 2017): ``x_i <- sum_j w_ij x_j`` over self and neighbours, computed as
    ``x_i + sum_{j != i} w_ij (x_j - x_i)`` (identical math, and exact when all models are equal).

    No parameters. Every row enters the sum (``kept`` all True). Not robust: one bad neighbour moves
    the average without bound. Through ``strategies.aggregate.aggregate`` non-finite vectors are left
    out and the weights renormalised: a change from plain D-PSGD, where one NaN neighbour would make
    every model NaN.

    Example::

        >>> out = Gossip()(torch.tensor([[0.0], [3.0], [6.0]]), 0, torch.tensor([0.5, 0.25, 0.25]), {})
        >>> out.vector, out.kept.tolist()
        (tensor([2.2500]), [True, True, True])
    """

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, w = split_own(stack, own_index, weights)
        w = resolve_weights(w, neighbours.shape[0], own)
        return Aggregate(own + weighted_delta(own, neighbours, w[1:]), torch.ones(stack.shape[0], dtype=torch.bool))


def gossip_subset(
    own: Tensor, neighbours: Tensor, weights: Tensor | None, keep_mask: Tensor
) -> Tensor:
    """Gossip over self plus the neighbours with ``keep_mask[j] == True``, weights renormalised.

    Used by the rules that drop suspicious neighbours (EPIC on updates, Gradient Purification).
    """
    check_stack(own, neighbours)
    w = renormalised_weights(resolve_weights(weights, neighbours.shape[0], own), keep_mask)
    return own + weighted_delta(own, neighbours, w[1:])
