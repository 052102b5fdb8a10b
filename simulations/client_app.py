"""The Flower ClientApp of the server-based simulation: local training, local EPIC, client-side attacks.

One SuperNode per client; the node's partition id (`context.node_config["partition-id"]`) is the
client id. The ServerApp sends the whole run config (YAML text, key "fedepic-config") and the
member name (the strategy under test) with every train message, so the same app works under
`run_simulation` and `flwr run` without reading any file.

Memoisation. A Ray actor runs many ClientApp calls in one process, so the parsed config, the dataset
and each client's (attacked) rows are cached (`fedepic.client_data.client_data_for`), keyed by the config text
(and the partition id). The cache holds only values derived deterministically from that key, so it
never changes results; it saves reloading the dataset per message (docs/results/engines.md). Shipping
the data inside the ClientApp closure instead would make Ray pickle it with every message
(Flower submits the app factory with each task; see benchmarks/bench_flower_overhead.py).

Local EPIC (defense.local_epic): the client runs EPIC on its own rows after local training in
round r when `EpicSchedule.is_selection_epoch(r)` holds, i.e. defense.epic.warmup and .interval
(and .until) count *rounds* here. The dropped rows persist across rounds and are left out of later
local training. The server holds them, not the node: the client returns its packed EPIC state in the
train reply (ConfigRecord `EPIC_KEY`), and the server sends the state it holds for the client back
with the client's next train message of the same member (`simulations.flower_backend`). Clients are
thus stateless: a restarted Ray worker or a resumed run (whose nodes are new) continues with the
drops the server checkpointed, and members compared in one run never share drops. Flower's
strategies never see the record: the server takes it out of the reply before aggregating.

Model attacks applied here, on the update u = w_local - w_global of a malicious client:
sign_flip, gaussian (attack.sigma) and scaling (attack.scale). ALIE, IPM and min-max need the
round's benign updates and are applied by the round engine (`fedepic.server_rounds.inject_model_attack`).

Per-step protocol (server.protocol=per_step, :func:`per_step_results`): a client takes one minibatch
gradient g_i at the global model (``train.batch_size`` rows drawn with replacement, seeded by the
seed, the client and the round; no weight decay: the server applies ``server.weight_decay``), updates
its momentum m_i <- beta m_i + (1 - beta) g_i (beta = ``train.client_momentum``, m_i(0) = 0) and sends m_i, laid out as
the model's state dict (zero at the fixed normalisation buffers), after its own model attack
(applied to m_i, as to an update); a malicious client that holds no rows and whose vector a
server-side attack (ALIE, IPM, min-max) replaces computes nothing and sends 0, which the attack
replaces whenever it applies (a round with fewer honest replies than the attack needs aggregates
the 0). m_i persists across rounds the way local EPIC's drops do: the
server keeps it and sends it back (``MOMENTUM_KEY``), so clients stay stateless. The reply carries m_i
once: as its arrays when the client sends m_i itself (an honest client: :func:`arrays_hold_momentum`),
and under ``MOMENTUM_KEY`` besides the arrays only when its own attack changed what it sends. The gradients of
several clients are one batched call (``fedepic.stacked``); on Ray each message is the case n = 1
(``engine=local`` calls ``fedepic.client_work`` directly, without messages).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch

from fedepic.client_data import client_data_for, config_from_text, dataset_for
from fedepic.extensions import protocol_has
from fedepic.client_work import (
    LocalResult, local_train, model_for, pack_epic_state, per_step_results, state_parameters, unpack_epic_state,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

CONFIG_KEY = "fedepic-config"
MEMBER_KEY = "member"
EPIC_KEY = "epic-state"  # the client's local EPIC state, in train messages and replies
MOMENTUM_KEY = "momentum"  # per_step: the client's momentum m_i (one flat vector), in train messages and replies


# --------------------------------------------------------------------------- local work


@lru_cache(maxsize=2)
def structure_model(text: str) -> torch.nn.Module:
    """The model that per-step gradients are taken through (its structure and fixed buffers; its
    parameters are never read): one per process and config, not one per message."""
    return model_for(config_from_text(text), dataset_for(text))


@lru_cache(maxsize=2)
def structure_parameters(text: str) -> torch.Tensor:
    """The parameter entries of ``structure_model(text)``'s state layout (bool [state entries]):
    computed once per process and config, not once per message (read-only for its callers)."""
    return state_parameters(structure_model(text))


# --------------------------------------------------------------------------- EPIC state in messages


# --------------------------------------------------------------------------- the app


def handle_train(msg: Message, context: Context) -> Message:
    """Train on this node's partition from the received global model (and the local EPIC state the
    message carries, if any); reply with one ArrayRecord and one MetricRecord (the same metric keys on
    every client, as Flower's strategies require), plus the new EPIC state when local EPIC runs."""
    return handle_train_batch([msg], [context])[0]


def handle_train_batch(messages: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
    """The replies to train messages of one round (``handle_train`` for each; under the per-step
    protocol, the gradients of all of them in one vectorized call)."""
    config = messages[0].content.config_records["config"]
    text = str(config[CONFIG_KEY])
    cfg = config_from_text(text)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not protocol_has(cfg, "one_step"):  # local epochs: one client at a time
        return [_train_reply(m, c) for m, c in zip(messages, contexts)]
    clients = [client_data_for(text, int(c.node_config["partition-id"])) for c in contexts]
    momenta = [_momentum_of(m) for m in messages]
    global_state = messages[0].content.array_records["arrays"].to_torch_state_dict()
    results = per_step_results(cfg, structure_model(text), clients, global_state, int(config["server-round"]),
                               momenta, structure_parameters(text))
    replies = []
    for msg, result in zip(messages, results):
        content = RecordDict({"arrays": ArrayRecord(result.state), "metrics": MetricRecord(result.metrics)})
        if not arrays_hold_momentum(result, global_state):  # attacked: m_i is not what it sends
            content[MOMENTUM_KEY] = ArrayRecord({"m": result.momentum})
        replies.append(Message(content=content, reply_to=msg))
    return replies


def arrays_hold_momentum(result: LocalResult, global_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a per-step reply's arrays are the client's momentum m_i bit for bit, so that the reply
    carries m_i once (without ``MOMENTUM_KEY``) and the server reads it from the arrays
    (``simulations.flower_backend``): the client sent m_i unattacked and every float entry of the state
    is float32, so laying m_i out as the state (``unflatten_like``) and flattening it back
    (``record_vector``) changes no bit. An attacked client sends another vector and both travel."""
    return result.vector is result.momentum and all(
        v.dtype == torch.float32 for v in global_state.values() if torch.is_floating_point(v))


def _momentum_of(msg: Message) -> Optional[torch.Tensor]:
    record = msg.content.array_records.get(MOMENTUM_KEY)
    return None if record is None else record.to_torch_state_dict()["m"]


def _train_reply(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    text = str(config[CONFIG_KEY])
    server_round = int(config["server-round"])
    cfg = config_from_text(text)
    client = client_data_for(text, int(context.node_config["partition-id"]))
    records = msg.content.config_records
    saved = unpack_epic_state(records[EPIC_KEY]) if EPIC_KEY in records else None
    global_state = next(iter(msg.content.array_records.values())).to_torch_state_dict()
    result = local_train(cfg, dataset_for(text), client, global_state, server_round, saved)
    content = RecordDict({"arrays": ArrayRecord(result.state), "metrics": MetricRecord(result.metrics)})
    if result.epic_state is not None:
        content[EPIC_KEY] = ConfigRecord(pack_epic_state(result.epic_state))
    return Message(content=content, reply_to=msg)


def handle_warmup(msg: Message, context: Context) -> Message:
    """Load the config, dataset and this client's rows into the actor's caches before round 1, so the
    first member's round times do not include the actors' start-up; the reply names the node's
    partition (the server addresses EPIC states and orders nodes by it)."""
    text = str(msg.content.config_records["config"][CONFIG_KEY])
    partition = int(context.node_config["partition-id"])
    client = client_data_for(text, partition)
    content = RecordDict({"metrics": MetricRecord({"rows": len(client), "pid": os.getpid(),
                                                   "partition-id": partition})})
    return Message(content=content, reply_to=msg)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.query()
def warmup(msg: Message, context: Context) -> Message:
    return handle_warmup(msg, context)
