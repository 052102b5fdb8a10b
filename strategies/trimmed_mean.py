"""Coordinate-wise trimmed mean as a decentralized peer rule (Byzantine-robust aggregation).

Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498. Deviation: b adapts to
small neighbourhoods (see ``TrimmedMean``).
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
    b : int
        Values removed at each end per coordinate (the number of Byzantine neighbours tolerated;
        ``defense.trim``). ``b = 0`` is the plain (unweighted) mean.
    The mixing weights are ignored (unweighted, as in the paper).

    Small neighbourhoods (a change from the paper's fixed b, which assumes ``2b < n`` everywhere; node
    degrees in a graph differ, and a rule that refused to run at a low-degree node would stop the
    network): b is lowered to ``(n - 1) // 2`` at a node with n <= 2b models. Non-finite vectors are
    left out first (``strategies/finite.py``), and n counts what remains.

    Example: own = [0], neighbours = [[1], [2], [50]], b = 1: the values {0, 1, 2, 50} lose 0 and 50,
    so the result is [1.5]; with b = 2 (more than the 4 models allow) b is lowered to 1.
    """


    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        check_stack(own, neighbours)
        inp = split_finite(own, neighbours, None)
        stack = torch.cat([inp.own.unsqueeze(0), inp.neighbours])
        return trimmed_mean(stack, min(self.b, (stack.shape[0] - 1) // 2)), inp.report

    def __init__(self, b: int) -> None:
        if int(b) != b or b < 0:
            raise ValueError(f"trimmed_mean: b must be a non-negative integer, got {b!r}")
        self.b = int(b)

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]
