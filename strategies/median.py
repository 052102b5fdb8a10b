"""Coordinate-wise median as a decentralized peer rule (Byzantine-robust aggregation).

Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498. Deviation: none (an
unweighted median over own and the neighbours; NaN / inf rows are left out first, strategies/finite.py).
"""

from __future__ import annotations

import torch
from torch import Tensor



def coordinate_median(stack: Tensor) -> Tensor:
    """True coordinate-wise median of the rows of ``stack`` [n, D].

    For an even row count it returns the mean of the two middle values, not the lower one that
    ``torch.median`` gives, so the result is symmetric in the inputs. Sorting is used instead of
    ``torch.quantile``, which refuses inputs above 2**24 elements (ResNet-18 stacks exceed that).
    """
    n = stack.shape[0]
    if n == 0:
        raise ValueError("coordinate_median needs at least one row")
    ordered = torch.sort(stack, dim=0).values
    mid = n // 2
    if n % 2 == 1:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


class CoordinateMedian:
    """Coordinate-wise median over ``{own} ∪ neighbours`` (Yin et al., ICML 2018).

    No parameters. The mixing weights are ignored: the median is unweighted, as in the paper.
    Even counts use the true median (mean of the two middle values). Non-finite vectors are left out
    before the median is taken (``strategies/finite.py``); torch would sort NaN above every number.
    """


    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        from strategies.finite import split_finite  # finite.py builds on this module

        inp = split_finite(own, neighbours, None)
        return coordinate_median(torch.cat([inp.own.unsqueeze(0), inp.neighbours])), inp.report

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]
