"""The in-process backend of the decentralized round engine (``engine=local``): every node of a member
in this process, with the same node, routing, attack and rule functions as the Flower apps
(``peer_node``, ``peer_routing``), and without Flower or Ray (it imports neither: tests/test_layers.py
checks it).

The round itself (node work -> the attacks of ``peer_routing.outgoing`` -> each receiver's aggregation
and step -> evaluation -> the metrics record) and the member loop are ``fedepic.peer_rounds``'; a
``LocalMember`` is a ``peer_rounds.PeerBackend``:

- ``send``: under dpsgd every active node's ``clients.local_epochs`` of local training, in one
  vectorized loop (``peer_node.train_local_stacked``, over ``fedepic.stacked_fit``) for models without
  convolutions (mlp), else one node after another (``train_local``, as a Ray node does): see
  ``LocalMember.vectorized_training``. Under dsgt every node's (model, tracker) vector (in round 1
  after y_i(0) = g_i(x_i(0)), all nodes' gradients in one vectorized call, ``fedepic.stacked``).
  Under dsgd the member is ``fedepic.peer_stacked.StackedDsgdMember`` (``peer_stacked.member_class``).
- ``receive``: each node's inbox aggregated with its rule (``peer_node.aggregate_flat``; dsgt: the two
  sums of ``dsgt_mix``, the step and, in one vectorized call, the gradients at the new points); then,
  where ``peer_node.eval_due`` says (``train.eval_every``), all benign nodes evaluated in one
  vectorized pass (``peer_eval.evaluate_rows``) for models without BatchNorm, else one node at a time
  with the Ray node's own ``evaluate`` and ``attack_success``.

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
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.client_data import ClientData, build_client_data, client_partition, partition_report
from fedepic.peer_eval import average_record, evaluate_rows, stackable
from fedepic.peer_node import (
    HONEST, AggregationReport, LocalJob, NodeState, aggregate_flat, derive_seed, dsgt_batch, dsgt_finish,
    dsgt_gradients, dsgt_message, dsgt_mix, dsgt_point, dsgt_start, eval_due, exchanged_state, is_dsgd, is_dsgt,
    BatchLoss, load_exchanged, needs_loss, new_model, own_batch_loss, peer_rule, train_local, train_local_stacked,
    uses_local_epic,
)
from fedepic.peer_rounds import Member, Messages, Received, RunSink, Sent, peer_setting, play_round, run_peer_member
from fedepic.peer_routing import Routing, communication_graph, inbox, routing_for, run_label_roles


# nodes per vectorized training loop: about six copies of a chunk's parameters are alive at once
# (starts, layers, gradients, momenta, results): 6 x 64 x D float32 values (0.36 GB for the MLP's D)
TRAINING_CHUNK = 64


class LocalMember:
    """One member (``strategies`` entry) run in process: its rule, config, nodes and their states; a
    ``peer_rounds.PeerBackend`` (module docstring).

    ``node_by_node``: train the nodes' local epochs one after another, as Ray nodes do, instead of in
    one vectorized loop (the reference the Flower run is compared with to the last bit)."""

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
    def send(self, round_: int) -> Sent:
        """Every active node's vector of ``round_``: its trained model (dpsgd; its training loss in the
        stats), or its (model, tracker) (dsgt)."""
        if is_dsgt(self.cfg):
            return Sent(self._dsgt_vectors(round_))
        if is_dsgd(self.cfg):
            raise TypeError("dsgd runs on the stacked rows: build the member with peer_stacked.member_class(cfg)")
        trained, losses = self._dpsgd_train_stacked(round_) if self.vectorized_training() else self._dpsgd_train(round_)
        return Sent(trained, {i: {"train_loss": loss} for i, loss in losses.items()})

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        """Every node's aggregation of its inbox (dsgt: and its step and new gradient), then the
        evaluation when due and the states when ``collect``."""
        if is_dsgt(self.cfg):
            reports = self._dsgt_step(round_, work.vectors, messages)
        else:
            reports = self._aggregate_inboxes(work.vectors, messages)
        return self._received(round_, reports, collect)

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

    # -- dpsgd -----------------------------------------------------------------------------------
    def _mixing(self, i: int, box: Mapping[int, Any]) -> tuple[dict[int, float], float]:
        w = self.routing.weights[i]
        return {j: w[j] for j in box}, 1 - sum(w[j] for j in box)

    def _dpsgd_train(self, round_: int) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """Every node's local epochs, one node after another (``train_local``, as a Ray node trains)."""
        trained, losses = {}, {}
        for i in self.active:
            net, state, client = self.models[i], self.states[i], self.clients[i]
            start = state.model if state.model is not None else exchanged_state(new_model(self.cfg, self.data))
            load_exchanged(net, start)
            stats = train_local(net, client.x, client.y, self.cfg, state, round_=round_,
                                seed=derive_seed(self.cfg.seed, round_, i), device=self.device,
                                epic=uses_local_epic(self.rule, self.cfg, client.is_malicious),
                                poison_mask=client.poisoned)
            losses[i] = stats["train_loss"]
            state.trained, state.model, state.round = exchanged_state(net), None, round_
            trained[i] = flatten_state(state.trained)
        return trained, losses

    def vectorized_training(self) -> bool:
        """Whether local epochs run in one vectorized loop (``decentralized.vectorize``): for models whose
        state is their parameters (plus the fixed normalisation), without convolutions and without
        dropout. vmap turns per-node convolution weights into grouped convolutions, which measured
        slower than the loop over nodes for the cnn and faster for the MLP (docs/results/engines.md);
        BatchNorm's running statistics are not parameters; dropout's randomness would not follow a
        node's own generator."""
        model = self.models[self.active[0]]
        only_parameters = set(model.state_dict()) - set(FIXED_BUFFERS) == {n for n, _ in model.named_parameters()}
        unsupported = (torch.nn.modules.conv._ConvNd, torch.nn.modules.dropout._DropoutNd)
        return (self.cfg.decentralized.vectorize and not self.node_by_node and only_parameters
                and not any(isinstance(m, unsupported) for m in model.modules()))

    def _dpsgd_train_stacked(self, round_: int) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """Every node's local epochs in one vectorized loop (``peer_node.train_local_stacked``): the same
        seeds, rows, EPIC selections and SGD as ``train_local`` node by node, up to float rounding."""
        starts, jobs, nodes, trained, losses = [], [], [], {}, {}
        for i in self.active:
            state, client = self.states[i], self.clients[i]
            start = state.model if state.model is not None else exchanged_state(new_model(self.cfg, self.data))
            if len(client.y) == 0:  # train_local's early return: nothing to train, the model goes out as it came
                losses[i] = float("nan")
                state.trained, state.model, state.round = start, None, round_
                trained[i] = flatten_state(start)
                continue
            starts.append(flatten_state(start))
            nodes.append(i)
            jobs.append(LocalJob(state, client.x, client.y, derive_seed(self.cfg.seed, round_, i),
                                 uses_local_epic(self.rule, self.cfg, client.is_malicious), self.models[i],
                                 client.poisoned))
        for first in range(0, len(nodes), TRAINING_CHUNK):  # nodes are independent: chunks bound the memory
            chunk = slice(first, first + TRAINING_CHUNK)
            rows, stats = train_local_stacked(self.models[nodes[0]], torch.stack(starts[chunk]), jobs[chunk],
                                              self.cfg, round_=round_, device=self.device)
            for k, i in enumerate(nodes[chunk]):
                state = self.states[i]
                state.trained, state.model, state.round = unflatten_like(rows[k], self.template), None, round_
                trained[i], losses[i] = rows[k], stats[k]["train_loss"]
        return trained, losses

    def _aggregate_inboxes(self, trained: Mapping[int, torch.Tensor], messages: Messages
                           ) -> dict[int, AggregationReport]:
        """Each node's inbox (the attacks applied) aggregated with its rule over its own trained model."""
        reports = {}
        for i in self.active:
            box = inbox(messages, i)
            weights, self_weight = self._mixing(i, box)
            own = trained[i].clone()  # trained[i] is in the neighbours' inboxes too, and a rule may work in place
            reports[i] = aggregate_flat(self.rule, self.cfg, self.states[i], own, box, weights, self_weight,
                                        self.clients[i].is_malicious, self.rules, node=i,
                                        loss=self.node_loss(i, self.models[i]))
        return reports

    # -- dsgt ------------------------------------------------------------------------------------
    def _dsgt_vectors(self, round_: int) -> dict[int, torch.Tensor]:
        """Every node's (x_i, y_i); in the first round y_i(0) = g_i(x_i(0)) on a minibatch seeded with
        round 0 first."""
        fresh = [i for i in self.active if self.states[i].tracker is None]
        if fresh:
            starts = {i: self.models[i] for i in fresh}
            points = torch.stack([flatten_state(exchanged_state(starts[i])) for i in fresh])
            grads = dsgt_gradients(starts[fresh[0]], points, [self._batch(i, 0) for i in fresh], self.cfg)
            for k, i in enumerate(fresh):
                dsgt_start(self.states[i], starts[i], grads[k])
        for i in self.active:
            self.states[i].round = round_  # as a Ray node's train phase sets it: the oracle reads it
        return {i: flatten_state(dsgt_message(self.states[i])) for i in self.active}

    def _dsgt_step(self, round_: int, sent: Mapping[int, torch.Tensor], messages: Messages
                   ) -> dict[int, AggregationReport]:
        """The two sums at every node, its step, the gradients at the new points (one vectorized
        call) and the tracker update."""
        reports, points, mixed_y = {}, [], {}
        for i in self.active:
            box = inbox(messages, i)
            weights, self_weight = self._mixing(i, box)
            x, y, reports[i] = dsgt_mix(self.rule, self.cfg, self.states[i], box, weights, self_weight,
                                        self.clients[i].is_malicious, self.rules, own=sent[i], node=i)
            points.append(dsgt_point(self.cfg, self.states[i], x, round_))
            mixed_y[i] = y
        stacked = torch.stack(points)
        grads = dsgt_gradients(self.models[self.active[0]], stacked, [self._batch(i, round_) for i in self.active],
                               self.cfg)
        for k, i in enumerate(self.active):
            dsgt_finish(self.states[i], stacked[k], mixed_y[i], grads[k])
        return reports

    def node_loss(self, i: int, model: torch.nn.Module) -> Optional[BatchLoss]:
        """Node ``i``'s own-batch loss for a rule flagged ``needs_loss`` (MOZI), with ``model`` as scratch;
        None for the other rules and at malicious nodes."""
        client = self.clients[i]
        if not needs_loss(self.rule, client.is_malicious):
            return None
        return own_batch_loss(model, client.x, client.y, self.cfg, self.states[i].round, i)

    def _batch(self, i: int, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        client = self.clients[i]
        return dsgt_batch(client.x, client.y, self.cfg, derive_seed(self.cfg.seed, round_, i))

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
