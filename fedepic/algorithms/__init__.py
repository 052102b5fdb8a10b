"""The node step of a decentralized algorithm: what ONE node computes in a round, given its state, its
data and the round, written once here (free of Flower and Ray) and called by both backends of the
round engine (``fedepic.peer_rounds``): the in-process members (``fedepic.peer_local.LocalMember``) and
the Flower ClientApp (``simulations/dfl_apps.py``), which only converts messages and
``Context.state`` to and from the :class:`PeerNode` and :class:`Inbox` below.

A round has two halves with the exchange between them (the engine decides what travels over each
edge, the model attacks included), so a node step is a class with two methods:

- ``send(node, round_) -> NodeSent``: the node's work before the exchange; it returns the vector it
  sends (a state dict in the ``flatten_state`` layout, also left in ``node.state.trained``) and its
  statistics (``train_loss`` where it trains);
- ``receive(node, round_, inbox) -> AggregationReport``: its aggregation of what it received with its
  peer rule and its step; the node's new model is ``node.state.model``.

Each algorithm is one module of this package and one line of ``fedepic.extensions.ALGORITHMS``, whose
target is its step class (:func:`node_step` builds it): dpsgd (``fedepic.algorithms.dpsgd``), dsgd
(``.dsgd``), dsgt (``.dsgt``). A step may also give the in-process engine an all-nodes form of its two
halves (``send_all``, ``receive_all``: vectorized over every node of a ``LocalMember``, returning None
where it does not apply); those are tested equal to the per-node methods (tests/test_algorithm_steps.py).
An entry's ``info["member"]`` names an in-process member class of its own instead (dsgd's stacked
rows, ``fedepic.peer_stacked.StackedDsgdMember``); without it the in-process engine runs
``LocalMember``, which calls the step node by node. No deviation from the algorithms' papers here:
this module only fixes the calling convention.

Example (the contract's containers)::

    >>> import torch
    >>> inbox = Inbox({2: torch.ones(3)}, {2: 0.25}, 0.75)
    >>> inbox.ids(), inbox.own is None
    ([2], True)

Cost: none of its own; each algorithm's module states its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor, nn

from fedepic.config import RunConfig
from fedepic.peer_node import AggregationReport, NodeState, load_exchanged

if TYPE_CHECKING:  # the client data and the member are only annotations here
    from fedepic.client_data import ClientData
    from fedepic.peer_local import LocalMember
    from fedepic.peer_rounds import Messages, Sent


@dataclass
class PeerNode:
    """One node as its step sees it: its id, its member's peer rule and config (a variant's keys merged),
    its state (mutated by the step), its rows after its data attack, a scratch module of the run's
    architecture (its content is undefined on entry: a step loads what it needs), the run's initial
    exchanged state (where a node without a model starts), the device it trains on, and the rules
    already built (``peer_node.built_rule``'s cache; None: built per call)."""

    id: int
    rule: str
    cfg: RunConfig
    state: NodeState
    client: "ClientData"
    model: nn.Module
    initial: Mapping[str, Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rules: Optional[Mapping[str, Any]] = None


@dataclass
class Inbox:
    """What a node received this round: each neighbour's flat vector (the attacks applied), the mixing
    weights of those neighbours and the node's own weight (summing to 1), and, when the caller holds it,
    the flat vector the node itself sent (else the step rebuilds it from the state)."""

    vectors: Mapping[int, Tensor]
    weights: Mapping[int, float]
    self_weight: float
    own: Optional[Tensor] = None

    def ids(self) -> list[int]:
        return sorted(int(j) for j in self.vectors)


@dataclass
class NodeSent:
    """A node's send half: the state dict it sends and its statistics."""

    message: dict[str, Tensor]
    stats: dict[str, float] = field(default_factory=dict)


class NodeStep:
    """The two halves of a round at one node (module docstring); subclasses override both. The all-nodes
    forms default to None: the in-process engine then calls the per-node methods node by node."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        raise NotImplementedError

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        raise NotImplementedError

    def send_all(self, member: "LocalMember", round_: int) -> Optional["Sent"]:
        """Every active node's send half at once (the in-process engine's), or None: node by node."""
        return None

    def receive_all(self, member: "LocalMember", round_: int, work: "Sent", messages: "Messages"
                    ) -> Optional[dict[int, AggregationReport]]:
        """Every node's receive half at once (the in-process engine's), or None: node by node."""
        return None


def node_step(cfg: RunConfig) -> NodeStep:
    """The step of ``cfg``'s ``decentralized.algorithm``: its ``fedepic.extensions.ALGORITHMS`` entry's
    target, built (read from the registry at each call, so a registered entry is all it takes)."""
    from fedepic import extensions

    return extensions.ALGORITHMS.build(cfg.decentralized.algorithm, cfg)


def start_model(node: PeerNode) -> nn.Module:
    """``node.model`` loaded with where the node starts this round: its model, else the model it sent
    last (a node whose aggregation did not come), else the run's initial model."""
    state = node.state
    start = state.model if state.model is not None else state.trained
    return load_exchanged(node.model, node.initial if start is None else start)
