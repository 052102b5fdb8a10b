"""Pre-aggregation steps: transforms of the stacked input vectors that run before any aggregation rule.

Small callables over a stack [n, D] (ByzFL's style), with no framework inside, so the same step serves
a peer rule (``PreAggregated``, over {own} ∪ neighbours' models) and the server, where it transforms
the clients' updates before the rule aggregates them (``fedepic.server_rounds.pre_aggregate_updates``).
The steps are the registry ``fedepic.extensions.PRE_AGGREGATION``: one class and one entry each.

- **Nearest-neighbour mixing** (NNM). Paper: Youssef Allouah, Sadegh Farhadkhani, Rachid Guerraoui,
  Nirupam Gupta, Rafael Pinot, John Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine ML
  under Heterogeneity", AISTATS 2023, arXiv:2302.01772. Each vector is replaced by the average of its
  n - f nearest neighbours in Euclidean distance, itself included:

      y_i = 1 / (n - f) * sum_{j in N_i} x_j,   N_i = the n - f indices j closest to x_i (||x_j - x_i||)

  Ties are broken by index (the stable order of ``torch.sort``), so the result is deterministic.

- **Static clipping**: ``x_i <- x_i * min(1, c / ||x_i||)`` (the fixed-radius clipping the robust
  aggregation literature applies to updates before averaging, e.g. ByzFL's ``Clipping``).

Example::

    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [10.0]])
    >>> nearest_neighbor_mixing(x, f=1)      # each row: the mean of itself and its nearest neighbour
    tensor([[0.5000],
            [0.5000],
            [5.5000]])
    >>> static_clip(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, Rule


Step = Callable[[Tensor], Tensor]


def nearest_neighbor_mixing(vectors: Tensor, f: int) -> Tensor:
    """NNM of the rows of ``vectors`` [n, D] assuming ``f`` Byzantine rows (0 <= f < n)."""
    n = vectors.shape[0]
    if not 0 <= f < n:
        raise ValueError(f"nnm: f must lie in [0, n={n}), got {f}")
    if f == 0 or n == 1:
        return vectors.mean(dim=0, keepdim=True).expand_as(vectors).clone()
    wide = vectors.double()  # distances in float64: near-ties keep their order
    nearest = torch.sort(torch.cdist(wide, wide), dim=1, stable=True).indices[:, : n - f]
    # one row at a time: the same reduction as vectors[nearest].mean(dim=1), bit for bit on the CPU
    # (torch 2.14; tested), without gathering all n x (n - f) rows at once: O(n (n - f) D) reads, O(D)
    # scratch per row instead of O(n (n - f) D) (docs/results/engines.md)
    return torch.stack([vectors[rows].mean(dim=0) for rows in nearest])


def static_clip(vectors: Tensor, c: float) -> Tensor:
    """Rows of ``vectors`` [n, D] scaled to an L2 norm of at most ``c`` (> 0)."""
    if not c > 0:
        raise ValueError(f"clip: the radius must be > 0, got {c}")
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors * torch.clamp(c / norms.clamp_min(torch.finfo(vectors.dtype).tiny), max=1.0)


class NearestNeighborMixing:
    """NNM as a step: ``nearest_neighbor_mixing`` with f capped at the rows it gets minus one."""

    def __init__(self, f: int) -> None:
        self.f = int(f)

    def __call__(self, vectors: Tensor, /) -> Tensor:
        return nearest_neighbor_mixing(vectors, min(self.f, max(vectors.shape[0] - 1, 0)))


class StaticClip:
    """Static clipping as a step: ``static_clip`` at radius ``c``."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def __call__(self, vectors: Tensor, /) -> Tensor:
        return static_clip(vectors, self.c)


class PreAggregated:
    """A peer rule of the one signature (``strategies/aggregate.py``) whose input stack (own and the
    neighbours) first goes through ``steps``; ``rule`` is a rule of the same signature.

    In a decentralized node the own vector is a row like the others (NNM mixes it too, as at a
    server), and it stays at ``own_index``. ``f`` of NNM is capped at ``rows - 1`` where a
    neighbourhood is small. The transformed stack goes to ``rule`` through
    ``strategies.aggregate.aggregate`` again: a step can overflow a row to inf, and the weights are
    renormalised over the rows the rule then gets (as the wrapper always did). The report is the inner
    rule's (rows of the same stack; a row that only the steps made non-finite is marked not kept and,
    in ``info["nonfinite_after_steps"]``, listed). Stateful rules (GP, exclude) keep per-neighbour
    records of what they received, so they are not wrapped.

    A step that depends on the call (bucketing's permutation: the round and the receiving node) has a
    ``for_call(state)`` method; the wrapper binds it to the rule's ``state`` for each call
    (``fedepic.peer_node.rule_context`` fills it) before the stack goes through.
    """

    def __init__(self, rule: Rule, steps: Sequence[Step]) -> None:
        self.rule, self.steps = rule, list(steps)

    def transform(self, stack: Tensor, state: Optional[dict] = None) -> Tensor:
        """``stack`` [n, D] through the steps in order, each bound to the call's ``state`` where it
        depends on it (``for_call``)."""
        for step in self.steps:
            bind = getattr(step, "for_call", None)
            stack = (bind(state or {}) if bind is not None else step)(stack)
        return stack

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        from strategies.aggregate import aggregate

        inner = aggregate(self.rule, self.transform(stack, state), own_index, weights, state)
        info = dict(inner.info)
        if inner.nonfinite is not None and bool(inner.nonfinite.any()):
            info["nonfinite_after_steps"] = inner.nonfinite.nonzero().flatten().tolist()
        return Aggregate(inner.vector, inner.kept, inner.shares, None, info)
