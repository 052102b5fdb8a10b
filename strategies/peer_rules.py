"""Registry of the decentralized peer rules: ``build_peer_rule(name, **params)``.

Stateless rules are callables ``rule(own, neighbours, weights) -> new_own``. Two attributes tell the
runner what else a rule needs:
- ``needs_keep_mask``: ``exclude`` / ``upper`` take ``keep=`` (oracle mask of benign neighbours);
- ``needs_state``: ``gp`` / ``gp_epic`` are ``GradientPurification`` objects, called through
  ``.aggregate(own, neighbours, neighbour_ids, weights, state)`` with a per-node state.
``gp_epic`` is GP whose nodes also run EPIC on their own local data; that part lives in the runner,
so here it builds the same object as ``gp``.
"""

from __future__ import annotations

from typing import Any, Callable

from strategies.epic_peer import EpicPeer
from strategies.gossip import Gossip, GossipSubset
from strategies.gradient_purification import GradientPurification
from strategies.krum import KrumSelect
from strategies.median import CoordinateMedian
from strategies.scclip import SelfCenteredClipping
from strategies.trimmed_mean import TrimmedMean


PEER_RULES: dict[str, Callable[..., Any]] = {
    "gossip": Gossip,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": KrumSelect,
    "scclip": SelfCenteredClipping,
    "epic": EpicPeer,
    "exclude": GossipSubset,
    "upper": GossipSubset,
    "gp": GradientPurification,
    "gp_epic": GradientPurification,
}


def build_peer_rule(name: str, **params: Any) -> Any:
    """Build the peer rule ``name`` with its hyperparameters; ValueError for an unknown name or
    parameter."""
    if name not in PEER_RULES:
        raise ValueError(f"unknown peer rule {name!r}; valid names: {', '.join(PEER_RULES)}")
    try:
        return PEER_RULES[name](**params)
    except TypeError as err:  # an unexpected keyword argument
        raise ValueError(f"peer rule {name!r}: bad parameters {sorted(params)}: {err}") from None
