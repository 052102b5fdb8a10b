"""One-step D-SGD with client momentum: the node step of ``decentralized.algorithm=dsgd``.

Paper: Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust decentralized learning via
ClippedGossip", arXiv 2022, https://arxiv.org/abs/2202.01545 (the per-step protocol of the
Byzantine-robust literature; ByzFL's benchmark runs the same).

With R_i the node's peer rule (R = W for gossip), eta = ``train.lr`` (milestones in rounds) and
beta = ``train.client_momentum``, a round at node i (``decentralized.order=combine_then_adapt``) is

    m_i <- beta m_i + (1 - beta) g_i(x_i),    m_i(0) = 0
    x_i <- R_i({x_j}) - eta m_i

and under ``adapt_then_combine`` x_i <- R_i({x_j - eta m_j}) (the node sends its half-step model).
``train.client_momentum_form=heavy_ball`` takes m_i <- beta m_i + g_i; a malicious node under
``attack.momentum=false`` m_i <- g_i.

- send: g_i on one minibatch of ``train.batch_size`` rows at the model it sends (seeded by seed, round,
  node), folded into m_i (``peer_node.dsgd_momentum``); under adapt_then_combine the step
  (``peer_node.dsgd_step``) before sending;
- receive: the rule over the inbox (``dpsgd.aggregate_inbox``), then the step under combine_then_adapt.

Deviation from the paper: none in the equations (``fedepic.peer_node`` quotes the authors' code for
the adapt_then_combine order).

Example: the step the registry line names::

    >>> import dataclasses
    >>> from fedepic.algorithms import node_step
    >>> from fedepic.config import RunConfig
    >>> cfg = RunConfig()
    >>> cfg = dataclasses.replace(cfg, decentralized=dataclasses.replace(cfg.decentralized, algorithm="dsgd"))
    >>> type(node_step(cfg)).__name__
    'Dsgd'

Cost per round and node: one minibatch gradient (a vmap over one model, ``fedepic.stacked``), O(D) for
the momentum and the step, the rule over the inbox. The in-process engine runs every node's rows as
one [n, D] tensor instead (its entry's ``info["member"]``, ``fedepic.peer_stacked.StackedDsgdMember``),
tested equal to this step node by node (tests/test_algorithm_steps.py).
"""

from __future__ import annotations

from fedepic.algorithms import Inbox, NodeSent, NodeStep, PeerNode, start_model
from fedepic.algorithms.dpsgd import aggregate_inbox
from fedepic.peer_node import (
    AggregationReport, adapts_first, derive_seed, dsgd_momentum, dsgd_step, dsgt_batch, dsgt_gradients,
    exchanged_state, keeps_momentum,
)
from fedepic.vectors import flatten_state


class Dsgd(NodeStep):
    """dsgd's two halves at one node (module docstring)."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        """The gradient at the model the node sends, into its client momentum; the model sent."""
        cfg, state, client = node.cfg, node.state, node.client
        model = start_model(node)
        if state.model is None:
            state.model = exchanged_state(model)
        batch = dsgt_batch(client.x, client.y, cfg, derive_seed(cfg.seed, round_, node.id))
        point = flatten_state(state.model).unsqueeze(0)
        gradient = dsgt_gradients(model, point, [batch], cfg)[0]
        dsgd_momentum(state, gradient, cfg.train.client_momentum, cfg.train.client_momentum_form,
                      keeps_momentum(cfg, client.is_malicious))
        if adapts_first(cfg):  # the half-step model x_i - eta m_i is what it sends and combines
            dsgd_step(cfg, state, round_)
        state.trained, state.round = state.model, round_
        return NodeSent(state.trained)

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        """R_i over the inbox, then x_i <- R_i - eta m_i (combine_then_adapt; the step came before sending
        under adapt_then_combine)."""
        report = aggregate_inbox(node, round_, inbox)
        if not adapts_first(node.cfg):
            dsgd_step(node.cfg, node.state, round_)
        return report
