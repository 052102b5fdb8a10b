"""The in-process decentralized backend at scale: every node's model as one row of a stacked tensor.

A ``StackedDsgdMember`` is a ``fedepic.peer_rounds.PeerBackend`` (``send``: the gradients and momenta;
``receive``: the mix, the step, the evaluation), picked by :func:`member_class` for every dsgd member
of ``engine=local``; the engine between its two phases decides the messages (the attacks included).
``LocalMember`` (``peer_local``) keeps one state dict per node and moves it through flat vectors
every round: O(n D) copies a round on top of the compute, which for 1,000 nodes cost more than the
compute (a profile of 100 nodes: docs/results/engines.md). Here, under ``decentralized.algorithm=dsgd``,
the models X [n, D] and momenta M [n, D] stay stacked for the whole run:

- gradients: one ``torch.func`` vmap per chunk of nodes (``fedepic.stacked``), each node on its own
  minibatch (``peer_node.node_batch``, the Ray node's function, seeds and ``train.sampler``);
- momentum and step: ``peer_node``'s equations on whole rows: m_i <- beta m_i + (1 - beta) g_i (the EMA),
  or m_i <- beta m_i + g_i under ``train.client_momentum_form=heavy_ball``, or m_i <- g_i at a malicious
  node under ``attack.momentum=false``, or m_i <- g_i(B_i) + g_i(B'_i) at every node under MOZI's own step
  (``fedepic.algorithms.dsgd.own_step``); and x_i <- R_i - eta m_i;
- exchange: the engine's messages (``peer_routing.outgoing``) on row views; then, when every node uses plain
  gossip (``strategies.gossip.Gossip``, malicious nodes included) and every vector is finite, the mix
  is one sparse product with the mixing matrix, R = W X (over column blocks), plus a correction for
  each message an attacker changed. Any other rule (robust, GP, pre-aggregation) or a non-finite vector
  takes ``peer_node.aggregate_vectors`` node by node on the same rows, as a Ray node does;
- evaluation: all benign nodes in one vectorized forward (``peer_eval.evaluate_rows``).

Under ``decentralized.order=adapt_then_combine`` the rows step first, x_i - eta m_i (as
``peer_node.dsgd_step`` rounds it), are sent and mixed, and the mix is the new model. Under MOZI's own
step the rows step after the mix whatever the order (``fedepic.algorithms.dsgd.steps_after_mix``), each
row's gradient summed over its two minibatches (``dsgd.step_batches``).

Deviation from the paper's equations: none; the gossip mix sums in another order than
``strategies.gossip.Gossip`` (x_i + sum_j w_ij (x_j - x_i)); the step x_i <- R_i - eta m_i rounds as a
node's ``peer_node.dsgd_step`` does (:func:`step_rows`: the product eta m_i, then the difference, two
roundings; bitwise equal on equal inputs). So the rows equal a node-by-node dsgd (each node's state dict, as a Ray node keeps it) up to float rounding: the oracle
of tests/test_dfl_stacked.py. Cost per round: the n gradients, O(n D) for the momenta and the step,
O(edges x D) for the sparse mix (node by node: each node's rule over its inbox).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.stacked import stacked_gradients
from fedepic.train import client_momentum_, float_images
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.peer_eval import evaluate_rows
from fedepic.peer_node import (
    AggregationReport, NodeState, aggregate_vectors, dropout_seeds, exchanged_state, keeps_momentum, new_model,
    round_lr,
)
from fedepic.algorithms.dsgd import own_step, score_draw, step_batches, steps_after_mix
from fedepic.peer_rounds import Messages, Received, Sent
from fedepic.peer_routing import Routing
from fedepic.peer_local import LocalMember
from fedepic.vectors import finite_rows
from strategies.gossip import Gossip

# -- sizes (one place): what bounds memory, not what is tuned for speed ------------------------------
GRADIENT_CHUNK = 32  # nodes per vmap'd gradient call: 32 x MLP's 784x256 layer is 26 MB of gradient, which
#                      the allocator reuses between calls (250 per call measured slower: docs/results/engines.md)


def step_rows(x: Tensor, m: Tensor, lr: float, scratch: Tensor) -> Tensor:
    """``x <- x - lr * m`` in place, rounded as ``peer_node.dsgd_step`` rounds it (the product, then the
    difference: two roundings, not a fused multiply-add), with ``scratch`` (x's shape, neither x nor m)
    holding the product, so a step allocates nothing.

    >>> x, m = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    >>> step_rows(x, m, 0.1, torch.empty_like(x))
    tensor([[0.9500, 2.1000]])
    """
    return x.sub_(torch.mul(m, lr, out=scratch))


class GossipMatrix:
    """The gossip mix of all nodes at once: ``R = W X``, where W [n, n] holds the mixing weight w_ij of
    every neighbour j of i and the self weight ``1 - sum_j w_ij`` on its diagonal (as ``LocalMember``
    gives it): ``sum_j w_ij x_j``, which ``strategies.gossip.Gossip`` writes as ``x_i + sum_j w_ij (x_j - x_i)``
    (equal up to float rounding).

    Written by hand because torch has the sparse product but no gossip operator (networkx's
    ``to_scipy_sparse_array`` would add scipy for one matrix). The product runs over blocks of
    ``COLUMN_BLOCK`` coordinates, whose n rows stay in cache while the 10 or so neighbours of every
    node are read: the same O(edges D) work, with fewer cache misses than one product over all D
    columns (docs/results/engines.md)."""

    COLUMN_BLOCK = 8192

    def __init__(self, rows: Mapping[int, int], routing: Routing, neighbours: Mapping[int, Sequence[int]]) -> None:
        index, values = [], []
        for i, row in rows.items():
            weights = [routing.weights[i][j] for j in neighbours[i]]
            index += [(row, rows[j]) for j in neighbours[i]] + [(row, row)]
            values += weights + [1.0 - sum(weights)]
        n = len(rows)
        coo = torch.sparse_coo_tensor(torch.tensor(index, dtype=torch.long).reshape(-1, 2).T,
                                      torch.tensor(values, dtype=torch.float32), (n, n),
                                      check_invariants=True).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is tested
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = coo.to_sparse_csr()

    def mix(self, x: Tensor, out: Tensor) -> Tensor:
        """``W x`` written into ``out`` (same shape as ``x``, not ``x`` itself)."""
        for start in range(0, x.shape[1], self.COLUMN_BLOCK):
            block = slice(start, start + self.COLUMN_BLOCK)
            out[:, block] = self.matrix @ x[:, block].contiguous()
        return out


class StackedDsgdMember(LocalMember):
    """A ``LocalMember`` under ``decentralized.algorithm=dsgd`` whose models and momenta are rows of
    two [n, D] tensors (module docstring). Only the round, the evaluation and the checkpoint
    conversion differ; the records and the sink protocol are ``LocalMember``'s. There is no node-by-node
    form (``has_node_by_node``): ``run_local_member(..., node_by_node=True)`` refuses dsgd, and
    ``decentralized.vectorize`` (dpsgd's local epochs) does not act here."""

    has_node_by_node = False

    def __init__(self, cfg: RunConfig, entry: str, name: str, routing: Routing, data: ImageData,
                 parts: Sequence[Any], roles: Mapping[str, Sequence[int]]) -> None:
        super().__init__(cfg, entry, name, routing, data, parts, roles)
        self.template = exchanged_state(self.model)
        start = flatten_state(self.template)
        self.row = {i: k for k, i in enumerate(self.active)}
        self.x = start.repeat(len(self.active), 1)
        self.m = torch.zeros_like(self.x)
        self.spare = torch.empty_like(self.x)  # the next round's models are written here, then the two swap
        graph = routing.graph.subgraph(self.active)
        self.neighbours = {i: sorted(j for j in graph.neighbors(i) if j != i) for i in self.active}
        self.gossip = GossipMatrix(self.row, routing, self.neighbours)
        self.fast_mix = not self.cfg.defense.pre_aggregation and all(type(r) is Gossip for r in self.rules.values())

    def build_models(self) -> None:
        self.model = new_model(self.cfg, self.data)  # one template; the rows are the models
        self.models = {}

    def send(self, round_: int) -> Sent:
        """Every node's gradient at the model it sends (vmap'd chunks), folded into its momentum row;
        the vectors sent are the rows of X themselves."""
        beta, form = self.cfg.train.client_momentum, self.cfg.train.client_momentum_form
        mozi_step = own_step(self.cfg, self.rule)
        for start in range(0, len(self.active), GRADIENT_CHUNK):
            ids = self.active[start:start + GRADIENT_CHUNK]
            per_node = [step_batches(self.clients[i].x, self.clients[i].y, self.cfg, round_, i, self.rule) for i in ids]
            grads = None
            for draw in range(len(per_node[0])):  # B_i, and MOZI's B'_i under own_step: the gradients summed
                xb = float_images(torch.stack([batches[draw][0] for batches in per_node]))
                g = stacked_gradients(self.model, self.x[start:start + len(ids)], xb,
                                      torch.stack([batches[draw][1] for batches in per_node]),
                                      self.cfg.train.weight_decay,
                                      dropout_seeds(self.cfg, self.model, round_, ids, draw))
                grads = g if grads is None else grads.add_(g)
            if mozi_step:  # MOZI's own step: m_i <- g_i, no momentum (fedepic.algorithms.dsgd.own_step)
                self.m[start:start + len(ids)] = grads
                continue
            # m <- beta m + (1 - beta) g (or beta m + g) on the chunk's rows, in place (the gradients are
            # scratch): a fresh [n, D] tensor per step would cost more in page faults than the arithmetic
            raw = [k for k, i in enumerate(ids) if not keeps_momentum(self.cfg, self.clients[i].is_malicious)]
            kept = grads[raw].clone() if raw else None  # attack.momentum=false: their raw gradients
            client_momentum_(self.m[start:start + len(ids)], grads, beta, form, scratch=True)
            if raw:
                self.m[[start + k for k in raw]] = kept
        if not steps_after_mix(self.cfg, self.rule):  # the half-step x_i - eta m_i is sent and combined
            step_rows(self.x, self.m, round_lr(self.cfg, round_), scratch=self.spare)
        for i in self.active:
            self.states[i].round = round_
        return Sent({i: self.x[k] for i, k in self.row.items()})

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        """The mix R of every row (the attackers' messages in place of their rows), then the step
        x_i <- R_i - eta m_i, the evaluation when due and the states when ``collect``. The vectors
        ``send`` returned (rows of the old X) are scratch afterwards."""
        mixed, reports = self._mix(messages)
        if steps_after_mix(self.cfg, self.rule):  # x_i <- R_i - eta m_i; under adapt_then_combine the step came before sending
            step_rows(mixed, self.m, round_lr(self.cfg, round_), scratch=self.x)
        self.spare, self.x = self.x, mixed
        return self._received(round_, reports, collect)

    def _mix(self, sent: Messages) -> tuple[Tensor, dict[int, AggregationReport]]:
        changed = [(s, r, v) for s, msgs in sent.items() if s in self.bad for r, v in msgs.items()]
        finite = bool(finite_rows(self.x).all()) and all(bool(finite_rows(v[None])[0]) for _, _, v in changed)
        if not (self.fast_mix and finite):
            return self._mix_node_by_node(sent)
        mixed = self.gossip.mix(self.x, self.spare)
        for sender, receiver, vector in changed:  # an attacker's message in place of its row
            weight = self.routing.weights[receiver][sender]
            mixed[self.row[receiver]].add_(weight * (vector - self.x[self.row[sender]]))
        return mixed, {i: AggregationReport(kept=list(self.neighbours[i])) for i in self.active}

    def _mix_node_by_node(self, sent: Messages) -> tuple[Tensor, dict[int, AggregationReport]]:
        boxes: dict[int, dict[int, Tensor]] = defaultdict(dict)
        for sender, msgs in sent.items():
            for receiver, vector in msgs.items():
                boxes[receiver][sender] = vector
        mixed, reports = self.spare, {}
        draw = score_draw(self.cfg, self.rule)  # MOZI's minibatch: B'_i under its own step (fedepic.algorithms.dsgd)
        for i, k in self.row.items():
            ids = sorted(boxes[i])
            weights, self_weight = self._mixing(i, boxes[i])
            stack = torch.stack([self.x[k], *(boxes[i][j] for j in ids)])  # own first, the rules' layout
            w = torch.tensor([self_weight, *(weights[j] for j in ids)], dtype=self.x.dtype)
            mixed[k], reports[i] = aggregate_vectors(self.rule, self.cfg, stack[0], stack[1:], ids, w, self.states[i],
                                                     self.clients[i].is_malicious, self.rules, stack, node=i,
                                                     loss=self.node_loss(i, self.model, draw))
        return mixed, reports

    def _evaluate(self) -> tuple[dict[int, dict], dict[int, Tensor]]:
        nodes = [i for i in self.benign if i in self.row]
        index = [self.row[i] for i in nodes]
        # every row benign (no attacker, or `upper`): the models themselves, not a copy (1,000 MLP rows: 0.9 GB)
        rows = self.x if index == list(range(self.x.shape[0])) else self.x[index]
        results = evaluate_rows(self.model, rows, self.cfg, self.data)
        return dict(zip(nodes, results)), {i: rows[k] for k, i in enumerate(nodes)}

    def node_model(self, i: int) -> dict[str, Tensor]:
        """Node ``i``'s model as a state dict (exchanged entries)."""
        return unflatten_like(self.x[self.row[i]].clone(), self.template)

    def plain_states(self) -> dict[int, dict[str, Any]]:
        out = {}
        for i, state in self.states.items():
            full = NodeState(**{**state.__dict__, "model": self.node_model(i),
                                "momentum": self.m[self.row[i]].clone()})
            arrays, config = full.to_plain()
            out[i] = {"arrays": arrays, "config": config}
        return out

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        super().restore(states)
        for i, state in self.states.items():
            if state.model is not None:
                self.x[self.row[i]] = flatten_state(state.model)
            if state.momentum is not None:
                self.m[self.row[i]] = state.momentum
            state.model, state.momentum = None, None



def member_class(cfg: RunConfig) -> type:
    """The in-process member of ``decentralized.algorithm``: the class its ``fedepic.extensions.ALGORITHMS``
    entry names in ``info["member"]`` (dsgd: ``StackedDsgdMember``, whose models are BatchNorm-free by
    validation), else ``LocalMember``, which runs the entry's node step (``fedepic.algorithms``) node by
    node or in its all-nodes form."""
    from fedepic import extensions
    from fedepic.registry import load_target

    member = extensions.ALGORITHMS.get(cfg.decentralized.algorithm).info.get("member")
    return LocalMember if member is None else load_target(member)
