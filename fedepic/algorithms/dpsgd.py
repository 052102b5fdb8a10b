"""D-PSGD, train then gossip: the node step of ``decentralized.algorithm=dpsgd``.

Paper: Xiangru Lian, Ce Zhang, Huan Zhang, Cho-Jui Hsieh, Wei Zhang, Ji Liu, "Can Decentralized
Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
Gradient Descent", NeurIPS 2017, https://arxiv.org/abs/1705.09056.

A round at node i, with R_i its peer rule (R = W, the mixing weights, for gossip):

    x_i <- R_i({train(x_j)}_{j in N(i) + i})

- send: ``clients.local_epochs`` epochs of local training from the node's model
  (``peer_node.train_local``: torch SGD with ``train.momentum``, ``train.nesterov``,
  ``train.weight_decay``; local EPIC where the rule or ``defense.local_epic`` asks), the trained model
  sent;
- receive: the rule over the node's trained model and its inbox (``peer_node.aggregate_flat``; a rule
  flagged ``needs_loss`` gets the node's own-batch loss).

Deviations from the paper: the paper takes one stochastic gradient step per round and gossips the
models before it (x_i <- sum_j w_ij x_j - eta g_i); this is its "train then gossip" form with local
epochs, as ``fedepic.peer_node``'s docstring states, and any peer rule in place of W.

Example: the step the registry line names::

    >>> from fedepic.algorithms import node_step
    >>> from fedepic.config import RunConfig
    >>> type(node_step(RunConfig())).__name__
    'Dpsgd'

Cost per round and node: its local epochs (``clients.local_epochs`` passes over its rows), then its rule
over its inbox, O(degree x D) for gossip. ``send_all`` trains every node of an in-process member in
one vectorized loop (``peer_node.train_local_stacked``) where the model allows it
(``LocalMember.vectorized_training``): the same seeds, rows, EPIC selections and SGD, equal up to float
rounding (tests/test_dfl_stacked.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from fedepic.algorithms import Inbox, NodeSent, NodeStep, PeerNode, start_model
from fedepic.peer_node import (
    AggregationReport, BatchLoss, LocalJob, aggregate_flat, exchanged_state, needs_loss, own_batch_loss,
    train_local, train_local_stacked, uses_local_epic,
)
from fedepic.seeds import derive_seed
from fedepic.vectors import flatten_state, unflatten_like

if TYPE_CHECKING:
    from fedepic.peer_local import LocalMember
    from fedepic.peer_rounds import Sent

# nodes per vectorized training loop: about six copies of a chunk's parameters are alive at once
# (starts, layers, gradients, momenta, results): 6 x 64 x D float32 values (0.36 GB for the MLP's D)
TRAINING_CHUNK = 64


def own_loss(node: PeerNode, round_: int, draw: int = 0) -> Optional[BatchLoss]:
    """The node's own-batch loss of ``round_`` (its minibatch number ``draw``: ``peer_node.own_batch_loss``)
    for a rule flagged ``needs_loss`` (MOZI), with ``node.model`` as scratch; None for the other rules and
    at malicious nodes."""
    client = node.client
    if not needs_loss(node.rule, client.is_malicious):
        return None
    return own_batch_loss(node.model, client.x, client.y, node.cfg, round_, node.id, draw)


def aggregate_inbox(node: PeerNode, round_: int, inbox: Inbox, draw: int = 0) -> AggregationReport:
    """The node's rule over its sent model (``inbox.own``, else ``state.trained``) and its inbox; the
    result becomes ``state.model`` (``peer_node.aggregate_flat``). dpsgd's receive half, and dsgd's
    before its step. A ``needs_loss`` rule scores on the node's minibatch number ``draw`` (:func:`own_loss`;
    dsgd under MOZI's own step: 1)."""
    state = node.state
    # a copy: the caller's vector is in the neighbours' inboxes too, and a rule may work in place
    own = inbox.own.clone() if inbox.own is not None else flatten_state(state.trained)
    return aggregate_flat(node.rule, node.cfg, state, own, inbox.vectors, inbox.weights, inbox.self_weight,
                          node.client.is_malicious, node.rules, node=node.id, loss=own_loss(node, round_, draw))


class Dpsgd(NodeStep):
    """dpsgd's two halves at one node (module docstring)."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        """The node's local epochs from its model; its trained model and training statistics."""
        cfg, state, client = node.cfg, node.state, node.client
        model = start_model(node).to(node.device)
        stats = train_local(model, client.x, client.y, cfg, state, round_=round_,
                            seed=derive_seed(cfg.seed, round_, node.id), device=node.device,
                            epic=uses_local_epic(node.rule, cfg, client.is_malicious), poison_mask=client.poisoned)
        # the start-of-round model is not needed any more (a Ray node's Context.state travels with every call)
        state.trained, state.model, state.round = exchanged_state(model), None, round_
        return NodeSent(state.trained, stats)

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        return aggregate_inbox(node, round_, inbox)

    def send_all(self, member: "LocalMember", round_: int) -> Optional["Sent"]:
        """Every active node's local epochs in one vectorized loop (``peer_node.train_local_stacked``), or
        None where the member's model does not allow it (``LocalMember.vectorized_training``)."""
        from fedepic.peer_rounds import Sent

        if not member.vectorized_training():
            return None
        starts, jobs, nodes, trained, losses = [], [], [], {}, {}
        for i in member.active:
            state, client = member.states[i], member.clients[i]
            start = state.model if state.model is not None else member.template
            if len(client.y) == 0:  # train_local's early return: nothing to train, the model goes out as it came
                losses[i] = float("nan")
                state.trained, state.model, state.round = {k: v.clone() for k, v in start.items()}, None, round_
                trained[i] = flatten_state(start)
                continue
            starts.append(flatten_state(start))
            nodes.append(i)
            jobs.append(LocalJob(state, client.x, client.y, derive_seed(member.cfg.seed, round_, i),
                                 uses_local_epic(member.rule, member.cfg, client.is_malicious), member.models[i],
                                 client.poisoned))
        for first in range(0, len(nodes), TRAINING_CHUNK):  # nodes are independent: chunks bound the memory
            chunk = slice(first, first + TRAINING_CHUNK)
            rows, stats = train_local_stacked(member.models[nodes[0]], torch.stack(starts[chunk]), jobs[chunk],
                                              member.cfg, round_=round_, device=member.device)
            for k, i in enumerate(nodes[chunk]):
                state = member.states[i]
                state.trained, state.model, state.round = unflatten_like(rows[k], member.template), None, round_
                trained[i], losses[i] = rows[k], stats[k]["train_loss"]
        return Sent(trained, {i: {"train_loss": loss} for i, loss in losses.items()})

