"""Gradient tracking: the node step of ``decentralized.algorithm=dsgt``.

Papers: Angelia Nedic, Alex Olshevsky, Wei Shi, "Achieving Geometric Convergence for Distributed
Optimization over Time-Varying Graphs", SIAM Journal on Optimization 27(4), 2017,
https://arxiv.org/abs/1607.03218 (DIGing); Shi Pu, Angelia Nedic, "Distributed Stochastic Gradient
Tracking Methods", Mathematical Programming 187, 2021, https://arxiv.org/abs/1805.11454 (DSGT).

Node i keeps its model x_i, a tracker y_i of the network's average gradient and its last stochastic
gradient g_i; with w_ij the mixing weights (the node's peer rule in their place) and eta = ``train.lr``:

    x_i <- sum_j w_ij x_j - eta y_i
    y_i <- sum_j w_ij y_j + g_i(x_i new) - g_i(x_i old),        y_i(0) = g_i(x_i(0))

- send: (x_i, y_i) as one vector (the model's entries, then ``peer_node.TRACKER``); in its first round
  the node first takes y_i(0) = g_i(x_i(0)) on a minibatch seeded with round 0 (``peer_node.node_batch``;
  under ``train.sampler=in_order`` round t takes batch t, y_i(0) batch 0);
- receive: the two sums (``peer_node.dsgt_mix``: GP screens on the trackers), the step
  (``peer_node.dsgt_point``), the gradient at the new point on the round's minibatch, the tracker
  update (``peer_node.dsgt_finish``).

Deviation from the papers: the combine-then-adapt form of DIGing with stochastic gradients; Pu and
Nedic write the model step adapt-then-combine, x_i <- sum_j w_ij (x_j - eta y_j), with the same tracker
update (``fedepic.peer_node``'s docstring gives the reason: the model step uses the node's own tracker
only, so purifying it changes nothing but i's own direction).

Example: the step the registry line names::

    >>> import dataclasses
    >>> from fedepic.algorithms import node_step
    >>> from fedepic.config import RunConfig
    >>> cfg = RunConfig()
    >>> cfg = dataclasses.replace(cfg, decentralized=dataclasses.replace(cfg.decentralized, algorithm="dsgt"))
    >>> type(node_step(cfg)).__name__
    'Dsgt'

Cost per round and node: one minibatch gradient (two in the first round), the two sums of the rule,
O(degree x D) for gossip. In process, ``send_all`` and ``receive_all`` take every node's gradients in one
vectorized call (``fedepic.stacked``): equal to this step node by node up to float rounding
(tests/test_algorithm_steps.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from fedepic.algorithms import Inbox, NodeSent, NodeStep, PeerNode, start_model
from fedepic.peer_node import (
    AggregationReport, dropout_seeds, dsgt_finish, dsgt_gradients, dsgt_message, dsgt_mix, dsgt_point, dsgt_start,
    exchanged_state, node_batch,
)
from fedepic.peer_routing import inbox as inbox_of
from fedepic.vectors import flatten_state

if TYPE_CHECKING:
    from fedepic.peer_local import LocalMember
    from fedepic.peer_rounds import Messages, Sent


class Dsgt(NodeStep):
    """dsgt's two halves at one node, and their all-nodes forms in process (module docstring)."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        """(x_i, y_i); round 1 first takes y_i(0) = g_i(x_i(0)). Vectors and minibatches live on the CPU
        (``fedepic.stacked``), so the model stays there."""
        cfg, state, client = node.cfg, node.state, node.client
        model = start_model(node)
        if state.tracker is None:
            batch = node_batch(client.x, client.y, cfg, 0, node.id, first_round=0)
            point = flatten_state(exchanged_state(model)).unsqueeze(0)
            seeds = dropout_seeds(cfg, model, 0, [node.id])
            dsgt_start(state, model, dsgt_gradients(model, point, [batch], cfg, seeds)[0])
        state.trained, state.round = dsgt_message(state), round_
        return NodeSent(state.trained)

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        """The two sums, the step, the gradient at the new point, the tracker update."""
        cfg, state, client = node.cfg, node.state, node.client
        x, y, report = dsgt_mix(node.rule, cfg, state, inbox.vectors, inbox.weights, inbox.self_weight,
                                client.is_malicious, node.rules, own=inbox.own, node=node.id)
        point = dsgt_point(cfg, state, x, round_)
        batch = node_batch(client.x, client.y, cfg, round_, node.id, first_round=0)
        seeds = dropout_seeds(cfg, node.model, round_, [node.id])
        dsgt_finish(state, point, y, dsgt_gradients(node.model, point.unsqueeze(0), [batch], cfg, seeds)[0])
        return report

    def send_all(self, member: "LocalMember", round_: int) -> Optional["Sent"]:
        """Every node's (x_i, y_i); the first round's y_i(0) = g_i(x_i(0)) of all fresh nodes in one
        vectorized call."""
        from fedepic.peer_rounds import Sent

        fresh = [i for i in member.active if member.states[i].tracker is None]
        if fresh:
            starts = {i: member.models[i] for i in fresh}
            points = torch.stack([flatten_state(exchanged_state(starts[i])) for i in fresh])
            batches = [member._batch(i, 0, first_round=0) for i in fresh]
            grads = dsgt_gradients(starts[fresh[0]], points, batches, member.cfg,
                                   dropout_seeds(member.cfg, starts[fresh[0]], 0, fresh))
            for k, i in enumerate(fresh):
                dsgt_start(member.states[i], starts[i], grads[k])
        for i in member.active:
            member.states[i].round = round_  # as the per-node send sets it: the oracle reads it
        return Sent({i: flatten_state(dsgt_message(member.states[i])) for i in member.active})

    def receive_all(self, member: "LocalMember", round_: int, work: "Sent", messages: "Messages"
                    ) -> Optional[dict[int, AggregationReport]]:
        """The two sums at every node, its step, the gradients at the new points (one vectorized call)
        and the tracker updates."""
        reports, points, mixed_y = {}, [], {}
        for i in member.active:
            box = inbox_of(messages, i)
            weights, self_weight = member._mixing(i, box)
            x, y, reports[i] = dsgt_mix(member.rule, member.cfg, member.states[i], box, weights, self_weight,
                                        member.clients[i].is_malicious, member.rules, own=work.vectors[i], node=i)
            points.append(dsgt_point(member.cfg, member.states[i], x, round_))
            mixed_y[i] = y
        stacked = torch.stack(points)
        model = member.models[member.active[0]]
        grads = dsgt_gradients(model, stacked, [member._batch(i, round_, first_round=0) for i in member.active],
                               member.cfg, dropout_seeds(member.cfg, model, round_, member.active))
        for k, i in enumerate(member.active):
            dsgt_finish(member.states[i], stacked[k], mixed_y[i], grads[k])
        return reports
