"""Flower apps of the decentralized mode: a ServerApp that only routes over the communication graph,
and a ClientApp whose nodes train, aggregate with their peer rule and evaluate themselves.

Message flow of one round (``grid.send_and_receive`` takes a different Message per node, which is
what makes the ServerApp a router):
1. ``train``: router -> every node {member, round}. The node loads its state from ``Context.state``
   (a fresh model in round 1), trains locally, keeps the trained model and replies with it.
2. The router decides what travels over each edge (``peer_routing.outgoing``): benign nodes' trained
   models, and the malicious nodes' poisoned ones (the router knows every model: omniscient attacks).
3. ``train.aggregate``: router -> every node ONE message holding its neighbours' models, their ids and
   the node's mixing weights. The node aggregates with its rule (GP state in ``Context.state``),
   evaluates the result on the test set and replies with metrics, its detector's confirmed set and
   its new model (the last only feeds the consensus-distance measurement).
Several strategy runs ("members") go through one simulation in turn; a node resets its state when
the member changes, so they never share anything but the Ray actors.

Checkpoints (``resume=``): a node's state lives on its Ray actor, so the router collects it. In a
round ``r`` with ``r % checkpoint_every == 0`` (the member's last round excepted: it then completes),
the ``train.aggregate`` config carries ``send_state``, and the node adds its state after the
aggregation (``NodeState.to_plain`` as ``dfl.*`` records, the layout of ``Context.state``) to its
reply: exactly what round ``r + 1`` starts from. The router hands those states to the sink
(``RunSink.checkpoint``) once the round's metrics line is logged. A node that failed that round
(or sat it out) keeps the state it had in the previous checkpoint: a resume restores that one,
so after node failures a resumed run may differ from an uninterrupted one. On resume the first
round's ``train`` messages carry each node's saved state, which the node puts into its
``Context.state`` before training. The router itself keeps nothing across rounds, and every random
draw (local training, attack noise) is seeded from (seed, round, node).

Each ClientApp call ships only the config; nodes load the dataset once per actor process
(``fedepic.client_data.dataset_for``) and then cut their partition out of it, and build one model
per process (``node_model``) that they load their state into.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedepic.attacks import attack_success
from fedepic.checkpoint import checkpoint_due
from fedepic.config import RunConfig, member_config, to_yaml
from fedepic.extensions import PEER_RULES
from fedepic.train import evaluate, resolve_device
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.errors import RunFailed

from fedepic.client_data import client_data_for, config_from_text, dataset_for, member_from_text
from simulations.flower_runtime import interrupted_quietly
from fedepic.failures import check_failures, last_line
from simulations.messaging import exchange, wait_for_nodes
from fedepic.peer_node import (
    STATEFUL, NodeState, aggregate_models, derive_seed, dsgd_momentum, dsgd_step, dsgt_batch, dsgt_finish,
    dsgt_gradients, dsgt_message, dsgt_mix, dsgt_point, dsgt_start, eval_due, exchanged_state, is_dsgd, is_dsgt,
    load_exchanged, new_model, one_step, train_local, uses_local_epic,
)
from fedepic.peer_routing import (
    AttackTally, Routing, detection_record, detection_truth, divergence_counts, message_batches, outgoing,
    round_metrics,
)

STATE_PREFIX = "dfl."
MAX_INFLIGHT_BYTES = 1 << 30  # router payload per batch of aggregate messages (see message_batches)
TRAIN = "train"
AGGREGATE = "train.aggregate"
HELLO = "query"


# ----------------------------------------------------------------------------------- node side


def state_records(node: NodeState) -> dict[str, Any]:
    """``node`` as the ``dfl.*`` records of ``Context.state`` (also what a message carrying it holds)."""
    arrays, config = node.to_plain()
    records: dict[str, Any] = {STATE_PREFIX + name: ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
                               for name, tensors in arrays.items()}
    records[STATE_PREFIX + "meta"] = ConfigRecord(config)
    return records


def plain_state(records: RecordDict) -> Optional[dict[str, Any]]:
    """The ``dfl.*`` records of ``records`` as {"arrays", "config"} (``NodeState.to_plain``'s two
    parts, tensors and plain values: what a checkpoint stores), or None when it holds none."""
    meta_key = STATE_PREFIX + "meta"
    if meta_key not in records.config_records:
        return None
    arrays = {k[len(STATE_PREFIX):]: rec.to_torch_state_dict() for k, rec in records.array_records.items()
              if k.startswith(STATE_PREFIX)}
    return {"arrays": arrays, "config": dict(records.config_records[meta_key])}


def node_state_from(plain: Mapping[str, Any]) -> NodeState:
    return NodeState.from_plain(plain["arrays"], plain["config"])


def load_node_state(context: Context, member: str) -> NodeState:
    """The node's state for ``member`` from ``Context.state`` (a fresh one for a new member)."""
    plain = plain_state(context.state)
    if plain is None or plain["config"].get("member") != member:
        return NodeState(member=member)
    return node_state_from(plain)


def save_node_state(context: Context, node: NodeState) -> None:
    """Replace this module's entries of ``Context.state`` with ``node``."""
    for key in [k for k in context.state.keys() if k.startswith(STATE_PREFIX)]:
        del context.state[key]
    for key, record in state_records(node).items():
        context.state[key] = record


def restore_node_state(context: Context, content: RecordDict) -> None:
    """A resumed run's first ``train`` message carries the node's checkpointed state: it replaces
    whatever ``Context.state`` holds (a fresh simulation holds nothing)."""
    plain = plain_state(content)
    if plain is not None:
        save_node_state(context, node_state_from(plain))


def _partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


@lru_cache(maxsize=2)
def node_model(text: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One model per worker process and run config, and the initial (seeded) exchanged state: a node
    loads its state into it for every use instead of building a model per message. Ray runs one
    task at a time per actor, so no two messages share it at once."""
    cfg = config_from_text(text)
    net = new_model(cfg, dataset_for(text))
    return net, exchanged_state(net)


def make_client_app(cfg: RunConfig) -> ClientApp:
    """The DFL node. Only ``cfg`` (as YAML text) travels with the app to the Ray actors."""
    cfg_yaml = to_yaml(cfg)
    app = ClientApp()

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        pid = _partition_id(context)
        client = client_data_for(cfg_yaml, pid)
        return Message(RecordDict({"info": MetricRecord({"partition-id": pid, "num-examples": len(client),
                                                         "malicious": int(client.is_malicious)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = _partition_id(context)
        client = client_data_for(cfg_yaml, pid)
        conf = msg.content.config_records["config"]
        member, round_ = str(conf["member"]), int(conf["round"])
        strategy, run_cfg = member_from_text(cfg_yaml, str(conf["strategy"]))  # a variant: its rule and keys
        restore_node_state(context, msg.content)
        state = load_node_state(context, member)
        device = resolve_device(run_cfg.train.device)
        model, initial = node_model(cfg_yaml)
        start = state.model if state.model is not None else state.trained  # trained: no aggregation came
        load_exchanged(model, initial if start is None else start)
        started = time.perf_counter()
        if is_dsgt(run_cfg):  # nothing to train: send (x_i, y_i); round 1 first takes y_i(0) = g_i(x_i(0))
            # DSGT's vectors and minibatches live on the CPU (fedepic.stacked), so the model stays there
            if state.tracker is None:
                batch = dsgt_batch(client.x, client.y, run_cfg, derive_seed(run_cfg.seed, 0, pid))
                point = flatten_state(exchanged_state(model)).unsqueeze(0)
                dsgt_start(state, model, dsgt_gradients(model, point, [batch], run_cfg)[0])
            state.trained, state.round, stats = dsgt_message(state), round_, {}
        elif is_dsgd(run_cfg):  # the gradient at the model it sends, into the client momentum
            if state.model is None:
                state.model = exchanged_state(model)
            batch = dsgt_batch(client.x, client.y, run_cfg, derive_seed(run_cfg.seed, round_, pid))
            point = flatten_state(state.model).unsqueeze(0)
            gradient = dsgt_gradients(model, point, [batch], run_cfg)[0]
            dsgd_momentum(state, gradient, run_cfg.train.client_momentum)
            state.trained, state.round, stats = state.model, round_, {}
        else:
            model = model.to(device)
            stats = train_local(model, client.x, client.y, run_cfg, state, round_=round_,
                                seed=derive_seed(run_cfg.seed, round_, pid), device=device,
                                epic=uses_local_epic(strategy, run_cfg, client.is_malicious),
                                poison_mask=client.poisoned)
            # the start-of-round model is not needed any more: Context.state travels with every call
            state.trained, state.model, state.round = exchanged_state(model), None, round_
        save_node_state(context, state)
        metrics = {"partition-id": pid, "num-examples": len(client), "train_seconds": time.perf_counter() - started,
                   **{k: float(v) for k, v in stats.items()}}
        return Message(RecordDict({"model": ArrayRecord(state.trained), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.train("aggregate")
    def aggregate(msg: Message, context: Context) -> Message:
        data = dataset_for(cfg_yaml)
        pid = _partition_id(context)
        client = client_data_for(cfg_yaml, pid)
        conf = msg.content.config_records["config"]
        member = str(conf["member"])
        strategy, run_cfg = member_from_text(cfg_yaml, str(conf["strategy"]))
        state = load_node_state(context, member)
        ids = [int(j) for j in conf["neighbours"]]
        received = {j: msg.content.array_records[f"n.{j}"].to_torch_state_dict() for j in ids}
        weights = dict(zip(ids, (float(w) for w in conf["weights"])))
        round_ = int(conf["round"])
        if is_dsgt(run_cfg):  # the two sums, the step, the gradient at the new point, the tracker update
            x, y, report = dsgt_mix(strategy, run_cfg, state, {j: flatten_state(v) for j, v in received.items()},
                                    weights, float(conf["self_weight"]), client.is_malicious)
            point = dsgt_point(run_cfg, state, x, round_)
            batch = dsgt_batch(client.x, client.y, run_cfg, derive_seed(run_cfg.seed, round_, pid))
            dsgt_finish(state, point, y, dsgt_gradients(node_model(cfg_yaml)[0], point.unsqueeze(0), [batch],
                                                        run_cfg)[0])
        else:
            report = aggregate_models(strategy, run_cfg, state, received, weights, float(conf["self_weight"]),
                                      malicious=client.is_malicious)
            if is_dsgd(run_cfg):
                dsgd_step(run_cfg, state, round_)
        save_node_state(context, state)
        content = RecordDict({"detector": ConfigRecord({"flagged": report.flagged, "purified": report.purified,
                                                        "confirmed": report.confirmed,
                                                        "nonfinite": report.nonfinite,
                                                        "own_nonfinite": report.own_nonfinite})})
        metrics: dict[str, Any] = {"partition-id": pid}
        if not client.is_malicious and eval_due(run_cfg, round_):  # figures are over benign nodes only
            device = resolve_device(run_cfg.train.device)
            model = load_exchanged(node_model(cfg_yaml)[0], state.model).to(device)
            result = evaluate(model, data.test_x, data.test_y, run_cfg.train.eval_batch_size, data.num_classes,
                              run_cfg.train.amp)
            metrics.update(accuracy=result["accuracy"], loss=result["loss"], per_class=result["per_class"],
                           collapsed=int(result["collapsed"]))
            success = attack_success(model, run_cfg.attack, data.test_x, data.test_y, data.num_classes)
            if success is not None:
                metrics["attack_success"] = float(success)
            content["model"] = ArrayRecord(state.model)
        if conf.get("send_state"):  # a checkpoint is due: the state round + 1 starts from
            for key, record in state_records(state).items():
                content[key] = record
        content["metrics"] = MetricRecord(metrics)
        return Message(content, reply_to=msg)

    return app


# ----------------------------------------------------------------------------------- router side


@dataclass
class Member:
    """One strategy run inside the simulation: its name (folder) and its peer strategy."""

    name: str
    strategy: str
    routing: Routing


@dataclass
class MemberStart:
    """Where a member's rounds begin: after round ``round`` (0: from the start), with ``states``
    (partition id -> ``plain_state``) for the nodes to restore first."""

    round: int = 0
    states: dict[int, dict[str, Any]] = field(default_factory=dict)


class RunSink:
    """Where the router reports; the runner implements it with run folders."""

    def finished(self, member: Member) -> bool:
        """True for a member a resumed run found completed: the router skips it."""
        return False

    def begin(self, member: Member) -> MemberStart:
        return MemberStart()

    def round(self, member: Member, record: Mapping[str, Any]) -> None: ...

    def checkpoint(self, member: Member, round_: int, states: Mapping[int, Mapping[str, Any]]) -> None:
        """Round ``round_``'s metrics line is logged; ``states`` are the nodes' states after it."""

    def end(self, member: Member) -> None: ...


def _failures(asked: Sequence[int], replies: Sequence[Message], partition_of: Mapping[int, int],
              phase: str) -> list[dict]:
    """One record per asked node that answered with an error (it raised, or its worker died) or not
    at all; ``asked`` and the records use partition ids."""
    failed = [{"node": partition_of.get(int(r.metadata.src_node_id)), "phase": phase, "reason": r.error.reason}
              for r in replies if r.has_error()]
    answered = {partition_of.get(int(r.metadata.src_node_id)) for r in replies}
    return failed + [{"node": i, "phase": phase, "reason": "no reply before the timeout"}
                     for i in asked if i not in answered]


def _config_message(node_id: int, kind: str, values: Mapping[str, Any], group: str,
                    records: Optional[Mapping[str, Any]] = None) -> Message:
    return Message(RecordDict({"config": ConfigRecord(dict(values)), **(records or {})}), dst_node_id=node_id,
                   message_type=kind, group_id=group)


@dataclass
class Aggregated:
    """What the nodes reported after aggregating (partition ids throughout)."""

    evals: dict[int, dict]
    models: dict[int, torch.Tensor]
    confirmed: dict[int, list[int]]
    failures: list[dict]
    nonfinite: int  # models the nodes' rules left out (or replaced) as non-finite
    states: dict[int, dict[str, Any]]  # plain node states, when a checkpoint is due
    attack_nonfinite: int = 0  # NaN / inf inputs the model attacks left out or replaced


class Router:
    """The ServerApp's state for one simulation: node ids, graph knowledge and the reporting sink."""

    def __init__(self, cfg: RunConfig, malicious: Sequence[int], roles: Mapping[str, Sequence[int]],
                 members: Sequence[Member], sink: RunSink, stop: Optional[threading.Event] = None) -> None:
        self.cfg, self.malicious, self.roles = cfg, sorted(malicious), roles
        self.members, self.sink, self.stop = list(members), sink, stop
        self.benign = [i for i in range(cfg.clients.count) if i not in set(self.malicious)]
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id
        self._resolved: dict[str, tuple[str, RunConfig]] = {}

    def __call__(self, grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, self.cfg.clients.count, stop=self.stop)
        replies = exchange(grid, [_config_message(n, HELLO, {}, "hello") for n in nodes], stop=self.stop)
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(nodes):  # no node may be missing from the graph
            reason = last_line(failed[0]) if failed else "no reply before the timeout"
            raise RunFailed(f"{len(failed) or len(nodes) - len(replies)} of {len(nodes)} nodes failed at start-up: {reason}")
        self.node_of = {int(r.content.metric_records["info"]["partition-id"]): r.metadata.src_node_id
                        for r in replies}
        if sorted(self.node_of) != list(range(self.cfg.clients.count)):
            raise RuntimeError(f"partition ids {sorted(self.node_of)} do not cover 0..{self.cfg.clients.count - 1}")
        for member in self.members:
            self.run_member(grid, member)

    def resolved(self, member: Member) -> tuple[str, RunConfig]:
        """(peer rule, member config) of ``member``, resolved once per member (variants merge keys)."""
        if member.name not in self._resolved:
            self._resolved[member.name] = member_config(self.cfg, member.strategy)
        return self._resolved[member.name]

    def active_nodes(self, member: Member) -> list[int]:
        """Nodes that take part: under ``upper`` the malicious nodes are cut off, so they sit out."""
        if PEER_RULES.has(self.resolved(member)[0], "benign_graph"):
            return list(self.benign)
        return list(range(self.cfg.clients.count))

    def run_member(self, grid: Grid, member: Member) -> None:
        if self.sink.finished(member):
            return  # completed before a resume: its folder stays as it is
        start = self.sink.begin(member)
        saved = dict(start.states)  # a node missing from a checkpoint round keeps its older state
        rule = self.resolved(member)[0]
        truth = detection_truth(member.routing.graph, self.malicious) if rule in STATEFUL else None
        for round_ in range(start.round + 1, self.cfg.rounds + 1):
            restore = start.states if round_ == start.round + 1 else {}
            due = checkpoint_due(self.cfg.checkpoint_every, round_, self.cfg.rounds)
            record, states = self.play_round(grid, member, round_, truth, restore, due)
            self.sink.round(member, record)
            check_failures(self.cfg, f"{member.name}, round {round_}", record["failures"],
                           len(self.active_nodes(member)))
            if due:  # after check_failures: a resume redoes a round that failed the run
                saved.update(states)
                self.sink.checkpoint(member, round_, saved)
        self.sink.end(member)

    def play_round(self, grid: Grid, member: Member, round_: int, truth: Optional[set[tuple[int, int]]],
                   restore: Mapping[int, Mapping[str, Any]], collect: bool) -> tuple[dict, dict[int, dict]]:
        """One round: (its metrics record, the nodes' states after it when ``collect``)."""
        started = time.perf_counter()
        trained, records, train_stats, failures = self.train_round(grid, member, round_, restore)
        trained_at = time.perf_counter()
        agg = self.aggregate_round(grid, member, round_, trained, records, collect)
        failures += agg.failures
        evaluated = eval_due(self.resolved(member)[1], round_)
        reported = [i for i in self.benign if i in agg.confirmed]
        if not (any(i in agg.evals for i in self.benign) if evaluated else reported):
            raise RunFailed(f"{member.name}, round {round_}: no benign node reported "
                            f"({len(failures)} failures; first: {last_line(failures[0]['reason']) if failures else '?'})")
        confirmed = agg.confirmed if truth is not None else None
        if evaluated:
            record = {"round": round_, **round_metrics(agg.evals, agg.models, self.benign, self.roles, confirmed,
                                                         truth)}
            record.update(divergence_counts(agg.evals, agg.models, self.benign))
        else:  # train.eval_every: the detector's figures only
            record = {"round": round_, **detection_record(reported, confirmed, truth)}
        record["failures"] = failures
        record["nonfinite_models"] = agg.nonfinite  # left out (or replaced) by the nodes' rules
        record["attack_nonfinite_inputs"] = agg.attack_nonfinite
        losses = [train_stats[i]["train_loss"] for i in self.benign if "train_loss" in train_stats.get(i, {})]
        if losses or not one_step(self.cfg):  # dsgd / dsgt nodes report no training loss
            record["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
        record["node_train_seconds"] = sum(float(st.get("train_seconds", 0.0)) for st in train_stats.values())
        record["train_phase_seconds"] = trained_at - started
        record["seconds"] = time.perf_counter() - started
        return record, agg.states

    @property
    def partition_of(self) -> dict[int, int]:
        return {node: pid for pid, node in self.node_of.items()}

    def train_round(self, grid: Grid, member: Member, round_: int,
                    restore: Optional[Mapping[int, Mapping[str, Any]]] = None):
        """Phase 1: every active node trains; returns (flat trained models, their records, stats,
        failures). A node that fails sits the round out: it sends nothing and keeps its model.
        ``restore``: checkpointed node states, sent along for the nodes to start from."""
        conf = {"member": member.name, "strategy": member.strategy, "round": round_}
        group = f"{member.name}-{round_}"
        nodes = self.active_nodes(member)
        restore = restore or {}
        messages = [_config_message(self.node_of[i], TRAIN, conf, group,
                                    state_records(node_state_from(restore[i])) if i in restore else None)
                    for i in nodes]
        replies = exchange(grid, messages, stop=self.stop)
        failures = _failures(nodes, replies, self.partition_of, "train")
        trained: dict[int, torch.Tensor] = {}
        records: dict[int, ArrayRecord] = {}
        stats: dict[int, dict] = {}
        for reply in (r for r in replies if not r.has_error()):
            metrics = reply.content.metric_records["metrics"]
            pid = int(metrics["partition-id"])
            records[pid] = reply.content.array_records["model"]
            trained[pid] = flatten_state(records[pid].to_torch_state_dict())
            stats[pid] = dict(metrics)
        if not trained:
            check_failures(self.cfg, f"{member.name}, round {round_}", failures, len(nodes))
        return trained, records, stats, failures

    def aggregate_round(self, grid: Grid, member: Member, round_: int, trained: Mapping[int, torch.Tensor],
                        records: Mapping[int, ArrayRecord], collect: bool = False) -> Aggregated:
        """Phases 2-3: route (with attacks), every node aggregates and reports (with its state when
        ``collect``)."""
        graph = member.routing.graph
        tally = AttackTally()
        sent = outgoing(self.cfg.attack, trained, graph.subgraph(trained.keys()), self.malicious,
                        seed=self.cfg.seed, round_=round_, tally=tally)
        template = next(iter(records.values())).to_torch_state_dict()
        packed: dict[int, ArrayRecord] = {}  # id(tensor) -> record: a shared poisoned model is packed once
        for sender, msgs in sent.items():
            for vec in msgs.values():
                if vec is trained[sender]:
                    packed[id(vec)] = records[sender]
                elif id(vec) not in packed:
                    packed[id(vec)] = ArrayRecord(unflatten_like(vec, template))
        model_bytes = 4 * next(iter(trained.values())).numel()
        nodes = sorted(trained)
        messages, sizes = [], []
        for i in nodes:
            ids = sorted(s for s, msgs in sent.items() if i in msgs)
            w = member.routing.weights[i]
            content = RecordDict({"config": ConfigRecord({
                "member": member.name, "strategy": member.strategy, "round": round_, "neighbours": ids,
                "weights": [float(w[j]) for j in ids],
                "self_weight": float(1.0 - sum(w[j] for j in ids)), "send_state": collect,
            })})
            for j in ids:
                content[f"n.{j}"] = packed[id(sent[j][i])]
            messages.append(Message(content, dst_node_id=self.node_of[i], message_type=AGGREGATE,
                                    group_id=f"{member.name}-{round_}"))
            sizes.append(model_bytes * max(len(ids), 1))
        replies = []
        for batch in message_batches(sizes, MAX_INFLIGHT_BYTES):
            replies.extend(exchange(grid, [messages[k] for k in batch], stop=self.stop))
        failures = _failures(nodes, replies, self.partition_of, "aggregate")
        evals, models, confirmed, nonfinite, states = {}, {}, {}, {}, {}
        for reply in (r for r in replies if not r.has_error()):
            metrics = reply.content.metric_records["metrics"]
            pid = int(metrics["partition-id"])
            detector = reply.content.config_records["detector"]
            confirmed[pid] = [int(j) for j in detector["confirmed"]]
            nonfinite[pid] = len(detector["nonfinite"]) + int(bool(detector["own_nonfinite"]))
            if "accuracy" in metrics:
                evals[pid] = dict(metrics)
                models[pid] = flatten_state(reply.content.array_records["model"].to_torch_state_dict())
            if collect and (plain := plain_state(reply.content)) is not None:
                states[pid] = plain
        return Aggregated(evals, models, confirmed, failures, sum(nonfinite.values()), states, tally.nonfinite_inputs)


def make_server_app(router: Router) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        with interrupted_quietly(router.stop or threading.Event()):
            router(grid, context)

    return app
