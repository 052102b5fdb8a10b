"""Federated Averaging as a server rule of the one signature (``strategies/aggregate.py``).

Paper: H. Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson, Blaise Agüera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017 (PMLR 54),
https://proceedings.mlr.press/v54/mcmahan17a.html.

The server rules (this module, ``median.MedianRule``, ``trimmed_mean.TrimmedMeanRule``,
``krum.KrumRule`` / ``MultiKrumRule``, ``bulyan.BulyanRule``, ``epic_updates.EpicRule``) all take a
stack of client **updates** (model - global model, or per-step momenta) and return the aggregated
**update**. Every one of them is translation-equivariant: adding the same vector g to every row adds g
to the result and leaves ``kept`` and ``shares`` unchanged (means with weights summing to one, order
statistics, and selections that depend only on pairwise distances or on distances to the
coordinate-wise median). A stack of models would therefore give the aggregated model, up to float32
rounding of ``g + u``, which can move near-ties; both backends hand the rules parameter updates
(``fedepic.server_rounds.parameter_updates``), as ``strategies.server.TrackedStrategy`` hands them to
Flower's strategies.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate


def weighted_mean(stack: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """``sum_i w_i x_i / sum_i w_i`` over the rows of ``stack`` [n, D] (equal weights when None).

    Computed as Flower's ``aggregate_arrayrecords`` computes it, so that both engines give the same bits:
    the factors ``w_i / sum(w)`` in Python floats (float64), each row times its factor in the stack's
    dtype, accumulated row by row in row order. One pass over the stack per row, no [n, D] temporary.
    The last bits matter: a few rounds of non-IID local training turn a one-ulp difference of the
    global model into points of final accuracy (docs/results/byzfl.md).

    >>> weighted_mean(torch.tensor([[0.0, 2.0], [4.0, 6.0]]), torch.tensor([3.0, 1.0]))
    tensor([1., 3.])
    """
    n = stack.shape[0]
    if n == 0:
        raise ValueError("weighted_mean needs at least one row")
    if weights is None:
        return stack.mean(dim=0)
    w = [float(x) for x in torch.as_tensor(weights, dtype=torch.float64).reshape(-1)]
    if len(w) != n or any(x < 0 for x in w) or not sum(w) > 0:
        raise ValueError(f"weights must be {n} non-negative values with a positive sum, got {w}")
    total = sum(w)
    out = stack[0] * (w[0] / total)
    for row, weight in zip(stack[1:], w[1:]):
        out += row * (weight / total)
    return out


class MeanRule:
    """FedAvg (McMahan et al., AISTATS 2017): the weighted mean of the updates.

    ``x = sum_i w_i u_i / sum_i w_i`` with ``w_i`` the clients' example counts (``weights``), or the
    plain mean when ``weights`` is None. Every row is kept; no coordinate is cut (``shares`` None).

    Example (weights 3 and 1)::

        >>> out = MeanRule()(torch.tensor([[0.0], [4.0]]), None, torch.tensor([3.0, 1.0]), {})
        >>> out.vector, out.kept.tolist()
        (tensor([1.]), [True, True])

    Cost: O(n D) time, O(D) extra memory. Deviation from Flower's FedAvg: none, to the bit
    (``weighted_mean`` does Flower's float32 arithmetic in Flower's order).
    Stateless; ``own_index`` is ignored (a server has none).
    """

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        return Aggregate(weighted_mean(stack, weights), torch.ones(stack.shape[0], dtype=torch.bool))
