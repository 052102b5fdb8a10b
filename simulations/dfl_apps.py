"""Flower apps of the decentralized mode, the Ray backend of the round engine (``fedepic.peer_rounds``):
a ServerApp that only routes over the communication graph, and a ClientApp whose nodes train,
aggregate with their peer rule and evaluate themselves.

The round and the member loop are the engine's (``peer_rounds.run_peer_member``, the loop of
``engine=local`` too); the ServerApp's ``Router`` runs every member through it with a
``FlowerPeers`` backend, whose two phases are the two messages of a round. Message flow of one round
(``grid.send_and_receive`` takes a different Message per node, which is what makes the ServerApp a
router):
1. ``train`` (``FlowerPeers.send``): router -> every node {member, round}. The node loads its state
   from ``Context.state`` (a fresh model in round 1), runs the send half of its algorithm's node step
   (``fedepic.algorithms``, the target of the ``fedepic.extensions.ALGORITHMS`` entry: dpsgd's local
   epochs, dsgd's gradient into its momentum, dsgt's (model, tracker)), keeps its state and replies
   with the vector it sends.
2. The engine decides what travels over each edge (``peer_routing.outgoing``): benign nodes' trained
   models, and the malicious nodes' poisoned ones (it knows every model: omniscient attacks).
3. ``train.aggregate`` (``FlowerPeers.receive``): router -> every node ONE message holding its
   neighbours' models, their ids and
   the node's mixing weights. The node runs the receive half of its node step (the aggregation with its
   rule, GP state in ``Context.state``, and the algorithm's step), evaluates the result on the test set
   and replies with metrics, its detector's confirmed set and its new model (the last only feeds the
   consensus-distance measurement).
Several strategy runs ("members") go through one simulation in turn; a node resets its state when
the member changes, so they never share anything but the Ray actors.

Checkpoints (``resume=``): a node's state lives on its Ray actor, so the router collects it. In a
round ``r`` with ``r % checkpoint_every == 0`` (the member's last round excepted: it then completes),
the ``train.aggregate`` config carries ``send_state``, and the node adds its state after the
aggregation (``NodeState.to_plain`` as ``dfl.*`` records, the layout of ``Context.state``) to its
reply: exactly what round ``r + 1`` starts from. The engine hands those states to the sink
(``RunSink.checkpoint``) once the round's metrics line is logged. A node that failed that round
(or sat it out) keeps the state it had in the previous checkpoint: a resume restores that one,
so after node failures a resumed run may differ from an uninterrupted one. On resume the first
round's ``train`` messages carry each node's saved state, which the node puts into its
``Context.state`` before training. The router itself keeps nothing across rounds, and every random
draw (local training, attack noise) is seeded from (seed, round, node).

The ClientApp never branches on the algorithm: its node work is the entry's step, the very class the
in-process engine (``fedepic.peer_local.LocalMember``) calls, so a new algorithm is its step module and
its registry line on both engines (docs/extending.md).

Each ClientApp call ships only the config; nodes load the dataset once per actor process
(``fedepic.client_data.dataset_for``) and then cut their partition out of it, and build one model
per process (``node_model``) that they load their state into.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache, partial
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedepic.attacks import attack_success
from fedepic.client_data import client_data_for, config_from_text, dataset_for, member_from_text
from fedepic.config import RunConfig, to_yaml
from fedepic.errors import RunFailed
from fedepic.failures import last_line
from fedepic.algorithms import Inbox, PeerNode, node_step
from fedepic.peer_node import NodeState, eval_due, exchanged_state, load_exchanged, new_model
from fedepic.peer_rounds import (
    Member, Messages, PeerSetting, Received, RunSink, Sent, peer_setting, run_peer_member,
)
from fedepic.peer_eval import average_record
from fedepic.peer_routing import message_batches
from fedepic.train import evaluate, resolve_device
from fedepic.vectors import flatten_state, unflatten_like
from simulations.flower_runtime import interrupted_quietly
from simulations.messaging import exchange, wait_for_nodes

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
        model, initial = node_model(cfg_yaml)
        node = PeerNode(pid, strategy, run_cfg, state, client, model, initial, resolve_device(run_cfg.train.device))
        started = time.perf_counter()
        sent = node_step(run_cfg).send(node, round_)  # the algorithm's send half (fedepic.algorithms)
        save_node_state(context, state)
        metrics = {"partition-id": pid, "num-examples": len(client), "train_seconds": time.perf_counter() - started,
                   **{k: float(v) for k, v in sent.stats.items()}}
        return Message(RecordDict({"model": ArrayRecord(sent.message), "metrics": MetricRecord(metrics)}),
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
        received = {j: flatten_state(msg.content.array_records[f"n.{j}"].to_torch_state_dict()) for j in ids}
        weights = dict(zip(ids, (float(w) for w in conf["weights"])))
        round_ = int(conf["round"])
        model, initial = node_model(cfg_yaml)
        node = PeerNode(pid, strategy, run_cfg, state, client, model, initial, resolve_device(run_cfg.train.device))
        # the algorithm's receive half: the aggregation with the node's rule and its step (fedepic.algorithms)
        report = node_step(run_cfg).receive(node, round_, Inbox(received, weights, float(conf["self_weight"])))
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


class FlowerPeers:
    """One member's nodes as Flower ClientApps: the Ray backend of ``fedepic.peer_rounds`` (a
    ``PeerBackend``). ``send`` is the ``train`` phase, ``receive`` the ``train.aggregate`` phase (module
    docstring); the engine decides between them what travels over each edge. A node that fails a
    phase is a failure ``{"node", "phase", "reason"}``: failing ``train``, it sits the round out (sends
    nothing, keeps its model)."""

    def __init__(self, setting: PeerSetting, member: Member, grid: Grid, node_of: Mapping[int, int],
                 stop: Optional[threading.Event] = None, data: Optional[Any] = None) -> None:
        self.setting, self.member, self.grid, self.node_of, self.stop = setting, member, grid, dict(node_of), stop
        self.data = data  # the router's dataset: the average model (train.eval_average_model) is scored here
        self.partition_of = {node: pid for pid, node in self.node_of.items()}
        self.pending: dict[int, Mapping[str, Any]] = {}  # checkpointed states, sent with the next train messages
        self.records: dict[int, ArrayRecord] = {}  # this round's trained models, as the nodes sent them

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        self.pending = dict(states)

    def send(self, round_: int) -> Sent:
        """Every active node trains (its checkpointed state sent along in a resumed run's first round);
        the flat trained models, their statistics (``train_loss``, ``train_seconds``) and the failures."""
        member = self.member
        conf = {"member": member.name, "strategy": member.strategy, "round": round_}
        nodes = self.setting.active
        restore, self.pending = self.pending, {}
        messages = [_config_message(self.node_of[i], TRAIN, conf, f"{member.name}-{round_}",
                                    state_records(node_state_from(restore[i])) if i in restore else None)
                    for i in nodes]
        replies = exchange(self.grid, messages, stop=self.stop)
        self.records = {}
        trained: dict[int, torch.Tensor] = {}
        stats: dict[int, dict] = {}
        for reply in (r for r in replies if not r.has_error()):
            metrics = reply.content.metric_records["metrics"]
            pid = int(metrics["partition-id"])
            self.records[pid] = reply.content.array_records["model"]
            trained[pid] = flatten_state(self.records[pid].to_torch_state_dict())
            stats[pid] = dict(metrics)
        return Sent(trained, stats, _failures(nodes, replies, self.partition_of, "train"))

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        """Every node that trained gets ONE message with its inbox (``messages``), its neighbours' ids
        and its mixing weights, aggregates, steps, evaluates when due and reports (with its state when
        ``collect``). A poisoned model shared by several receivers is packed once, a benign one is the
        record its sender sent; messages go in batches of at most ``MAX_INFLIGHT_BYTES``."""
        member, trained, records = self.member, work.vectors, self.records
        template = next(iter(records.values())).to_torch_state_dict()
        packed: dict[int, ArrayRecord] = {}  # id(tensor) -> record: a shared poisoned model is packed once
        for sender, msgs in messages.items():
            for vec in msgs.values():
                if vec is trained[sender]:
                    packed[id(vec)] = records[sender]
                elif id(vec) not in packed:
                    packed[id(vec)] = ArrayRecord(unflatten_like(vec, template))
        model_bytes = 4 * next(iter(trained.values())).numel()
        nodes = sorted(trained)
        out, sizes = [], []
        for i in nodes:
            ids = sorted(s for s, msgs in messages.items() if i in msgs)
            w = member.routing.weights[i]
            content = RecordDict({"config": ConfigRecord({
                "member": member.name, "strategy": member.strategy, "round": round_, "neighbours": ids,
                "weights": [float(w[j]) for j in ids],
                "self_weight": float(1.0 - sum(w[j] for j in ids)), "send_state": collect,
            })})
            for j in ids:
                content[f"n.{j}"] = packed[id(messages[j][i])]
            out.append(Message(content, dst_node_id=self.node_of[i], message_type=AGGREGATE,
                               group_id=f"{member.name}-{round_}"))
            sizes.append(model_bytes * max(len(ids), 1))
        replies = []
        for batch in message_batches(sizes, MAX_INFLIGHT_BYTES):
            replies.extend(exchange(self.grid, [out[k] for k in batch], stop=self.stop))
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
        average = average_record(self.setting.cfg, self.data, models) if self.data is not None else {}
        return Received(evals, models, confirmed, sum(nonfinite.values()), states, failures, average)


class Router:
    """The ServerApp's state for one simulation: node ids, the members and the reporting sink. It runs
    every member through ``fedepic.peer_rounds.run_peer_member`` with a ``FlowerPeers`` backend."""

    def __init__(self, cfg: RunConfig, roles: Mapping[str, Sequence[int]], members: Sequence[Member], sink: RunSink,
                 stop: Optional[threading.Event] = None, data: Optional[Any] = None) -> None:
        self.cfg, self.roles, self.members, self.sink, self.stop = cfg, roles, list(members), sink, stop
        self.data = data  # for the average model's evaluation (train.eval_average_model), in the router
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id

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
            run_peer_member(self.cfg, member, self.sink, partial(self.backend, grid, member), self.stop)

    def backend(self, grid: Grid, member: Member) -> FlowerPeers:
        return FlowerPeers(peer_setting(self.cfg, member, self.roles), member, grid, self.node_of, self.stop,
                           self.data)


def make_server_app(router: Router) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        with interrupted_quietly(router.stop or threading.Event()):
            router(grid, context)

    return app
