"""Coordinate-wise trimmed mean (Byzantine-robust aggregation): the peer rule ``TrimmedMean`` and the
server rule ``TrimmedMeanRule``.

Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498. Deviation: b adapts to
small neighbourhoods (see ``TrimmedMean``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate
from strategies.median import sorted_columns, tail_shares


class TrimmedMean:
    """Coordinate-wise trimmed mean over own and the neighbours (Yin et al., ICML 2018), a peer rule of
    the one signature (``strategies/aggregate.py``).

    Parameters
    ----------
    b : int
        Values removed at each end per coordinate (the number of Byzantine neighbours tolerated;
        ``defense.trim``). ``b = 0`` is the plain (unweighted) mean.
    The mixing weights and ``own_index`` are ignored (unweighted, as in the paper; own is a row like
    the others). Every row is kept; ``shares`` is per row the share of its coordinates that fell in a cut
    tail (ties with a kept order statistic count as kept, ``strategies.median.tail_shares``).

    Small neighbourhoods (a change from the paper's fixed b, which assumes ``2b < n`` everywhere; node
    degrees in a graph differ, and a rule that refused to run at a low-degree node would stop the
    network): b is lowered to ``(n - 1) // 2`` at a node with n <= 2b models. Non-finite vectors are
    left out first (``strategies.aggregate.aggregate``), and n counts what remains.

    Same order statistics as the server's ``TrimmedMeanRule`` (whose f adapts the same way), another
    float32 rounding of their mean: the mean of the stacked middle rows here (the bits of
    ``torch.sort(...).values[b:n - b].mean``, as the peer rule always computed it), a sum of sorted rows
    divided by n - 2f there. Cost: the sort (``strategies.median.sorted_columns``) plus O(n D).

    Example: own = [0], neighbours = [[1], [2], [50]], b = 1: the values {0, 1, 2, 50} lose 0 and 50,
    so the result is [1.5]; with b = 2 (more than the 4 models allow) b is lowered to 1::

        >>> out = TrimmedMean(2)(torch.tensor([[0.0], [1.0], [2.0], [50.0]]), 0, None, {})
        >>> out.vector, out.shares.tolist()
        (tensor([1.5000]), [1.0, 0.0, 0.0, 1.0])
    """

    def __init__(self, b: int) -> None:
        if int(b) != b or b < 0:
            raise ValueError(f"trimmed_mean: b must be a non-negative integer, got {b!r}")
        self.b = int(b)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n = stack.shape[0]
        b = min(self.b, (n - 1) // 2)
        if 2 * b >= n:
            raise ValueError(f"trimmed_mean: 2*b = {2 * b} must be < the number of models n = {n}")
        ordered = sorted_columns(stack)  # the sorting network: the same order statistics as torch.sort, faster
        return Aggregate(torch.stack(ordered[b:n - b]).mean(dim=0), torch.ones(n, dtype=torch.bool),
                         tail_shares(stack, ordered, b))


class TrimmedMeanRule:
    """Coordinate-wise trimmed mean cutting exactly f per side, as a server rule of the one signature.

    Per coordinate j, with the n values sorted ``v_(1) <= ... <= v_(n)``:
    ``x_j = sum_{k=f+1}^{n-f} v_(k) / (n - 2f)``, ``f = min(num_trim, (n - 1) // 2)``: the f largest and
    f smallest values are dropped, the other n - 2f averaged. This is
    ``strategies.server.ExactTrimmedAvg`` (Flower's FedTrimmedAvg with its beta set so that exactly f
    are cut; fewer rows than 2f + 1 lower the cut instead of failing). Every finite row is kept;
    ``shares`` is per row the share of coordinates where its value fell in a cut tail (ties with the
    kept extremes count as kept; ``strategies.median.tail_shares``).

    Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018 (PMLR 80),
    https://proceedings.mlr.press/v80/yin18a.html (arXiv:1803.01498).

    Example (one cut per side)::

        >>> out = TrimmedMeanRule(1)(torch.tensor([[0.0], [1.0], [2.0], [50.0]]), None, None, {})
        >>> out.vector, out.shares.tolist()
        (tensor([1.5000]), [1.0, 0.0, 0.0, 1.0])

    Parameters
    ----------
    num_trim : int
        f, values cut per side and coordinate (``defense.trim``).

    Cost: the sort (``strategies.median.sorted_columns``) plus O(n D). ``weights`` and ``own_index``
    are ignored (unweighted, as in the paper and in Flower). Deviation from Flower: none; the mean of
    the middle values is a float32 sum of sorted rows, numpy's a float32 mean of a partitioned slice
    (same values, another summation order).
    """

    def __init__(self, num_trim: int) -> None:
        if int(num_trim) != num_trim or num_trim < 0:
            raise ValueError(f"trimmed_mean: num_trim must be a non-negative integer, got {num_trim!r}")
        self.num_trim = int(num_trim)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n = stack.shape[0]
        f = min(self.num_trim, (n - 1) // 2)
        if f == 0:
            return Aggregate(stack.mean(dim=0), torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64))
        ordered = sorted_columns(stack)
        vector = torch.stack(ordered[f:n - f]).sum(dim=0) / (n - 2 * f)
        return Aggregate(vector, torch.ones(n, dtype=torch.bool), tail_shares(stack, ordered, f))
