"""MoNNA, the mean of the n - f nearest neighbours of a trusted vector: a peer rule and a server rule of the
one signature (``strategies/aggregate.py``).

Paper: Sadegh Farhadkhani, Rachid Guerraoui, Nirupam Gupta, Lê-Nguyên Hoang, Rafael Pinot, John Stephan,
"Robust Collaborative Learning with Linear Gradient Overhead", ICML 2023 (PMLR 202, 9761-9813),
https://proceedings.mlr.press/v202/farhadkhani23a.html (arXiv:2209.10931).

Formula (ByzFL's ``MoNNA(f, idx)``): with r the trusted reference vector,

    MoNNA_f(x_1, ..., x_n; r) = 1 / (n - f) * sum_{j in N(r)} x_j,
    N(r) = the n - f indices j with the smallest ||x_j - r||_2.

At a peer r is the node's own vector, one of the n rows (ByzFL's ``idx`` is the row of the trusted
vector, "the ID of a vector that is trusted to be correct": fedepic's ``own_index``), so it is always
among its own nearest neighbours.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, saved_vector, self_first

REFERENCE = "reference"  # the server rule's state key: the previous round's aggregate


def nearest_rows(stack: Tensor, reference: Tensor, count: int, order: Optional[Tensor] = None) -> Tensor:
    """The ``count`` rows of ``stack`` [n, D] nearest to ``reference`` [D] (Euclidean, in float64), as
    row indices, nearest first; equal distances go to the row earlier in ``order`` (default: row order)."""
    order = torch.arange(stack.shape[0]) if order is None else order
    rows = stack[order.to(stack.device)]
    distances = (rows.double() - reference.double()).norm(dim=1)
    return order[torch.sort(distances.cpu(), stable=True).indices[:count]]


def capped_f(f: int, n: int) -> int:
    """f lowered to (n - 1) // 2 where n rows cannot hold 2 f < n (ByzFL refuses 2 f >= n)."""
    return min(f, (n - 1) // 2)


class MoNNARule:
    """MoNNA (Farhadkhani et al., ICML 2023): the plain mean of the n - f rows nearest to a trusted vector.

    At a peer (``own_index`` set) the trusted vector is own, a row of the stack: the rule is ByzFL's
    ``MoNNA(f, idx=own_index)``, own wins every tie of distance (it is scored first). At a server
    (``own_index`` None), where the paper defines no trusted vector (it is a peer-to-peer rule; ByzFL's
    default ``idx=0`` trusts the first client), the reference is the server's own last aggregate,
    kept in ``state["reference"]`` and zero in the first round (the zero update: the global model
    itself; inferred, in the manner of centered clipping's centre, ``strategies/centered_clipping.py``).

    ``kept`` marks the n - f rows averaged; ``info["selected"]`` lists them nearest first.

    Example (f = 1; own = row 0 at 0: its 2 nearest are itself and 1.0; at the server from the zero
    reference, the same, then the next round's reference is 0.5)::

        >>> stack = torch.tensor([[0.0], [1.0], [9.0]])
        >>> out = MoNNARule(1)(stack, 0, None, {})
        >>> out.vector, out.kept.tolist()
        (tensor([0.5000]), [True, True, False])
        >>> state = {}
        >>> MoNNARule(1)(torch.tensor([[9.0], [1.0], [0.0]]), None, None, state).kept.tolist(), state["reference"]
        ([False, True, True], tensor([0.5000]))

    Parameters
    ----------
    f : int
        The Byzantine rows assumed (``defense.byzantine``; null: the malicious neighbours a node can
        have, or every malicious client at a server, ``fedepic.extensions.assumed_byzantine``).

    Cost: O(n D) for the distances (float64), O(n log n) for the order, O((n - f) D) for the mean.

    Deviations: f is lowered to (n - 1) // 2 where the rows cannot hold 2 f < n (node degrees differ;
    ByzFL refuses 2 f >= n), as the trimmed mean lowers its b. Ties of distance go to own, then to the
    lower row (ByzFL's ``argpartition`` leaves them unspecified). ``weights`` are ignored (the paper's and
    ByzFL's plain mean). The server reference is an inference (above), so the server rule is not
    translation-equivariant (``strategies/mean.py``). Rows holding NaN / inf are left out first
    (``strategies.aggregate.aggregate``; a NaN own is replaced by the others' coordinate median), and n
    counts the rest.
    """

    def __init__(self, f: int) -> None:
        if int(f) != f or f < 0:
            raise ValueError(f"monna: f must be a non-negative integer, got {f!r}")
        self.f = int(f)

    def reference(self, stack: Tensor, state: dict) -> Tensor:
        """The server's reference: the previous aggregate in ``state``, or zero in the first round."""
        return saved_vector(state, REFERENCE, stack, "monna")

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n = stack.shape[0]
        count = n - capped_f(self.f, n)
        if own_index is None:
            chosen = nearest_rows(stack, self.reference(stack, state), count)
        else:
            chosen = nearest_rows(stack, stack[own_index], count, self_first(n, own_index))
        kept = torch.zeros(n, dtype=torch.bool)
        kept[chosen] = True
        vector = stack[chosen.to(stack.device)].mean(dim=0)
        if own_index is None:
            state[REFERENCE] = vector.detach().clone()
        return Aggregate(vector, kept, info={"selected": chosen.tolist()})
