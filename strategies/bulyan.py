"""Bulyan as Flower computes it, a server rule of the one signature (``strategies/aggregate.py``).

Paper: El Mahdi El Mhamdi, Rachid Guerraoui, Sébastien Rouault, "The Hidden Vulnerability of
Distributed Learning in Byzantium", ICML 2018 (PMLR 80), https://proceedings.mlr.press/v80/mhamdi18a.html
(arXiv:1802.07927).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fedepic.vectors import row_shares

from strategies.aggregate import Aggregate
from strategies.krum import lowest_scores, multikrum_scores
from strategies.median import sorted_columns


def closest_to_median(selected: Tensor, beta: int) -> tuple[Tensor, Tensor]:
    """Per coordinate of ``selected`` [t, D]: the mean of the ``beta`` values closest to the coordinate-wise
    median (``np.median``'s: the mean of the two middle values for even t), and per row the share of
    coordinates where its distance to the median exceeds the beta-th smallest one (it was not averaged
    there; ties count as kept).

    The beta values closest to a point form a contiguous run of the sorted column, so the run is grown
    from the middle one value at a time, each step taking the nearer of the two neighbours of the run
    (the lower one on a tie): beta - 1 gathers of D values instead of a sort of the [t, D] distances.
    The distances ``med - v`` and ``v - med`` are the float32 values of Flower's ``np.abs(v - med)``, so
    the values averaged are Flower's except where two distances are exactly equal at the edge of the
    run (Flower's ``np.argpartition`` then picks either). Returns (vector [D], shares float64 [t]).

    >>> closest_to_median(torch.tensor([[0.0], [1.0], [1.5], [4.0], [9.0]]), 3)
    (tensor([0.8333]), tensor([0., 0., 0., 1., 1.], dtype=torch.float64))
    """
    t, d = selected.shape
    ordered = torch.stack(sorted_columns(selected))
    mid = t // 2
    median = ordered[mid] if t % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    low = torch.full((1, d), mid - 1 + t % 2, dtype=torch.long)  # the run [low, high] of sorted rows
    high = torch.full((1, d), mid, dtype=torch.long)
    total = ordered[mid].clone() if t % 2 else ordered[mid - 1] + ordered[mid]
    inf = torch.tensor(float("inf"), dtype=selected.dtype)
    for _ in range(beta - (1 if t % 2 else 2)):
        below = ordered.gather(0, (low - 1).clamp(min=0))[0]
        above = ordered.gather(0, (high + 1).clamp(max=t - 1))[0]
        gap_below = torch.where(low[0] > 0, median - below, inf)
        gap_above = torch.where(high[0] < t - 1, above - median, inf)
        take_below = gap_below <= gap_above
        total += torch.where(take_below, below, above)
        low -= take_below.long()
        high += (~take_below).long()
    limit = torch.maximum(median - ordered.gather(0, low)[0], ordered.gather(0, high)[0] - median)
    shares = row_shares((selected - median).abs() > limit)
    return total / beta, shares


class BulyanRule:
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018) as Flower's Bulyan computes it.

    With n rows and f = ``num_malicious_nodes`` (needs n >= 4f + 3): theta = n - 2f rows are selected by
    Multi-Krum (the theta lowest Krum scores, each over the row's max(1, n - f - 2) nearest others:
    Flower's ``select_multikrum(contents, f, theta)``); then per coordinate the beta = theta - 2f values
    of the selected rows closest to their coordinate-wise median are averaged::

        x_j = mean of the beta values v in {u_ij : i selected} with smallest |v - median_i u_ij|

    ``kept`` is the selected set; ``shares`` per row the share of coordinates it did not contribute to
    (1.0 for rows Multi-Krum left out; ``closest_to_median`` for the others). With fewer than 4f + 3
    rows Flower skips the round: the vector is None (the receiver keeps its model) and no row is kept.

    Example (f = 0: theta = beta = n, every row's value is averaged)::

        >>> out = BulyanRule(0)(torch.tensor([[0.0], [1.0], [5.0]]), None, None, {})
        >>> out.vector, out.kept.tolist(), out.shares.tolist()
        (tensor([2.]), [True, True, True], [0.0, 0.0, 0.0])

    Parameters
    ----------
    num_malicious_nodes : int
        f (``defense.byzantine``, capped at (n - 3) // 4 of the expected clients by the registry).

    Cost: O(n^2 D) for the distances, the sort of the theta selected rows (``sorted_columns``) and
    O(beta D) for the run. ``weights`` are ignored (Flower's Bulyan averages unweighted); so is
    ``own_index``; stateless. Deviations from Flower: the Multi-Krum distances in float64 from exact
    differences (``strategies.krum.exact_sq_distances``); exact ties at the edge of a coordinate's run
    go to the lower value (Flower's ``np.argpartition``: either); the mean is a float32 running sum in
    the run's order (numpy: float32 mean in argpartition's order).
    """

    def __init__(self, num_malicious_nodes: int) -> None:
        if int(num_malicious_nodes) != num_malicious_nodes or num_malicious_nodes < 0:
            raise ValueError(f"bulyan: num_malicious_nodes must be a non-negative integer, got {num_malicious_nodes!r}")
        self.num_malicious_nodes = int(num_malicious_nodes)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n, f = stack.shape[0], self.num_malicious_nodes
        if n < 4 * f + 3:
            return Aggregate(None, torch.zeros(n, dtype=torch.bool), None, info={"skipped": f"n = {n} < 4f + 3"})
        theta = n - 2 * f
        scores = multikrum_scores(stack, f)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[lowest_scores(scores, theta)] = True
        rows = kept.nonzero().flatten()
        vector, selected_shares = closest_to_median(stack[rows], theta - 2 * f)
        shares = torch.ones(n, dtype=torch.float64)
        shares[rows] = selected_shares
        return Aggregate(vector, kept, shares, info={"scores": scores.tolist()})
