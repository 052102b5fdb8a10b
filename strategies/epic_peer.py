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

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate
from strategies.epic_updates import epic_select_updates
from strategies.gossip import gossip_subset, own_only, split_own


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
    The node's own model is always kept (self weight kept, weights renormalised). A peer rule of the
    one signature (``strategies/aggregate.py``): ``kept`` is own and the neighbours EPIC keeps. Non-finite
    vectors are left out before the selection (``strategies.aggregate.aggregate``).
    """


    def __init__(self, fraction: float, threshold: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"epic: fraction must be in (0, 1], got {fraction!r}")
        if threshold < 0:
            raise ValueError(f"epic: threshold must be >= 0, got {threshold!r}")
        self.fraction = float(fraction)
        self.threshold = threshold

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, w = split_own(stack, own_index, weights)
        if neighbours.shape[0] == 0:
            return own_only(stack, own_index)
        keep = epic_keep_mask(own, neighbours, self.fraction, self.threshold)
        kept = torch.ones(stack.shape[0], dtype=torch.bool)
        kept[torch.arange(stack.shape[0]) != own_index] = keep.cpu()
        return Aggregate(gossip_subset(own, neighbours, w, keep), kept)
