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

- send: g_i on one minibatch of ``train.batch_size`` rows at the model it sends (``peer_node.node_batch``:
  seeded by seed, round, node, or batch round - 1 under ``train.sampler=in_order``), folded into m_i
  (``peer_node.dsgd_momentum``); under adapt_then_combine the step
  (``peer_node.dsgd_step``) before sending;
- receive: the rule over the inbox (``dpsgd.aggregate_inbox``), then the step under combine_then_adapt.

MOZI's own gradient step (``defense.mozi.own_step`` on a ``mozi`` member, :func:`own_step`; the code it
follows is quoted in ``strategies/mozi.py``): every node of the member, the malicious ones too, sends
its model x_i, takes m_i <- g_i(x_i; B_i) + g_i(x_i; B'_i) (:func:`step_batches`: B'_i seeded (seed,
round, node, 1); no momentum, whatever ``train.client_momentum`` and ``attack.momentum`` say) and steps
after the rule, x_i <- R_i - eta m_i, whatever ``decentralized.order`` says (:func:`steps_after_mix`);
MOZI scores on B'_i (:func:`score_draw`). Config validation refuses the key on a mozi member of any
algorithm without dsgd's flag ``client_momentum``.

Deviation from the paper: none in the equations (``fedepic.peer_node`` quotes the authors' code for
the adapt_then_combine order); MOZI's own step states its deviations in ``strategies/mozi.py``.

Example: which members step after the mix (combine then adapt, the default order, and MOZI's own step
whatever the order)::

    >>> from fedepic.config import load_config
    >>> cfg = load_config("dfl_smoke", ["decentralized.algorithm=dsgd", "strategies=[gossip,mozi]",
    ...                                 "defense.mozi.own_step=true"])
    >>> own_step(cfg, "mozi"), own_step(cfg, "gossip"), steps_after_mix(cfg, "mozi")
    (True, False, True)

Cost per round and node: one minibatch gradient (a vmap over one model, ``fedepic.stacked``), O(D) for
the momentum and the step, the rule over the inbox. The in-process engine runs every node's rows as
one [n, D] tensor instead (its entry's ``info["member"]``, ``fedepic.peer_stacked.StackedDsgdMember``),
tested equal to this step node by node (tests/test_algorithm_steps.py).
"""

from __future__ import annotations

from torch import Tensor

from fedepic.algorithms import Inbox, NodeSent, NodeStep, PeerNode, start_model
from fedepic.algorithms.dpsgd import aggregate_inbox
from fedepic.config import RunConfig
from fedepic.extensions import own_step_key
from fedepic.peer_node import (
    AggregationReport, adapts_first, dropout_seeds, dsgd_momentum, dsgd_step, dsgt_gradients, exchanged_state,
    keeps_momentum, numbered_batch,
)
from fedepic.vectors import flatten_state


def own_step(cfg: RunConfig, rule: str) -> bool:
    """Whether the dsgd member of ``rule`` takes the rule's own gradient step: its entry's
    ``info["own_step"]`` key is set (``defense.mozi.own_step`` on the ``mozi`` rule: module docstring,
    ``strategies/mozi.py``; ``fedepic.extensions.own_step_key``).

    >>> import dataclasses
    >>> cfg = RunConfig()
    >>> cfg = dataclasses.replace(cfg, defense=dataclasses.replace(
    ...     cfg.defense, mozi=dataclasses.replace(cfg.defense.mozi, own_step=True)))
    >>> own_step(cfg, "mozi"), own_step(cfg, "gossip"), score_draw(cfg, "mozi"), steps_after_mix(cfg, "mozi")
    (True, False, 1, True)
    """
    return own_step_key(cfg, rule) is not None


def score_draw(cfg: RunConfig, rule: str) -> int:
    """The minibatch a ``needs_loss`` rule scores on (``peer_node.own_batch_loss``'s ``draw``): B'_i (1)
    under :func:`own_step`, else the gradient's B_i (0)."""
    return 1 if own_step(cfg, rule) else 0


def step_batches(x: Tensor, y: Tensor, cfg: RunConfig, round_: int, node: int, rule: str
                 ) -> list[tuple[Tensor, Tensor]]:
    """The minibatches (images, labels) of node ``node``'s gradient in ``round_``, whose gradients at its
    model are summed: B_i (``peer_node.node_batch``, under ``train.sampler``), and under :func:`own_step`
    also MOZI's B'_i, drawn with replacement seeded (seed, round, node, 1) (ClippedGossip's code
    back-propagates MOZI's batch without zeroing the trainer's gradient, so its step takes the sum:
    ``strategies/mozi.py``)."""
    draws = (0, 1) if own_step(cfg, rule) else (0,)
    return [numbered_batch(x, y, cfg, round_, node, draw) for draw in draws]


def steps_after_mix(cfg: RunConfig, rule: str) -> bool:
    """Whether a node of ``rule``'s member steps after the aggregation, x_i <- R_i - eta m_i: under
    combine_then_adapt, and under :func:`own_step` whatever the order."""
    return own_step(cfg, rule) or not adapts_first(cfg)


class Dsgd(NodeStep):
    """dsgd's two halves at one node (module docstring)."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        """The gradient at the model the node sends, into its client momentum; the model sent."""
        cfg, state, client = node.cfg, node.state, node.client
        model = start_model(node)
        if state.model is None:
            state.model = exchanged_state(model)
        point = flatten_state(state.model).unsqueeze(0)
        gradient = None
        # own_step: two minibatches, their gradients summed; each draw has its own dropout masks
        for draw, batch in enumerate(step_batches(client.x, client.y, cfg, round_, node.id, node.rule)):
            g = dsgt_gradients(model, point, [batch], cfg, dropout_seeds(cfg, model, round_, [node.id], draw))[0]
            gradient = g if gradient is None else gradient.add_(g)
        memory = keeps_momentum(cfg, client.is_malicious) and not own_step(cfg, node.rule)  # own_step: m_i <- g_i
        dsgd_momentum(state, gradient, cfg.train.client_momentum, cfg.train.client_momentum_form, memory)
        if not steps_after_mix(cfg, node.rule):  # the half-step model x_i - eta m_i is what it sends and combines
            dsgd_step(cfg, state, round_)
        state.trained, state.round = state.model, round_
        return NodeSent(state.trained)

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        """R_i over the inbox (MOZI scoring on :func:`score_draw`'s minibatch), then x_i <- R_i - eta m_i
        (combine_then_adapt or :func:`own_step`; else the step came before sending)."""
        report = aggregate_inbox(node, round_, inbox, score_draw(node.cfg, node.rule))
        if steps_after_mix(node.cfg, node.rule):
            dsgd_step(node.cfg, node.state, round_)
        return report
