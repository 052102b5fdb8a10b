"""Plain gossip averaging for decentralized FL, plus the shared input checks of the peer rules.

Paper: Xiangru Lian, Ce Zhang, Huan Zhang, Cho-Jui Hsieh, Wei Zhang, Ji Liu, "Can Decentralized
Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
Gradient Descent", NeurIPS 2017, arXiv:1705.09056 (D-PSGD).

Every peer rule in ``strategies/`` has the signature
``rule(own: Tensor[D], neighbours: Tensor[m, D], weights: Tensor[m+1] | None) -> Tensor[D]``:
``own`` is the node's model vector after local training, ``neighbours`` holds the models received this
round (one row per neighbour), and ``weights`` are the node's Metropolis–Hastings mixing weights
(index 0 = self, then the neighbours in row order), summing to 1. ``None`` means uniform weights.

Every rule also has ``apply(own, neighbours, weights) -> (new_own, NonFinite)``: the same result plus the
record of the NaN / inf vectors it left out (``strategies/finite.py``); ``rule(...)`` is ``apply(...)[0]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHT_TOL = 1e-4


def check_stack(own: Tensor, neighbours: Tensor) -> None:
    """Raise ValueError unless ``own`` is [D] and ``neighbours`` is [m, D] with the same D."""
    if own.dim() != 1:
        raise ValueError(f"own must be a 1-D model vector, got shape {tuple(own.shape)}")
    if neighbours.dim() != 2 or neighbours.shape[1] != own.shape[0]:
        raise ValueError(
            f"neighbours must have shape [m, {own.shape[0]}], got {tuple(neighbours.shape)}"
        )


def resolve_weights(weights: Tensor | None, m: int, like: Tensor) -> Tensor:
    """Return the [m+1] mixing weights (uniform when None), checked to be >= 0 and to sum to 1."""
    if weights is None:
        return torch.full((m + 1,), 1.0 / (m + 1), dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if weights.shape != (m + 1,):
        raise ValueError(f"weights must have shape [{m + 1}] (self first), got {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    total = float(weights.sum())
    if abs(total - 1.0) > _WEIGHT_TOL:
        raise ValueError(f"weights must sum to 1, got {total:.6f}")
    return weights


def renormalised_weights(weights: Tensor, keep_mask: Tensor) -> Tensor:
    """Zero the weights of dropped neighbours and rescale self + kept ones to sum to 1.

    The self weight (index 0) is always kept, so the result is well defined even when every
    neighbour is dropped (then the node keeps its own model). The dropped mass is shared among
    self and the kept neighbours in proportion to their weights, which keeps the rule a convex
    combination and never lets one remaining neighbour gain more than its proportional share.
    """
    keep = torch.as_tensor(keep_mask, dtype=torch.bool, device=weights.device)
    if keep.shape != (weights.shape[0] - 1,):
        raise ValueError(f"keep_mask must have shape [{weights.shape[0] - 1}], got {tuple(keep.shape)}")
    full = torch.cat([torch.ones(1, dtype=torch.bool, device=weights.device), keep])
    kept = torch.where(full, weights, torch.zeros_like(weights))
    total = kept.sum()
    if float(total) <= 0.0:
        # Self weight 0 and nothing kept: fall back to keeping the own model.
        kept = torch.zeros_like(weights)
        kept[0] = 1.0
        return kept
    return kept / total


def weighted_delta(own: Tensor, neighbours: Tensor, neighbour_weights: Tensor) -> Tensor:
    """Return ``sum_j w_j (x_j - own)`` over the rows of ``neighbours``."""
    if neighbours.shape[0] == 0:
        return torch.zeros_like(own)
    return neighbour_weights @ (neighbours - own)


class Gossip:
    """D-PSGD gossip averaging (Lian et al., "Can decentralized algorithms outperform centralized
    algorithms?", NeurIPS 2017): ``x_i <- sum_j w_ij x_j`` over self and neighbours.

    No parameters. Not robust: one bad neighbour moves the average without bound. Non-finite vectors
    are left out, weights renormalised (``strategies/finite.py``): a change from plain D-PSGD, where
    one NaN neighbour would make every model NaN.
    """


    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        from strategies.finite import split_finite  # finite.py builds on this module

        inp = split_finite(own, neighbours, weights)
        w = resolve_weights(inp.weights, inp.neighbours.shape[0], inp.own)
        # Written as own + weighted delta: identical math, and exact when all models are equal.
        return inp.own + weighted_delta(inp.own, inp.neighbours, w[1:]), inp.report

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]


def gossip_subset(
    own: Tensor, neighbours: Tensor, weights: Tensor | None, keep_mask: Tensor
) -> Tensor:
    """Gossip over self plus the neighbours with ``keep_mask[j] == True``, weights renormalised.

    Used by the rules that drop suspicious neighbours (EPIC on updates, Gradient Purification).
    """
    check_stack(own, neighbours)
    w = renormalised_weights(resolve_weights(weights, neighbours.shape[0], own), keep_mask)
    return own + weighted_delta(own, neighbours, w[1:])
