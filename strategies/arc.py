"""Adaptive robust clipping (ARC), a pre-aggregation step (``fedepic.extensions.PRE_AGGREGATION``,
``strategies/preaggregation.py``).

Paper: Youssef Allouah, Rachid Guerraoui, Nirupam Gupta, Ahmed Jellouli, Geovani Rizk, John Stephan,
"Boosting Robustness by Clipping Gradients in Distributed Learning", 2024, arXiv:2405.14432,
https://arxiv.org/abs/2405.14432 (ByzFL cites its earlier title, "The Vital Role of Gradient Clipping
in Byzantine-Resilient Distributed Learning").

Formula (ByzFL's ``ARC(f)``): with k = floor(2 (f / n) (n - f)) and the rows sorted by L2 norm,
||x_pi(1)|| >= ... >= ||x_pi(n)||, every row is clipped to the (k + 1)-th largest norm,

    ARC_f(x_1, ..., x_n) = ( min(1, ||x_pi(k+1)|| / ||x_i||) x_i )_{i = 1..n},

so the k largest rows are scaled down to that norm and the others are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedepic.vectors import finite_rows
from strategies.scclip import clip_rows


def clipped_count(n: int, f: int) -> int:
    """k = floor(2 (f / n) (n - f)), the rows ARC clips among n, in exact integer arithmetic."""
    return (2 * f * (n - f)) // n if n else 0


def adaptive_robust_clip(vectors: Tensor, f: int) -> Tensor:
    """ARC of the rows of ``vectors`` [n, D] assuming ``f`` Byzantine rows (0 <= f; f is capped at n)."""
    n = vectors.shape[0]
    if f < 0:
        raise ValueError(f"arc: f must be >= 0, got {f}")
    k = clipped_count(n, min(f, n))
    if k == 0:
        return vectors
    norms = torch.linalg.vector_norm(vectors, dim=1, dtype=torch.float64)
    order = torch.sort(norms.cpu(), stable=True).indices  # ascending, ties by row: ByzFL's list.sort
    largest = order[n - k:]
    threshold = float(norms[order[n - k - 1]])
    out = vectors.clone()
    rows = largest.to(vectors.device)
    out[rows] = clip_rows(vectors[rows], threshold, norms[rows].to(vectors.dtype).unsqueeze(1))
    return out


class AdaptiveRobustClipping:
    """ARC as a step (Allouah et al., 2024): the k = floor(2 f (n - f) / n) largest rows clipped to the
    (k + 1)-th largest norm.

    Example (f = 1 of n = 4: k = floor(2 * 3 / 4) = 1; the largest row, of norm 10, is clipped to the
    next norm, 5)::

        >>> x = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0], [0.0, 2.0]])
        >>> AdaptiveRobustClipping(1)(x)
        tensor([[3., 4.],
                [3., 4.],
                [1., 0.],
                [0., 2.]])

    Parameters
    ----------
    f : int
        The Byzantine rows assumed (``defense.byzantine``; null: ``fedepic.extensions.assumed_byzantine``).

    Cost: O(n D) for the norms and the clipping, O(n log n) for the order.

    Deviations: k is the exact integer floor; ByzFL computes ``int((2 * f / n) * (n - f))`` in floats,
    which falls one short where the product rounds below an integer (76 of the pairs n <= 2000,
    f <= n, e.g. n = 242, f = 33; tests/test_byzfl_rules.py). f above n is capped at n (ByzFL refuses
    it); n counts the finite rows: rows holding NaN / inf are left as they are and out of the norms
    (at a server the round engine hands the step finite rows only; a peer's stack may hold them). Norms
    in float64; the clipped rows are scaled in their own dtype.
    """

    def __init__(self, f: int) -> None:
        if int(f) != f or f < 0:
            raise ValueError(f"arc: f must be a non-negative integer, got {f!r}")
        self.f = int(f)

    def __call__(self, vectors: Tensor, /) -> Tensor:
        ok = finite_rows(vectors).to(vectors.device)
        if bool(ok.all()):
            return adaptive_robust_clip(vectors, self.f)
        out = vectors.clone()
        out[ok] = adaptive_robust_clip(vectors[ok], self.f)
        return out
