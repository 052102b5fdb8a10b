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
    if n <= SMALL_STACK and bool(torch.isfinite(stack.sum())):
        ordered = sorted_rows(stack)
    else:
        ordered = list(torch.sort(stack, dim=0).values)
    mid = n // 2
    if n % 2 == 1:
        return ordered[mid].clone()
    return (ordered[mid - 1] + ordered[mid]) / 2


SMALL_STACK = 16  # up to this many rows the sorting network below beats torch.sort along dim 0


def sorted_rows(stack: Tensor) -> list[Tensor]:
    """The rows of ``stack`` [n, D] sorted coordinate-wise, by odd-even transposition: n passes of
    elementwise min / max between neighbouring rows.

    Written here because ``torch.sort(dim=0)`` over a few rows of a long vector is slow on the CPU
    (17 ms for 6 x 235k floats, one thread, against about 3 ms here), and a node's neighbourhood is a
    few rows. Min and max only move values, so the result is exactly torch.sort's for finite input
    (NaN would propagate differently: callers pass finite stacks, ``coordinate_median`` checks).
    """
    rows = list(stack.unbind(0))
    n = len(rows)
    for step in range(n):
        for i in range(step % 2, n - 1, 2):
            low, high = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
            rows[i], rows[i + 1] = low, high
    return rows


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
