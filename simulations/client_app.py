"""The Flower ClientApp of the server-based simulation: local training, local EPIC, client-side attacks.

One SuperNode per client; the node's partition id (`context.node_config["partition-id"]`) is the
client id. The ServerApp sends the whole run config (YAML text, key "fedepic-config") and the
member name (the strategy under test) with every train message, so the same app works under
`run_simulation` and `flwr run` without reading any file.

Memoisation. A Ray actor runs many ClientApp calls in one process, so the parsed config, the dataset
and each client's (attacked) rows are cached (`simulations.client_data.client_data_for`), keyed by the config text
(and the partition id). The cache holds only values derived deterministically from that key, so it
never changes results; it saves reloading the dataset per message (about 0.5 s from the uint8
cache). Shipping the data inside the ClientApp closure instead would make Ray pickle it with
every message (Flower submits the app factory with each task; see benchmarks/bench_flower_overhead.py).

Local EPIC (defense.local_epic): the client runs EPIC on its own rows after local training in
round r when `EpicSchedule.is_selection_epoch(r)` holds, i.e. defense.epic.warmup and .interval
(and .until) count *rounds* here. The dropped rows persist across rounds and are left out of later
local training. The server holds them, not the node: the client returns its packed EPIC state in the
train reply (ConfigRecord `EPIC_KEY`), and the server sends the state it holds for the client back
with the client's next train message of the same member (ServerApp, `run_strategy`). Clients are
thus stateless: a restarted Ray worker or a resumed run (whose nodes are new) continues with the
drops the server checkpointed, and members compared in one run never share drops. Flower's
strategies never see the record: the server takes it out of the reply before aggregating.

Model attacks applied here, on the update u = w_local - w_global of a malicious client:
sign_flip, gaussian (attack.sigma) and scaling (attack.scale). ALIE, IPM and min-max need the
round's benign updates and are applied by the ServerApp (server_app.inject_model_attack).

Per-step protocol (server.protocol=per_step, :func:`per_step_results`): a client takes one minibatch
gradient g_i at the global model (``train.batch_size`` rows drawn with replacement, seeded by the
seed, the client and the round; no weight decay: the server applies it), updates its momentum
m_i <- beta m_i + (1 - beta) g_i (beta = ``train.momentum``, m_i(0) = 0) and sends m_i, laid out as
the model's state dict (zero at the fixed normalisation buffers), after its own model attack
(applied to m_i, as to an update); a malicious client that holds no rows and whose vector a
server-side attack (ALIE, IPM, min-max) replaces computes nothing and sends 0, which the attack
replaces whenever it applies (a round with fewer honest replies than the attack needs aggregates
the 0). m_i persists across rounds the way local EPIC's drops do: the
server keeps it and sends it back (``MOMENTUM_KEY``), so clients stay stateless. The gradients of
several clients are one vectorized call (``fedepic.stacked``): the in-process engine hands a round's
messages to :func:`handle_train_batch` at once; on Ray each message is the case n = 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from fedepic.attacks.model_attacks import model_attack_arguments, needs_honest, run_model_attack
from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.builders import build_model, epic_schedule
from fedepic.epic import EpicState
from fedepic.metrics import poison_stats
from fedepic.stacked import gradients_in_state_layout
from fedepic.train import fit, float_images, prepare_model, resolve_device
from fedepic.vectors import flatten_state, parameter_mask, unflatten_like
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from simulations.client_data import ClientData, client_data_for, client_seed, config_from_text, dataset_for
from simulations.dfl_node import minibatch_rows

UNKNOWN = -1.0  # MetricRecords must hold the same keys on every client: -1 marks "not measured"
CONFIG_KEY = "fedepic-config"
MEMBER_KEY = "member"
EPIC_KEY = "epic-state"  # the client's local EPIC state, in train messages and replies
MOMENTUM_KEY = "momentum"  # per_step: the client's momentum m_i (one flat vector), in train messages and replies


# --------------------------------------------------------------------------- local work


def model_for(cfg: RunConfig, data: ImageData) -> torch.nn.Module:
    return build_model(cfg, data)  # unseeded: the server's initial weights are loaded over it


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # the model state the client sends (after its model attack)
    metrics: dict[str, float]
    epic_state: Optional[dict]  # EpicState.state_dict() to keep, when local EPIC runs
    momentum: Optional[torch.Tensor] = None  # per_step: the client's new m_i (before its model attack)


def local_train(cfg: RunConfig, data: ImageData, client: ClientData, global_state: dict[str, torch.Tensor],
                server_round: int, epic_state: Optional[dict] = None) -> LocalResult:
    """One client's round: local epochs from the global model (optionally with local EPIC), then its
    client-side model attack if it is malicious. Pure apart from torch's RNG use inside `fit`."""
    started = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = model_for(cfg, data)
    model.load_state_dict(global_state)
    model = prepare_model(model, device, cfg.train.amp)
    seed = client_seed(cfg, client.client_id) + server_round
    epic: Optional[EpicState] = None
    keep = torch.ones(len(client), dtype=torch.bool)
    if cfg.defense.local_epic and len(client) > 0:  # EpicState needs rows; an empty client trains nothing
        epic = EpicState(len(client), epic_schedule(cfg, "rounds"), device=device)
        if epic_state is not None:
            epic.load_state_dict(epic_state)
        keep = epic.keep
    trained_rows = int(keep.sum())
    history = fit(model, client.x, client.y, cfg.train, seed=seed, device=device, epochs=cfg.clients.local_epochs,
                  keep=keep) if trained_rows else []
    recall, skipped = UNKNOWN, 0
    if epic is not None:
        selection = epic.maybe_select(server_round, model, client.x, client.y, client.poisoned)
        skipped = int(selection["skipped_nonfinite"]) if selection else 0
        if client.poisoned.any():
            recall = poison_stats(~epic.keep, client.poisoned)["poison_recall"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    attack_nonfinite = 0
    if client.is_malicious and cfg.attack.model != "none" and not needs_honest(cfg.attack.model):
        state, attack_nonfinite = _attacked(cfg, global_state, state, seed, parameter_mask(model, state))
    metrics = {
        # Flower's FedAvg weights by num-examples and divides by their sum: a client without rows sends the
        # global model back at weight 1; "trained-rows" is what the client record reports
        "num-examples": max(trained_rows, 1),
        "trained-rows": trained_rows,
        "partition-id": client.client_id,
        "malicious": int(client.is_malicious),
        "train-loss": float(history[-1]["loss"]) if history else UNKNOWN,
        "poisoned-rows": int(client.poisoned.sum()),
        "epic-dropped": int((~epic.keep).sum()) if epic is not None else 0,
        "epic-selections": epic.selections if epic is not None else 0,
        "epic-poison-recall": recall,
        "epic-skipped-nonfinite": skipped,  # 1: this round's selection met a diverged (NaN/inf) model
        "attack-nonfinite": attack_nonfinite,  # 1: the attacker's own update was NaN/inf and was replaced
        "train-seconds": time.perf_counter() - started,
    }
    return LocalResult(state, metrics, epic.state_dict() if epic is not None else None)


@lru_cache(maxsize=2)
def structure_model(text: str) -> torch.nn.Module:
    """The model that per-step gradients are taken through (its structure and fixed buffers; its
    parameters are never read): one per process and config, not one per message."""
    return model_for(config_from_text(text), dataset_for(text))


def per_step_results(cfg: RunConfig, model: torch.nn.Module, clients: Sequence[ClientData],
                     global_state: dict[str, torch.Tensor], server_round: int,
                     momenta: Sequence[Optional[torch.Tensor]]) -> list[LocalResult]:
    """One per-step round of ``clients`` (module docstring): their minibatch gradients at the global
    model in one vectorized call, their momenta, and what each sends (after its client-side attack)."""
    started = time.perf_counter()
    base = flatten_state(global_state)
    seeds = [client_seed(cfg, c.client_id) + server_round for c in clients]
    # a malicious client without rows whose vector the server-side attack replaces computes nothing (as
    # in ByzFL, where Byzantine clients hold no data); with rows it computes honestly, so that a round
    # in which the attack cannot apply (too few honest replies) aggregates its honest momentum
    replaced = [c.is_malicious and needs_honest(cfg.attack.model) and len(c) == 0 for c in clients]
    computing = [i for i, skip in enumerate(replaced) if not skip]
    grads = torch.zeros(len(clients), base.numel())
    if computing:
        rows = [minibatch_rows(len(clients[i]), cfg.train.batch_size, seeds[i]) for i in computing]
        xb = torch.stack([clients[i].x[r] for i, r in zip(computing, rows)])
        xb = float_images(xb)
        yb = torch.stack([clients[i].y[r] for i, r in zip(computing, rows)])
        # one shared point, the global model, for every client
        grads[computing] = gradients_in_state_layout(model, global_state, base, xb, yb)
    beta = cfg.train.momentum
    seconds = (time.perf_counter() - started) / max(len(computing), 1)
    mask = parameter_mask(model, global_state)  # buffers are never attacked
    results = []
    for client, gradient, previous, seed in zip(clients, grads, momenta, seeds):
        momentum = (1.0 - beta) * gradient if previous is None else beta * previous + (1.0 - beta) * gradient
        sent, attack_nonfinite = momentum, 0
        if client.is_malicious and cfg.attack.model != "none" and not needs_honest(cfg.attack.model):
            outcome = run_model_attack(cfg.attack.model, momentum[mask][None], momentum[mask],
                                       torch.Generator().manual_seed(seed), **model_attack_arguments(cfg.attack))
            sent, attack_nonfinite = momentum.clone(), outcome.nonfinite
            sent[mask] = outcome.update
        metrics = {"num-examples": cfg.train.batch_size,  # equal weights: the literature's plain mean
                   "partition-id": client.client_id, "malicious": int(client.is_malicious), "train-loss": UNKNOWN,
                   "poisoned-rows": int(client.poisoned.sum()), "epic-dropped": 0, "epic-selections": 0,
                   "epic-poison-recall": UNKNOWN, "epic-skipped-nonfinite": 0, "attack-nonfinite": attack_nonfinite,
                   "train-seconds": seconds}
        results.append(LocalResult(unflatten_like(sent, global_state), metrics, None, momentum))
    return results


def _attacked(cfg: RunConfig, global_state: dict, state: dict, seed: int,
              mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The attacked model state (the entries ``mask`` selects, its parameters, attacked; its buffers,
    such as the cnn's normalisation constants, as trained), and how many attack inputs were non-finite
    (left out or replaced)."""
    base, trained = flatten_state(global_state), flatten_state(state)
    own = (trained - base)[mask]
    generator = torch.Generator().manual_seed(seed)
    outcome = run_model_attack(cfg.attack.model, own[None], own, generator, **model_attack_arguments(cfg.attack))
    attacked = trained.clone()
    attacked[mask] = base[mask] + outcome.update
    return unflatten_like(attacked, state), outcome.nonfinite


# --------------------------------------------------------------------------- EPIC state in messages


def pack_epic_state(state: dict) -> ConfigRecord:
    """`EpicState.state_dict()` as a ConfigRecord, the kept-rows mask bit-packed."""
    keep = np.asarray(state["keep"], dtype=bool)
    return ConfigRecord({"keep": np.packbits(keep).tobytes(), "rows": int(len(keep)),
                         "selections": int(state["selections"])})


def unpack_epic_state(record: ConfigRecord) -> dict:
    """The `EpicState.state_dict()` that `pack_epic_state` packed."""
    bits = np.frombuffer(record["keep"], dtype=np.uint8)  # type: ignore[arg-type]
    keep = np.unpackbits(bits)[: int(record["rows"])].astype(bool)
    return {"keep": keep.tolist(), "selections": int(record["selections"])}


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
    if cfg.server.protocol != "per_step":
        return [_train_reply(m, c) for m, c in zip(messages, contexts)]
    clients = [client_data_for(text, int(c.node_config["partition-id"])) for c in contexts]
    momenta = [_momentum_of(m) for m in messages]
    global_state = messages[0].content.array_records["arrays"].to_torch_state_dict()
    results = per_step_results(cfg, structure_model(text), clients, global_state, int(config["server-round"]),
                               momenta)
    replies = []
    for msg, result in zip(messages, results):
        content = RecordDict({"arrays": ArrayRecord(result.state), "metrics": MetricRecord(result.metrics),
                              MOMENTUM_KEY: ArrayRecord({"m": result.momentum})})
        replies.append(Message(content=content, reply_to=msg))
    return replies


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
        content[EPIC_KEY] = pack_epic_state(result.epic_state)
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
