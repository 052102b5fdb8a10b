"""Non-finite inputs of the peer rules: a model vector holding NaN or +-inf is left out of the aggregate.

One NaN coordinate poisons every sum, sort and norm it enters (a NaN distance even switches SCClip's
adaptive radius off for everyone), so no rule lets such a vector in. The policy, shared by every peer
rule in ``strategies/`` (each docstring refers here):

- a neighbour row with any non-finite entry is dropped before the rule runs, like a rejected input;
  its mixing weight is removed and self + the kept neighbours are renormalised
  (``strategies.gossip.renormalised_weights``);
- a non-finite ``own`` (the node's training diverged) cannot be a centre or a row: it is replaced by
  the coordinate-wise median of the finite neighbours, which then plays own's part (self weight,
  centre of clipping and of updates). With no finite neighbour either, ``own`` is returned unchanged:
  there is no finite input to aggregate;
- what was dropped is returned in a ``NonFinite`` record (neighbour rows, and whether own was
  replaced), which the caller reports (``AggregationReport.nonfinite`` in simulations/dfl_node.py).

Example: own = [0, 0], neighbours = [[1, 0], [nan, 0], [inf, 1]] -> the rule sees neighbours [[1, 0]]
and ``NonFinite(rows=[1, 2], own=False).count == 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedepic.vectors import all_finite, finite_rows
from strategies.gossip import check_stack, renormalised_weights, resolve_weights
from strategies.median import coordinate_median


@dataclass(frozen=True)
class NonFinite:
    """What a rule left out because it held NaN / inf: neighbour rows (input order) and own."""

    rows: list[int] = field(default_factory=list)
    own: bool = False

    @property
    def count(self) -> int:
        return len(self.rows) + int(self.own)


@dataclass(frozen=True)
class FiniteInputs:
    """A rule's inputs with the non-finite vectors removed (see the module docstring).

    ``kept`` is the bool mask [m] of the original neighbour rows that remain in ``neighbours``;
    ``weights`` are self + kept renormalised ([m'+1]), or None when the caller gave None.
    """

    own: Tensor
    neighbours: Tensor
    weights: Tensor | None
    kept: Tensor
    report: NonFinite


def split_finite(own: Tensor, neighbours: Tensor, weights: Tensor | None) -> FiniteInputs:
    """Drop the non-finite neighbour rows and replace a non-finite ``own`` (module docstring)."""
    check_stack(own, neighbours)
    kept = finite_rows(neighbours)
    own_ok = all_finite(own)
    rows = (~kept).nonzero().flatten().tolist()
    finite = neighbours if not rows else neighbours[kept]  # no copy of the usual all-finite stack
    if not own_ok and finite.shape[0] > 0:
        own = coordinate_median(finite)
    new_weights = None
    if weights is not None:
        full = renormalised_weights(resolve_weights(weights, neighbours.shape[0], own), kept)
        new_weights = torch.cat([full[:1], full[1:][kept]])
    return FiniteInputs(own, finite, new_weights, kept, NonFinite(rows, not own_ok))


def expand_mask(kept: Tensor, inner: Tensor) -> Tensor:
    """A mask over the original m rows from a mask ``inner`` over the ``kept`` ones (dropped rows False)."""
    out = torch.zeros(kept.shape[0], dtype=torch.bool, device=inner.device)
    out[kept.to(inner.device)] = inner.bool()
    return out
