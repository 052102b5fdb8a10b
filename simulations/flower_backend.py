"""The Flower backend of the server-based round engine (``engine=ray`` and ``flwr run``): each client's
work is a Flower ClientApp call on its SuperNode, and the member's aggregation is Flower's own strategy.

The round loop is ``fedepic.server_rounds``; this module only turns a round's sampled clients into
train Messages, collects the replies (``messaging.exchange``, Ctrl-C aware) and hands the attacked and
pre-aggregated vectors to the strategy (``strategies.server.TrackedStrategy``, which also reports whom
it left out). A reply that carries an error (the client raised, its worker died) becomes a failure
``{"node", "client", "reason"}`` and the round goes on with the others.

Clients are stateless: the server holds each client's local EPIC state and per-step momentum
(``Progress.epic``, ``Progress.momentum``), sends them with the client's train message and takes the
new ones out of the reply before the strategy sees it. A per-step reply without ``MOMENTUM_KEY`` sent
its momentum as its arrays (``simulations.client_app.arrays_hold_momentum``), which the server keeps. The strategy aggregates the clients' updates
(model minus global model; momenta under per_step), parameters only, as the tensor rules of
``engine=local`` do. Nodes are listed in partition order
(:class:`PartitionGrid`), so the engine's sample (positions in client order) picks the same clients
in every run, a resumed one included, whose nodes are new.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import torch

from fedepic.config import RunConfig
from fedepic.extensions import SERVER_STRATEGIES
from fedepic.local_backend import RuleAggregation
from fedepic.server_rounds import Aggregated, ClientReply, NodeWork, Progress, per_step
from fedepic.vectors import unflatten_like
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from simulations.client_app import EPIC_KEY, MOMENTUM_KEY
from simulations.messaging import exchange
from strategies.epic_server import record_vector
from strategies.server import build_server_strategy

ROUND_TIMEOUT_S = 3600.0  # a round's replies; a lost node's message is recorded as a failure after it


class PartitionGrid:
    """The run's Grid, listing its nodes in partition-id order.

    Simulated nodes get random ids in every run (a set, in no set order); listed by partition, a
    position drawn by the engine names the same client in every run. ``partitions`` (node id ->
    partition id) is filled from the warm-up replies and every train reply; nodes of unknown
    partition (a failed warm-up) come last, by id.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.partitions: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        known = self.partitions
        return sorted(self.grid.get_node_ids(), key=lambda n: (n not in known, known.get(n, 0), n))

    def __getattr__(self, name: str) -> Any:  # everything else is the Grid's
        return getattr(self.grid, name)


def client_metrics(msg: Message) -> dict:
    return dict(next(iter(msg.content.metric_records.values())))


def reply_order(msg: Message) -> tuple[int, int]:
    """Replies arrive in any order; aggregating them by client id makes float sums (and Krum's ties)
    reproducible from run to run."""
    if msg.has_error():
        return (1, int(msg.metadata.src_node_id))
    return (0, int(client_metrics(msg)["partition-id"]))


def round_failures(messages: list[Message], replies: list[Message], partitions: Mapping[int, int]) -> list[dict]:
    """The round's failed clients: an error reply (a raising client, a killed worker) or none before the
    timeout; each names Flower's node and the client id (its partition) where known."""
    def failure(node: int, reason: str) -> dict:
        return {"node": node, "client": partitions.get(node), "reason": reason}

    answered = {int(m.metadata.src_node_id) for m in replies}
    out = [failure(int(m.metadata.src_node_id), m.error.reason) for m in replies if m.has_error()]
    return out + [failure(int(m.metadata.dst_node_id), "no reply before the timeout") for m in messages
                  if int(m.metadata.dst_node_id) not in answered]


class FlowerServerBackend:
    """One member's node work through a Flower Grid and its aggregation by Flower's strategy."""

    def __init__(self, cfg: RunConfig, name: str, grid: PartitionGrid, config: Mapping[str, Any],
                 stop: threading.Event, model: torch.nn.Module) -> None:
        self.cfg, self.grid, self.config, self.stop = cfg, grid, dict(config), stop
        # Flower's own strategy where the name has one; a rule registered only as a tensor rule
        # (SERVER_RULES) aggregates here as it does in process
        self.tracked = build_server_strategy(name, cfg) if name in SERVER_STRATEGIES else None
        self.tensor = RuleAggregation(cfg, name) if self.tracked is None else None
        names = {n for n, _ in model.named_parameters()}
        # the parameter entries of a state, in state order: the layout of the updates' columns
        self.parameter_entries = {k: v for k, v in model.state_dict().items() if k in names}
        self.valid: list[Message] = []

    def _message(self, node: int, rnd: int, progress: Progress) -> Message:
        content = RecordDict({"arrays": ArrayRecord(progress.like),
                              "config": ConfigRecord({**self.config, "server-round": rnd})})
        partition = self.grid.partitions.get(node)
        if partition in progress.epic:
            content[EPIC_KEY] = ConfigRecord(dict(progress.epic[partition]))
        if partition in progress.momentum:
            content[MOMENTUM_KEY] = ArrayRecord({"m": progress.momentum[partition]})
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)

    def train(self, rnd: int, clients: Sequence[int], progress: Progress) -> NodeWork:
        nodes = self.grid.get_node_ids()
        messages = [self._message(nodes[i], rnd, progress) for i in clients]
        replies = sorted(exchange(self.grid, messages, ROUND_TIMEOUT_S, self.stop), key=reply_order)
        self.valid = [m for m in replies if not m.has_error()]
        work = []
        for msg in self.valid:
            partition = int(client_metrics(msg)["partition-id"])
            self.grid.partitions[int(msg.metadata.src_node_id)] = partition
            if EPIC_KEY in msg.content.config_records:
                progress.epic[partition] = dict(msg.content.pop(EPIC_KEY))
            vector = record_vector(msg.content["arrays"])
            if MOMENTUM_KEY in msg.content.array_records:
                progress.momentum[partition] = msg.content.pop(MOMENTUM_KEY).to_torch_state_dict()["m"]
            elif per_step(self.cfg):  # the client sent its momentum itself (client_app.arrays_hold_momentum)
                progress.momentum[partition] = vector
            work.append(ClientReply(partition, vector, client_metrics(msg)))
        return NodeWork(work, round_failures(messages, replies, self.grid.partitions), len(messages))

    def aggregate(self, rnd: int, work: NodeWork, updates: torch.Tensor) -> Aggregated:
        """Flower's strategy over the clients' parameter updates [n, P] (ArrayRecords of the parameter
        entries only: buffers, integer counters included, never reach a strategy), its aggregate read
        back as the aggregated update [P]. Updates, not models: Flower's Krum computes distances in
        float32 as |a|^2 + |b|^2 - 2ab, whose rounding on whole models (weights far larger than a
        round's change) exceeds the gaps between honest clients' scores and makes its choice noise; on
        updates it chooses what the exact tensor rule chooses (tests/test_server_rules.py). Every
        registered strategy is translation-equivariant, so this changes nothing else but rounding."""
        if self.tensor is not None:
            return self.tensor(work, updates, rnd)
        entries = self.parameter_entries
        for msg, row in zip(self.valid, updates):
            msg.content["arrays"] = ArrayRecord(unflatten_like(row, entries))
        outcome = self.tracked.aggregate(rnd, self.valid, updates)
        vector = None if outcome.arrays is None else record_vector(outcome.arrays)
        return Aggregated(vector, outcome.excluded, outcome.trimmed_share, outcome.nonfinite)

    def state_dict(self) -> dict:
        return self.tracked.state_dict() if self.tracked is not None else self.tensor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        (self.tracked if self.tracked is not None else self.tensor).load_state_dict(state)
