"""Coordinate-wise median (Byzantine-robust aggregation): one rule, ``MedianRule``, for the server
(``SERVER_RULES["fedmedian"]``) and the peers (``PEER_RULES["median"]``, over own and the neighbours),
and one function, ``coordinate_median``, for every other median in the code (GP's centre, the
replacement of a non-finite own in ``strategies.aggregate.aggregate``).

Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498. Deviation: none (an
unweighted median; NaN / inf rows are left out first by ``strategies.aggregate.aggregate``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fedepic.vectors import row_shares

from strategies.aggregate import Aggregate


def coordinate_median(stack: Tensor) -> Tensor:
    """True coordinate-wise median of the rows of ``stack`` [n, D].

    For an even row count it returns the mean of the two middle values, not the lower one that
    ``torch.median`` gives, so the result is symmetric in the inputs (and ``np.median``'s, as Flower's
    FedMedian takes it). Sorting (``sorted_columns``) is used instead of ``torch.quantile``, which
    refuses inputs above 2**24 elements (ResNet-18 stacks exceed that).
    """
    if stack.shape[0] == 0:
        raise ValueError("coordinate_median needs at least one row")
    return middle(sorted_columns(stack))


def middle(ordered: list[Tensor]) -> Tensor:
    """The median from the coordinate-wise sorted rows ``ordered``: the middle row for an odd count,
    the mean of the two middle rows (rounded once) for an even one."""
    n, mid = len(ordered), len(ordered) // 2
    return ordered[mid].clone() if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


SMALL_STACK = 16  # up to this many rows the sorting network below beats torch.sort along dim 0


def sorted_rows(stack: Tensor) -> list[Tensor]:
    """The rows of ``stack`` [n, D] sorted coordinate-wise, by odd-even transposition: n passes of
    elementwise min / max between neighbouring rows.

    Written here because ``torch.sort(dim=0)`` over a few rows of a long vector is slow on the CPU
    (measured: docs/results/engines.md), and a node's neighbourhood is a
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


NETWORK_ROWS = 64  # finite stacks up to this many rows: the sorting network, else torch.sort


def sorted_columns(stack: Tensor) -> list[Tensor]:
    """The rows of ``stack`` [n, D] sorted coordinate-wise, for the server rules (finite stacks, as
    ``strategies.aggregate.aggregate`` passes them). Up to ``NETWORK_ROWS`` rows the sorting network
    ``sorted_rows`` (n passes of O(n D) min / max), which measured faster than ``torch.sort(dim=0)``
    well beyond ``SMALL_STACK`` on the 2-core CPU (docs/results/engines.md; the rules stay in torch, not numpy)."""
    if stack.shape[0] <= NETWORK_ROWS and bool(torch.isfinite(stack.sum())):
        return sorted_rows(stack)
    return list(torch.sort(stack, dim=0).values)


def tail_shares(stack: Tensor, ordered: list[Tensor], cut: int) -> Tensor:
    """Per row of ``stack`` [n, D], the share of its coordinates below the ``cut``-th smallest or above
    the ``cut``-th largest value of the column (``ordered`` is ``sorted_columns(stack)``): the values a
    rule keeping the middle ``n - 2 cut`` order statistics did not average. Ties with a kept order
    statistic count as kept; float64 shares [n]."""
    n, d = stack.shape
    if cut == 0 or n == 0 or d == 0:
        return torch.zeros(n, dtype=torch.float64)
    tails = (stack < ordered[cut]) | (stack > ordered[n - cut - 1])
    return row_shares(tails)


class MedianRule:
    """Coordinate-wise median as a rule of the one signature, server and peer (Yin et al., ICML 2018;
    Flower's FedMedian).

    ``x_j = median_i u_ij`` per coordinate j; for an even n the mean of the two middle values, as
    ``np.median`` (Flower's FedMedian) takes it. Every finite row is kept; ``shares`` reports per row the
    share of coordinates where it is not one of the middle value(s) that make the median (ties with a
    middle value count as used), i.e. the trimmed mean's shares with (n - 1) // 2 cut per side.

    Paper: Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018 (PMLR 80),
    https://proceedings.mlr.press/v80/yin18a.html (arXiv:1803.01498).

    Example::

        >>> out = MedianRule()(torch.tensor([[0.0, 5.0], [1.0, 1.0], [2.0, 0.0], [100.0, 2.0]]), None, None, {})
        >>> out.vector, out.kept.tolist(), out.shares.tolist()
        (tensor([1.5000, 1.5000]), [True, True, True, True], [1.0, 0.0, 0.5, 0.5])

    At a peer (``PEER_RULES["median"]``) the stack is own and the neighbours, and the rule is the same:
    own is one row of the median like the others (the mixing weights are ignored, as in the paper).

    Cost: the sort (``sorted_columns``: O(n^2 D) min / max for n <= 64, else O(D n log n)) plus O(n D)
    for the shares. ``weights`` are ignored (the median is unweighted, as in the paper and in Flower);
    ``own_index`` too. Deviation from Flower: none; float32 arithmetic as numpy's on float32 arrays
    (the mean of the two middle values is rounded once in both). Stateless.
    """

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        ordered = sorted_columns(stack)
        return Aggregate(middle(ordered), torch.ones(stack.shape[0], dtype=torch.bool),
                         tail_shares(stack, ordered, (stack.shape[0] - 1) // 2))
