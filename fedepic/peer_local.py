"""The in-process backend of the decentralized round engine (``engine=local``): every node of a member
in this process, with the same node, routing, attack and rule functions as the Flower apps
(``peer_node``, ``peer_routing``), and without Flower or Ray (it imports neither: tests/test_layers.py
checks it).

The round itself (node work -> the attacks of ``peer_routing.outgoing`` -> each receiver's aggregation
and step -> evaluation -> the metrics record) and the member loop are ``fedepic.peer_rounds``'; a
``LocalMember`` is a ``peer_rounds.PeerBackend``:

- ``send`` and ``receive`` call the algorithm's node step (``self.step``: the target of its
  ``fedepic.extensions.ALGORITHMS`` entry, ``fedepic.algorithms``), the very functions a Ray node
  calls: ``send`` every active node's send half (dpsgd: its ``clients.local_epochs`` of local
  training; dsgt: its (model, tracker) vector), ``receive`` every node's aggregation of its inbox with
  its rule and its step. Where the step has an all-nodes form (``send_all``, ``receive_all``) and
  ``node_by_node`` is off, that runs instead: dpsgd's local epochs in one vectorized loop
  (``peer_node.train_local_stacked``, over ``fedepic.stacked_fit``) for models without convolutions
  (mlp, ``LocalMember.vectorized_training``), dsgt's gradients of all nodes in one vectorized call
  (``fedepic.stacked``); both tested equal to the per-node step. Under dsgd the member is
  ``fedepic.peer_stacked.StackedDsgdMember`` (its entry's ``info["member"]``, ``peer_stacked.member_class``).
- after ``receive``, where ``peer_node.eval_due`` says (``train.eval_every``), all benign nodes are
  evaluated in one vectorized pass (``peer_eval.evaluate_rows``) for models without BatchNorm, else one
  node at a time with the Ray node's own ``evaluate`` and ``attack_success``.

Each node's model is built once and reused across rounds. This backend is also the reference the
Flower run is tested against (same seed, same numbers: tests/test_decentralized.py). It is not
parallel: one process, torch's own threads. Cost per round: the nodes' training (or one gradient
each) and their rules, O(edges x D) for the messages' stacks.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional, Sequence

import torch

from fedepic.attacks import attack_success
from fedepic.config import RunConfig, malicious_ids, member_config
from fedepic.data import ImageData, load_dataset
from fedepic.models import FIXED_BUFFERS
from fedepic.train import evaluate
from fedepic.vectors import flatten_state
from fedepic.client_data import ClientData, build_client_data, client_partition, partition_report
from fedepic.peer_eval import average_record, evaluate_rows, stackable
from fedepic.peer_node import (
    HONEST, AggregationReport, BatchLoss, NodeState, eval_due, exchanged_state, load_exchanged, needs_loss,
    new_model, node_batch, own_batch_loss, peer_rule,
)
from fedepic.peer_rounds import Member, Messages, Received, RunSink, Sent, peer_setting, play_round, run_peer_member
from fedepic.peer_routing import Routing, communication_graph, inbox as inbox_of, routing_for, run_label_roles
from fedepic.algorithms import Inbox, PeerNode, node_step
from fedepic.algorithms.dpsgd import aggregate_inbox


class LocalMember:
    """One member (``strategies`` entry) run in process: its rule, config, nodes and their states; a
    ``peer_rounds.PeerBackend`` (module docstring).

    ``node_by_node``: run the node step one node after another, as Ray nodes do, never its all-nodes
    form (dpsgd's vectorized local epochs, dsgt's vectorized gradients): the reference the Flower run is
    compared with to the last bit."""

    node_by_node = False
    has_node_by_node = True  # whether ``node_by_node`` acts (``run_local_member`` refuses it where not)

    def __init__(self, cfg: RunConfig, entry: str, name: str, routing: Routing, data: ImageData,
                 parts: Sequence[Any], roles: Mapping[str, Sequence[int]]) -> None:
        self.setting = peer_setting(cfg, Member(name, entry, routing), roles)
        self.rule, self.cfg = self.setting.rule, self.setting.cfg
        self.name, self.routing, self.data, self.roles = name, routing, data, roles
        self.bad, self.benign, self.active = self.setting.malicious, self.setting.benign, self.setting.active
        self.clients: dict[int, ClientData] = {i: build_client_data(cfg, data, i, parts) for i in self.active}
        self.states = {i: NodeState(name) for i in self.active}
        self.attack_memory: dict = {}  # play_round's (the engine's loop keeps its own)
        self.build_models()
        self.device = torch.device("cpu")
        # built once: the rules keep their per-node state in NodeState, not in themselves
        self.rules = {self.rule: peer_rule(self.rule, self.cfg), HONEST: peer_rule("gossip", self.cfg, defended=False)}
        self.step = node_step(self.cfg)  # the algorithm's node step: its fedepic.extensions.ALGORITHMS entry

    def build_models(self) -> None:
        """One model per node, built once and reloaded every round."""
        self.models = {i: new_model(self.cfg, self.data) for i in self.active}
        self.template = exchanged_state(self.models[self.active[0]])  # the layout of the flat rows

    def play_round(self, round_: int) -> dict[str, Any]:
        """One round through the engine (``peer_rounds.play_round``): its metrics record. For tests and
        benchmarks that drive a member round by round (a stateful attack's memory kept in
        ``attack_memory``); runs go through ``run_local_member``."""
        return play_round(self, round_, memory=self.attack_memory)[0]

    # -- the two phases of a round (peer_rounds.PeerBackend) -------------------------------------
    def node(self, i: int) -> PeerNode:
        """Node ``i`` as its algorithm's step sees it (``fedepic.algorithms.PeerNode``)."""
        return PeerNode(i, self.rule, self.cfg, self.states[i], self.clients[i], self.models[i], self.template,
                        self.device, self.rules)

    def send(self, round_: int) -> Sent:
        """Every active node's send half (``self.step``, the algorithm's node step): its all-nodes form
        where it has one and ``node_by_node`` is off, else node by node."""
        sent = None if self.node_by_node else self.step.send_all(self, round_)
        if sent is not None:
            return sent
        vectors, stats = {}, {}
        for i in self.active:
            out = self.step.send(self.node(i), round_)
            vectors[i], stats[i] = flatten_state(out.message), dict(out.stats)
        return Sent(vectors, stats)

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        """Every node's receive half (aggregation of its inbox and its step; all nodes at once where the
        step has that form and ``node_by_node`` is off), then the evaluation when due and the states when
        ``collect``."""
        reports = None if self.node_by_node else self.step.receive_all(self, round_, work, messages)
        if reports is None:
            reports = {i: self.step.receive(self.node(i), round_, self.inbox(i, messages, work.vectors[i]))
                       for i in self.active}
        return self._received(round_, reports, collect)

    def inbox(self, i: int, messages: Messages, own: Optional[torch.Tensor] = None) -> Inbox:
        """What node ``i`` received in ``messages``, with its mixing weights (and ``own``, what it sent)."""
        box = inbox_of(messages, i)
        weights, self_weight = self._mixing(i, box)
        return Inbox(box, weights, self_weight, own)

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        for i, plain in states.items():
            if int(i) in self.states:
                self.states[int(i)] = NodeState.from_plain(plain["arrays"], plain["config"])

    def _received(self, round_: int, reports: Mapping[int, AggregationReport], collect: bool) -> Received:
        confirmed = {i: list(reports[i].confirmed) for i in self.active}
        nonfinite = sum(len(r.nonfinite) + int(r.own_nonfinite) for r in reports.values())
        evals, models = self._evaluate() if eval_due(self.cfg, round_) else ({}, {})
        template = self.models[self.active[0]] if self.models else getattr(self, "model", None)
        average = average_record(self.cfg, self.data, models, template)
        return Received(evals, models, confirmed, nonfinite, self.plain_states() if collect else {},
                        average=average)

    def _mixing(self, i: int, box: Mapping[int, Any]) -> tuple[dict[int, float], float]:
        w = self.routing.weights[i]
        return {j: w[j] for j in box}, 1 - sum(w[j] for j in box)

    def vectorized_training(self) -> bool:
        """Whether local epochs run in one vectorized loop (``decentralized.vectorize``): for models whose
        state is their parameters (plus the fixed normalisation), without convolutions and without
        torch's dropout. vmap turns per-node convolution weights into grouped convolutions, which measured
        slower than the loop over nodes for the cnn and faster for the MLP (docs/results/engines.md);
        BatchNorm's running statistics are not parameters; torch's dropout draws from the global RNG,
        not a node's own generator (``fedepic.dropout.MaskedDropout`` draws from it: supported)."""
        model = self.models[self.active[0]]
        only_parameters = set(model.state_dict()) - set(FIXED_BUFFERS) == {n for n, _ in model.named_parameters()}
        unsupported = (torch.nn.modules.conv._ConvNd, torch.nn.modules.dropout._DropoutNd)
        return (self.cfg.decentralized.vectorize and not self.node_by_node and only_parameters
                and not any(isinstance(m, unsupported) for m in model.modules()))

    def _aggregate_inboxes(self, trained: Mapping[int, torch.Tensor], messages: Messages
                           ) -> dict[int, AggregationReport]:
        """Each node's inbox (the attacks applied) aggregated with its rule over its own trained model
        (``fedepic.algorithms.dpsgd.aggregate_inbox``, the receive half of dpsgd and, before its step,
        of dsgd)."""
        return {i: aggregate_inbox(self.node(i), self.states[i].round, self.inbox(i, messages, trained[i]))
                for i in self.active}

    def node_loss(self, i: int, model: torch.nn.Module, draw: int = 0) -> Optional[BatchLoss]:
        """Node ``i``'s own-batch loss (its minibatch number ``draw``: ``peer_node.own_batch_loss``) for a
        rule flagged ``needs_loss`` (MOZI), with ``model`` as scratch; None for the other rules and at
        malicious nodes."""
        client = self.clients[i]
        if not needs_loss(self.rule, client.is_malicious):
            return None
        return own_batch_loss(model, client.x, client.y, self.cfg, self.states[i].round, i, draw)

    def _batch(self, i: int, round_: int, first_round: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Node ``i``'s minibatch of ``round_`` (``peer_node.node_batch``, as its Ray node draws it)."""
        client = self.clients[i]
        return node_batch(client.x, client.y, self.cfg, round_, i, first_round)

    def _evaluate(self) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
        nodes = [i for i in self.benign if i in self.states]
        if nodes and stackable(self.models[nodes[0]]):  # all benign nodes in one vectorized pass
            vectors = {i: flatten_state(self.states[i].model) for i in nodes}
            results = evaluate_rows(self.models[nodes[0]], torch.stack(list(vectors.values())), self.cfg, self.data)
            return dict(zip(nodes, results)), vectors
        evals, vectors = {}, {}
        for i in self.benign:
            if i not in self.states:
                continue
            net = load_exchanged(self.models[i], self.states[i].model)
            result = evaluate(net, self.data.test_x, self.data.test_y, self.cfg.train.eval_batch_size,
                              self.data.num_classes, self.cfg.train.amp)
            success = attack_success(net, self.cfg.attack, self.data.test_x, self.data.test_y, self.data.num_classes)
            evals[i] = {**result, "attack_success": None if success is None else float(success)}
            vectors[i] = flatten_state(self.states[i].model)
        return evals, vectors

    # -- checkpoints ----------------------------------------------------------------------------
    def plain_states(self) -> dict[int, dict[str, Any]]:
        """The nodes' states as the Flower router collects them (``{"arrays", "config"}``)."""
        out = {}
        for i, state in self.states.items():
            arrays, config = state.to_plain()
            out[i] = {"arrays": arrays, "config": config}
        return out


def run_local_member(cfg: RunConfig, member: Member, sink: RunSink, data: ImageData, parts: Sequence[Any],
                     roles: Mapping[str, Sequence[int]], stop: Optional[threading.Event] = None,
                     node_by_node: bool = False) -> None:
    """``member`` through ``sink`` in this process: ``peer_rounds.run_peer_member`` (the loop the Flower
    router runs too) with a ``peer_stacked.member_class(cfg)`` backend. ``node_by_node``: see
    ``LocalMember``; a member class without a node-by-node form (``peer_stacked.StackedDsgdMember``,
    whose rows are one tensor) refuses it with a ValueError rather than run its stacked rows."""
    from fedepic.peer_stacked import member_class  # it imports this module

    kind = member_class(cfg)
    if node_by_node and not kind.has_node_by_node:
        raise ValueError(f"node_by_node=True: decentralized.algorithm={cfg.decentralized.algorithm} runs in process "
                         f"as {kind.__name__}, which has no node-by-node form (its nodes are rows of one tensor)")

    def backend() -> LocalMember:
        local = kind(cfg, member.strategy, member.name, member.routing, data, parts, roles)
        local.node_by_node = node_by_node
        return local

    run_peer_member(cfg, member, sink, backend, stop)


class _Collect(RunSink):
    """A sink that keeps the records without timings and failures (``run_sequential``)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def round(self, member: Member, record: Mapping[str, Any]) -> None:
        self.records.append({k: v for k, v in record.items() if k not in ("seconds", "failures")})


def run_sequential(cfg: RunConfig, strategy: str, data: Optional[ImageData] = None,
                   node_by_node: bool = False) -> list[dict[str, Any]]:
    """One ``strategies`` entry's rounds in process; returns the per-round records (without timings
    and failures). ``data`` may be passed to reuse a loaded dataset across strategies.
    ``node_by_node``: see ``LocalMember``."""
    data = load_dataset(cfg.data, cfg.seed) if data is None else data
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    rule, _ = member_config(cfg, strategy)
    routing = routing_for(rule, communication_graph(cfg), malicious_ids(cfg), cfg.topology.mixing)
    member = Member(strategy, strategy, routing)
    sink = _Collect()
    run_local_member(cfg, member, sink, data, parts, roles, node_by_node=node_by_node)
    return sink.records
