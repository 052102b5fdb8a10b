"""Coordinate-wise trimmed mean as a decentralized peer rule (Byzantine-robust aggregation).

Reference: Yin, Chen, Ramchandran, Bartlett, "Byzantine-robust distributed learning: towards optimal
statistical rates", ICML 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor

from strategies.finite import split_finite
from strategies.gossip import check_stack


def trimmed_mean(stack: Tensor, b: int) -> Tensor:
    """Per coordinate, drop the ``b`` largest and ``b`` smallest of the n rows and average the rest."""
    n = stack.shape[0]
    if 2 * b >= n:
        raise ValueError(f"trimmed_mean: 2*b = {2 * b} must be < the number of models n = {n}")
    ordered = torch.sort(stack, dim=0).values
    return ordered[b : n - b].mean(dim=0)


class TrimmedMean:
    """Coordinate-wise trimmed mean over ``{own} ∪ neighbours`` (Yin et al., ICML 2018).

    Parameters
    ----------
    b: number of values removed at each end per coordinate (the number of Byzantine neighbours
       tolerated). Needs ``2*b < m + 1``; otherwise a ValueError is raised at call time, since the
       neighbourhood size is known only then. ``b = 0`` is the plain (unweighted) mean.
    The mixing weights are ignored (unweighted, as in the paper).

    Non-finite vectors are left out first (``strategies/finite.py``); if that leaves n' <= 2b models,
    b is lowered to ``(n' - 1) // 2`` for the call (a change from the paper's fixed b: the dropped
    vectors were rejected already, and refusing would stop the node).
    """

    needs_keep_mask = False
    needs_state = False

    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        check_stack(own, neighbours)
        if 2 * self.b >= neighbours.shape[0] + 1:
            raise ValueError(f"trimmed_mean: 2*b = {2 * self.b} must be < the number of models n = "
                             f"{neighbours.shape[0] + 1}")
        inp = split_finite(own, neighbours, None)
        stack = torch.cat([inp.own.unsqueeze(0), inp.neighbours])
        return trimmed_mean(stack, min(self.b, (stack.shape[0] - 1) // 2)), inp.report

    def __init__(self, b: int = 1) -> None:
        if int(b) != b or b < 0:
            raise ValueError(f"trimmed_mean: b must be a non-negative integer, got {b!r}")
        self.b = int(b)

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]
