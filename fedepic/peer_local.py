"""The in-process engine of the decentralized mode (``engine=local``): every node of a round in this
process, with the same node, router, attack and rule functions as the Flower apps (``peer_node``,
``peer_routing``), and without Flower or Ray (it imports neither: tests/test_layers.py checks it).

- Each node's model is built once and reused across rounds.
- Under ``decentralized.algorithm=dsgt`` or ``dsgd`` the round's gradients of all nodes are one
  vectorized call (``fedepic.stacked``, torch.func.vmap over functional_call). Under dpsgd (local
  epochs) the nodes of a round train in one vectorized loop (``peer_node.train_local_stacked``, over
  ``fedepic.stacked_fit``) for models without convolutions (mlp); the cnn models and models with
  BatchNorm train one node after another (``train_local``, as a Ray node does): see
  ``LocalMember.vectorized_training``.
- Evaluation runs where ``peer_node.eval_due`` says (``train.eval_every``): all benign nodes in one
  vectorized pass (``peer_eval.evaluate_rows``) for models without BatchNorm, else one node at a time
  with the Ray node's own ``evaluate`` and ``attack_success``.

It is also the reference the Flower run is tested against (same seed, same numbers:
tests/test_decentralized.py). Pick it for many small rounds on one machine (per-round overhead on Ray
is 0.4 s or more, docs/results/engines.md); pick ``engine=ray`` for big models, GPUs per node and
clusters. It is not parallel: one process, torch's own threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Optional, Sequence

import torch

from fedepic.attacks import attack_success
from fedepic.checkpoint import checkpoint_due
from fedepic.config import RunConfig, malicious_ids, member_config
from fedepic.data import ImageData, load_dataset
from fedepic.extensions import PEER_RULES
from fedepic.models import FIXED_BUFFERS
from fedepic.train import evaluate
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.client_data import ClientData, build_client_data, client_partition, partition_report
from fedepic.peer_eval import evaluate_rows, stackable
from fedepic.peer_node import (
    HONEST, STATEFUL, LocalJob, NodeState, aggregate_flat, derive_seed, dsgd_momentum, dsgd_step, dsgt_batch, dsgt_finish,
    dsgt_gradients, dsgt_message, dsgt_mix, dsgt_point, dsgt_start, eval_due, exchanged_state, is_dsgd, is_dsgt,
    load_exchanged, new_model, peer_rule, train_local, train_local_stacked, uses_local_epic,
)
from fedepic.peer_routing import (
    AttackTally, Routing, communication_graph, detection_record, detection_truth, divergence_counts, inbox, outgoing,
    round_metrics, routing_for, run_label_roles,
)


# nodes per vectorized training loop: about six copies of a chunk's parameters are alive at once
# (starts, layers, gradients, momenta, results), 0.36 GB for 64 MLP nodes
TRAINING_CHUNK = 64


class LocalMember:
    """One member (``strategies`` entry) run in process: its rule, config, nodes and their states.

    ``node_by_node``: train the nodes' local epochs one after another, as Ray nodes do, instead of in
    one vectorized loop (the reference the Flower run is compared with to the last bit)."""

    node_by_node = False

    def __init__(self, cfg: RunConfig, entry: str, name: str, routing: Routing, data: ImageData,
                 parts: Sequence[Any], roles: Mapping[str, Sequence[int]]) -> None:
        self.rule, self.cfg = member_config(cfg, entry)
        self.name, self.routing, self.data, self.roles = name, routing, data, roles
        self.bad = malicious_ids(cfg)
        self.benign = [i for i in range(cfg.clients.count) if i not in set(self.bad)]
        self.active = self.benign if PEER_RULES.has(self.rule, "benign_graph") else list(range(cfg.clients.count))
        self.clients: dict[int, ClientData] = {i: build_client_data(cfg, data, i, parts) for i in self.active}
        self.states = {i: NodeState(name) for i in self.active}
        self.build_models()
        self.truth = detection_truth(routing.graph, self.bad) if self.rule in STATEFUL else None
        self.device = torch.device("cpu")
        # built once: the rules keep their per-node state in NodeState, not in themselves
        self.rules = {self.rule: peer_rule(self.rule, self.cfg), HONEST: peer_rule("gossip", self.cfg, defended=False)}

    def build_models(self) -> None:
        """One model per node, built once and reloaded every round."""
        self.models = {i: new_model(self.cfg, self.data) for i in self.active}
        self.template = exchanged_state(self.models[self.active[0]])  # the layout of the flat rows

    # -- one round ------------------------------------------------------------------------------
    def play_round(self, round_: int) -> dict[str, Any]:
        started = time.perf_counter()
        tally = AttackTally()
        if is_dsgt(self.cfg):
            reports, losses = self._dsgt_round(round_, tally), {}
        elif is_dsgd(self.cfg):
            reports, losses = self._dsgd_round(round_, tally), {}
        else:
            reports, losses = self._dpsgd_round(round_, tally)
        confirmed = {i: reports[i].confirmed for i in self.active}
        nonfinite = sum(len(r.nonfinite) + int(r.own_nonfinite) for r in reports.values())
        if eval_due(self.cfg, round_):
            evals, vectors = self._evaluate()
            record = {"round": round_, **round_metrics(evals, vectors, self.benign, self.roles,
                                                       confirmed if self.truth else None, self.truth)}
            record.update(divergence_counts(evals, vectors, self.benign))
        else:
            record = {"round": round_, **detection_record(self.benign, confirmed if self.truth else None, self.truth)}
        record["failures"] = []
        record["nonfinite_models"] = nonfinite
        record["attack_nonfinite_inputs"] = tally.nonfinite_inputs
        benign_losses = [losses[i] for i in self.benign if i in losses]
        if benign_losses:
            record["train_loss"] = sum(benign_losses) / len(benign_losses)
        record["seconds"] = time.perf_counter() - started
        return record

    def _send(self, trained: Mapping[int, torch.Tensor], round_: int, tally: AttackTally) -> dict:
        graph = self.routing.graph.subgraph(self.active)
        return outgoing(self.cfg.attack, trained, graph, self.bad, seed=self.cfg.seed, round_=round_, tally=tally)

    def _mixing(self, i: int, box: Mapping[int, Any]) -> tuple[dict[int, float], float]:
        w = self.routing.weights[i]
        return {j: w[j] for j in box}, 1 - sum(w[j] for j in box)

    def _dpsgd_round(self, round_: int, tally: AttackTally) -> tuple[dict, dict[int, float]]:
        if self.vectorized_training():
            trained, losses = self._dpsgd_train_stacked(round_)
            return self._exchange_models(trained, round_, tally), losses
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
        return self._exchange_models(trained, round_, tally), losses

    def vectorized_training(self) -> bool:
        """Whether local epochs run in one vectorized loop (``decentralized.vectorize``): for models whose
        state is their parameters (plus the fixed normalisation), without convolutions and without
        dropout. vmap turns per-node convolution weights into grouped convolutions, which measured 1.45x
        slower than the loop over nodes for the cnn (20 nodes, batch 32, 2 epochs; the MLP: 1.27x
        faster); BatchNorm's running statistics are not parameters; dropout's randomness would not
        follow a node's own generator."""
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

    def _exchange_models(self, trained: Mapping[int, torch.Tensor], round_: int, tally: AttackTally) -> dict:
        """Send the nodes' models (attacks included) and aggregate each node's inbox with its rule."""
        sent = self._send(trained, round_, tally)
        reports = {}
        for i in self.active:
            box = inbox(sent, i)
            weights, self_weight = self._mixing(i, box)
            own = trained[i].clone()  # trained[i] is in the neighbours' inboxes too, and a rule may work in place
            reports[i] = aggregate_flat(self.rule, self.cfg, self.states[i], own, box, weights, self_weight,
                                        self.clients[i].is_malicious, self.rules)
        return reports

    def _dsgt_round(self, round_: int, tally: AttackTally) -> dict:
        fresh = [i for i in self.active if self.states[i].tracker is None]
        if fresh:  # the first round: y_i(0) = g_i(x_i(0)) on a minibatch seeded with round 0
            starts = {i: self.models[i] for i in fresh}
            points = torch.stack([flatten_state(exchanged_state(starts[i])) for i in fresh])
            grads = dsgt_gradients(starts[fresh[0]], points, [self._batch(i, 0) for i in fresh], self.cfg)
            for k, i in enumerate(fresh):
                dsgt_start(self.states[i], starts[i], grads[k])
        for i in self.active:
            self.states[i].round = round_  # as a Ray node's train phase sets it: the oracle reads it
        trained = {i: flatten_state(dsgt_message(self.states[i])) for i in self.active}
        sent = self._send(trained, round_, tally)
        reports, points, mixed_y = {}, [], {}
        for i in self.active:
            box = inbox(sent, i)
            weights, self_weight = self._mixing(i, box)
            x, y, reports[i] = dsgt_mix(self.rule, self.cfg, self.states[i], box, weights, self_weight,
                                        self.clients[i].is_malicious, self.rules, own=trained[i])
            points.append(dsgt_point(self.cfg, self.states[i], x, round_))
            mixed_y[i] = y
        stacked = torch.stack(points)
        grads = dsgt_gradients(self.models[self.active[0]], stacked, [self._batch(i, round_) for i in self.active],
                               self.cfg)
        for k, i in enumerate(self.active):
            dsgt_finish(self.states[i], stacked[k], mixed_y[i], grads[k])
        return reports

    def _dsgd_round(self, round_: int, tally: AttackTally) -> dict:
        """Every node's gradient at the model it sends (one vectorized call), its momentum, the
        exchange, the peer rule, then the step (``peer_node``: dsgd)."""
        for i in self.active:
            if self.states[i].model is None:
                self.states[i].model = exchanged_state(self.models[i])
        points = torch.stack([flatten_state(self.states[i].model) for i in self.active])
        grads = dsgt_gradients(self.models[self.active[0]], points, [self._batch(i, round_) for i in self.active],
                               self.cfg)
        trained = {}
        for k, i in enumerate(self.active):
            state = self.states[i]
            dsgd_momentum(state, grads[k], self.cfg.train.client_momentum)
            state.trained, state.round = state.model, round_
            trained[i] = points[k]
        reports = self._exchange_models(trained, round_, tally)
        for i in self.active:
            dsgd_step(self.cfg, self.states[i], round_)
        return reports

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

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        for i, plain in states.items():
            if int(i) in self.states:
                self.states[int(i)] = NodeState.from_plain(plain["arrays"], plain["config"])


def run_local_member(cfg: RunConfig, member: Any, sink: Any, data: ImageData, parts: Sequence[Any],
                     roles: Mapping[str, Sequence[int]], stop: Optional[threading.Event] = None,
                     node_by_node: bool = False) -> None:
    """``member`` (a ``dfl_apps.Member``-like: name, strategy, routing) through ``sink`` (a
    ``dfl_apps.RunSink``), exactly as the Flower router drives it: begin (maybe from a checkpoint),
    one ``round`` report per round, checkpoints when due, ``end``. Returns early when ``stop`` is set.
    ``node_by_node``: see ``LocalMember``."""
    if sink.finished(member):
        return
    from fedepic.peer_stacked import member_class

    local = member_class(cfg)(cfg, member.strategy, member.name, member.routing, data, parts, roles)
    local.node_by_node = node_by_node
    start = sink.begin(member)
    local.restore(start.states)
    for round_ in range(start.round + 1, cfg.rounds + 1):
        if stop is not None and stop.is_set():
            return
        sink.round(member, local.play_round(round_))
        if checkpoint_due(cfg.checkpoint_every, round_, cfg.rounds):
            sink.checkpoint(member, round_, local.plain_states())
    sink.end(member)


class _Collect:
    """A sink that keeps the records (``run_sequential``)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def finished(self, member: Any) -> bool:
        return False

    def begin(self, member: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(round=0, states={})

    def round(self, member: Any, record: Mapping[str, Any]) -> None:
        self.records.append({k: v for k, v in record.items() if k not in ("seconds", "failures")})

    def checkpoint(self, *args: Any) -> None: ...

    def end(self, member: Any) -> None: ...


def run_sequential(cfg: RunConfig, strategy: str, data: Optional[ImageData] = None,
                   node_by_node: bool = False) -> list[dict[str, Any]]:
    """One ``strategies`` entry's rounds in process; returns the per-round records (without timings
    and failures). ``data`` may be passed to reuse a loaded dataset across strategies.
    ``node_by_node``: see ``LocalMember``."""
    from types import SimpleNamespace

    data = load_dataset(cfg.data, cfg.seed) if data is None else data
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    rule, _ = member_config(cfg, strategy)
    member = SimpleNamespace(name=strategy, strategy=strategy,
                             routing=routing_for(rule, communication_graph(cfg), malicious_ids(cfg)))
    sink = _Collect()
    run_local_member(cfg, member, sink, data, parts, roles, node_by_node=node_by_node)
    return sink.records
