"""EPIC on received updates as a decentralized peer rule: drop isolated updates, gossip the rest.

The selector is the one used everywhere in fedepic (training sets, client rows, updates):
here the features are the neighbours' updates ``x_j - x_i`` (received model minus the node's own
model before aggregation) and all labels are equal (one group).
Paper: Yu Yang, Tian Yu Liu, Baharan Mirzasoleiman, "Not All Poisons are Created Equal: Robust Training
against Data Poisoning", ICML 2022 (PMLR 162), https://proceedings.mlr.press/v162/yang22j.html.
Deviation (our extension): the paper selects over training examples' gradients; here the points are
the neighbours' model updates.
"""

from __future__ import annotations

from torch import Tensor

from strategies.epic_updates import epic_select_updates
from strategies.finite import split_finite
from strategies.gossip import check_stack, gossip_subset


def epic_keep_mask(own: Tensor, neighbours: Tensor, fraction: float, threshold: int = 1) -> Tensor:
    """BoolTensor [m]: True for the neighbours whose update EPIC does not drop (see epic_select_updates;
    a non-finite update is always dropped)."""
    return epic_select_updates(neighbours - own, fraction, threshold).keep.to(own.device)


class EpicPeer:
    """EPIC over neighbour updates, then gossip over the kept ones with renormalised weights.

    Parameters
    ----------
    fraction : float
        Fraction of the updates chosen as medoids (``select_medoids``'s ``fraction``; ``defense.epic.fraction``).
    threshold : int
        Medoids whose cluster weight is <= threshold are dropped (EPIC's rule; 1 = isolated;
        ``defense.epic.threshold``).
    The node's own model is always kept (self weight kept, weights renormalised). Non-finite vectors
    are left out before the selection (``strategies/finite.py``).
    """


    def __init__(self, fraction: float, threshold: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"epic: fraction must be in (0, 1], got {fraction!r}")
        if threshold < 0:
            raise ValueError(f"epic: threshold must be >= 0, got {threshold!r}")
        self.fraction = float(fraction)
        self.threshold = threshold

    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        check_stack(own, neighbours)
        inp = split_finite(own, neighbours, weights)
        if inp.neighbours.shape[0] == 0:
            return inp.own.clone(), inp.report
        keep = epic_keep_mask(inp.own, inp.neighbours, self.fraction, self.threshold)
        return gossip_subset(inp.own, inp.neighbours, inp.weights, keep), inp.report

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]
