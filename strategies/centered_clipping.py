"""Centered clipping (CC), a server rule of the one signature (``strategies/aggregate.py``).

Paper: Sai Praneeth Karimireddy, Lie He, Martin Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021 (PMLR 139), https://proceedings.mlr.press/v139/karimireddy21a.html
(arXiv:2012.10333).

Formula (ByzFL's ``CenteredClipping``, the paper's CC with its centre taken from history): with v_0 the
previous round's aggregate,

    v_{l+1} = v_l + (1/n) sum_{i=1}^{n} clip_tau(x_i - v_l),   clip_tau(z) = z * min(1, tau / ||z||_2),

for l = 0 .. L - 1; the result is v_L, and v_L is the next round's v_0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, saved_vector
from strategies.scclip import clip_rows

CENTRE = "centre"  # the state key of v_0, the previous round's aggregate


class CenteredClippingRule:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021): ``L`` steps of
    ``v <- v + (1/n) sum_i clip_tau(x_i - v)`` from the previous round's aggregate.

    The centre lives in ``state["centre"]`` (a float tensor [D], saved with the rule's state in a
    checkpoint). First round: the centre is the zero vector, as the authors' server-side code starts it
    (Karimireddy, He, Jaggi's bucketing repository ``epfml/byzantine-robust-noniid-optimizer``, commit
    0e27349, ``codes/aggregator/clipping.py``, ``Clipping.__call__``: "``if self.momentum is None:
    self.momentum = torch.zeros_like(inputs[0])``", the returned aggregate kept as the next centre) and
    as ByzFL's ``CenteredClipping`` does (``m=None``: "Default (None) makes it start from zero"). The
    decentralized repository (``epfml/byzantine-robust-decentralized-optimizer``, ``codes/aggregator.py``,
    ``Clipping``) starts it at the first input instead (``self.momentum = inputs[0]``); we follow the
    server-side code and ByzFL (the first row is an arbitrary client, possibly a Byzantine one).

    Example (tau = 1, one iteration, centre 0: rows of norm 3 and 0.5 move the centre by 1/2 of
    their clipped values)::

        >>> rule = CenteredClippingRule(tau=1.0, iterations=1)
        >>> state = {}
        >>> out = rule(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), None, None, state)
        >>> out.vector, out.kept.tolist(), out.info["clipped"]
        (tensor([0.5000, 0.2500]), [True, True], [0])
        >>> state["centre"]
        tensor([0.5000, 0.2500])

    Every row enters each step (``kept`` all True; a far row is clipped, not dropped);
    ``info["clipped"]`` lists the rows whose distance to the centre exceeded tau in the last step.

    Parameters
    ----------
    tau : float
        The clipping radius (> 0; ``defense.centered_clipping.tau``).
    iterations : int
        L, the clipping steps per round (>= 1; ``defense.centered_clipping.iterations``).

    Cost: O(L n D) time, O(n D) extra memory for the differences. ``weights`` are ignored (the
    paper's and ByzFL's plain 1/n average), ``own_index`` too (a server rule).

    Deviations: none from ByzFL's formula. Rows holding NaN / inf are left out first
    (``strategies.aggregate.aggregate``) and n counts the rest; a round where every row is left out
    does not call the rule, and the centre stays. The centre is cast to the stack's dtype and device.
    Not translation-equivariant (``strategies/mean.py``): the centre is history, fed updates.
    """

    def __init__(self, tau: float, iterations: int) -> None:
        if not tau > 0:
            raise ValueError(f"centered_clipping: tau must be > 0, got {tau!r}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"centered_clipping: iterations must be an integer >= 1, got {iterations!r}")
        self.tau = float(tau)
        self.iterations = int(iterations)

    def centre(self, stack: Tensor, state: dict) -> Tensor:
        """v_0: the previous aggregate in ``state``, or zero in the first round."""
        return saved_vector(state, CENTRE, stack, "centered_clipping")

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        v = self.centre(stack, state)
        clipped = torch.zeros(stack.shape[0], dtype=torch.bool)
        for _ in range(self.iterations):
            diffs = stack - v
            norms = diffs.norm(dim=1, keepdim=True)
            v = v + clip_rows(diffs, self.tau, norms).mean(dim=0)
            clipped = (norms.squeeze(1) > self.tau).cpu()
        state[CENTRE] = v.detach().clone()
        return Aggregate(v, torch.ones(stack.shape[0], dtype=torch.bool),
                         info={"clipped": clipped.nonzero().flatten().tolist()})
