"""One signature for every aggregation rule, server or peer, and the non-finite policy in one place.

A rule is a pure torch function over a stack of vectors (ByzFL's shape of an aggregator)::

    rule(stack: Tensor[n, D], own_index: int | None, weights: Tensor[n] | None, state: dict) -> Aggregate

- ``stack`` holds the n received vectors (a server: the sampled clients' updates or models; a peer:
  its own vector and its neighbours'). A server rule (``fedepic.extensions.SERVER_RULES``) reads the
  rows as updates (model - global model, or per-step momenta) and returns the aggregated update; every
  registered one is translation-equivariant, weighting included (``strategies/mean.py``), so a stack of
  models gives the aggregated model and the same report.
- ``own_index`` is the receiver's own row at a peer, None at a server.
- ``weights`` are per-row weights (FedAvg's example counts, a peer's mixing weights), or None for
  equal weights. A rule that ignores them says so in its docstring.
- ``state`` is the rule's own memory across rounds (a plain dict the rule may update in place; it is
  what a checkpoint saves); stateless rules leave it alone.

The rule reports what it did in its :class:`Aggregate`: the vector, who it kept whole, for
coordinate-wise rules the share of each row's coordinates it cut, and (filled in by
:func:`aggregate`) which rows were left out for holding NaN or inf. Nothing downstream re-derives it.

:func:`aggregate` is the only place the non-finite policy lives: rows holding NaN or inf are removed
before the rule runs, the rule sees the finite rows only (weights and ``own_index`` remapped), and its
report is mapped back onto the original rows (a removed row: not kept, share 1.0, nonfinite). With no
finite row, the vector is None and the receiver keeps what it had. A non-finite own row at a peer is
removed like any other; the rule then runs with ``own_index=None``.

Example::

    >>> import torch
    >>> def mean(stack, own_index, weights, state):
    ...     return Aggregate(stack.mean(dim=0), kept=torch.ones(len(stack), dtype=torch.bool))
    >>> out = aggregate(mean, torch.tensor([[1.0], [3.0], [float("nan")]]))
    >>> out.vector, out.kept.tolist(), out.nonfinite.tolist()
    (tensor([2.]), [True, True, False], [False, False, True])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fedepic.vectors import finite_rows


@dataclass
class Aggregate:
    """What one aggregation produced.

    vector : [D], or None when no finite row was left (the receiver keeps its model).
    kept : bool [n], rows the rule used as a whole (a coordinate-wise rule keeps every finite row).
    shares : float [n] or None, per row the share of its coordinates a coordinate-wise rule cut.
    nonfinite : bool [n], rows left out for NaN / inf before the rule ran (set by :func:`aggregate`).
    info : anything else the rule reports (EPIC's medoids), plain data.
    """

    vector: Optional[Tensor]
    kept: Tensor
    shares: Optional[Tensor] = None
    nonfinite: Optional[Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def excluded(self) -> list[bool]:
        return (~self.kept).tolist()

    @property
    def nonfinite_count(self) -> int:
        return 0 if self.nonfinite is None else int(self.nonfinite.sum())


Rule = Callable[[Tensor, Optional[int], Optional[Tensor], dict], Aggregate]


def aggregate(rule: Rule, stack: Tensor, own_index: Optional[int] = None, weights: Optional[Tensor] = None,
              state: Optional[dict] = None) -> Aggregate:
    """``rule`` on the finite rows of ``stack`` [n, D], its report mapped back to all n rows (module
    docstring). Cost: one pass over the stack for the finiteness test, plus the rule."""
    n = stack.shape[0]
    state = {} if state is None else state
    finite = finite_rows(stack) if n else torch.zeros(0, dtype=torch.bool)
    if n == 0 or not bool(finite.any()):
        return Aggregate(None, torch.zeros(n, dtype=torch.bool), torch.ones(n) if n else None, ~finite)
    if bool(finite.all()):
        out = rule(stack, own_index, weights, state)
        out.nonfinite = torch.zeros(n, dtype=torch.bool)
        return out
    rows = finite.nonzero().flatten()
    position = {int(r): i for i, r in enumerate(rows)}
    inner = rule(stack[rows], position.get(own_index) if own_index is not None else None,
                 None if weights is None else weights[rows], state)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[rows] = inner.kept
    shares = None
    if inner.shares is not None:
        shares = torch.ones(n, dtype=inner.shares.dtype)
        shares[rows] = inner.shares
    return Aggregate(inner.vector, kept, shares, ~finite, inner.info)
