"""What a client computes in one round of the server-based mode, free of Flower and Ray: local epochs
from the global model (optionally with local EPIC; the local optimiser's ``train.momentum``,
``train.nesterov`` and ``train.weight_decay``), or one minibatch gradient and its momentum under the
per-step protocol (beta = ``train.client_momentum``, in the form ``train.client_momentum_form``; a
malicious client with ``attack.momentum=false`` sends its raw gradient instead; no L2 on the client: the server step applies
``server.weight_decay``), then the client's own model attack. Both backends call these functions: the
in-process one directly (``fedepic.local_backend``), the Flower ClientApp per message
(``simulations/client_app.py``).

Model attacks applied here act on the update u = w_local - w_global of a malicious client (or on its
momentum under the per-step protocol), parameters only: sign_flip, gaussian (attack.sigma) and scaling
(attack.scale). ALIE, IPM and min-max need the round's benign updates and are applied by the round
engine (``fedepic.server_rounds.inject_model_attack``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from fedepic.attacks.model_attacks import acts_where_trained, model_attack_arguments, needs_honest, run_model_attack
from fedepic.builders import build_model, epic_schedule
from fedepic.client_data import ClientData
from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.dropout import has_dropout, mask_seed
from fedepic.epic import EpicState
from fedepic.metrics import poison_stats
from fedepic.minibatches import minibatch_positions, with_replacement_rows
from fedepic.seeds import client_round_seed
from fedepic.stacked import gradients_in_state_layout
from fedepic.train import client_momentum_, fit, float_images, prepare_model, resolve_device
from fedepic.vectors import flatten_state, parameter_mask, unflatten_like

UNKNOWN = -1.0  # MetricRecords must hold the same keys on every client: -1 marks "not measured"


def minibatch_rows(rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """``batch_size`` row indices in [0, rows), drawn with replacement from a generator seeded by ``seed``
    (``train.sampler=replacement``: ``fedepic.minibatches.with_replacement_rows``)."""
    return with_replacement_rows(rows, batch_size, seed)


def client_batch_rows(cfg: RunConfig, rows: int, seed: int, server_round: int) -> torch.Tensor:
    """A per-step client's minibatch of ``server_round`` (from 1) among its ``rows`` rows under
    ``train.sampler`` (``fedepic.minibatches``): drawn with replacement seeded by ``seed``, or its
    in-order batch number ``server_round - 1``."""
    return minibatch_positions(cfg.train.sampler, rows, cfg.train.batch_size, seed, server_round - 1,
                               cfg.train.batches_per_epoch)


def model_for(cfg: RunConfig, data: ImageData) -> torch.nn.Module:
    return build_model(cfg, data)  # unseeded: the server's initial weights are loaded over it


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # the model state the client sends (after its model attack)
    metrics: dict[str, float]
    epic_state: Optional[dict]  # EpicState.state_dict() to keep, when local EPIC runs
    momentum: Optional[torch.Tensor] = None  # per_step: the client's new m_i (before its model attack)
    vector: Optional[torch.Tensor] = None  # per_step: what it sends, flat (``state`` holds views of it)


def local_train(cfg: RunConfig, data: ImageData, client: ClientData, global_state: dict[str, torch.Tensor],
                server_round: int, epic_state: Optional[dict] = None) -> LocalResult:
    """One client's round: local epochs from the global model (optionally with local EPIC), then its
    client-side model attack if it is malicious. Pure apart from torch's RNG use inside `fit`."""
    started = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = model_for(cfg, data)
    model.load_state_dict(global_state)
    model = prepare_model(model, device, cfg.train.amp)
    seed = client_round_seed(cfg.seed, client.client_id, server_round)
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
    if client.is_malicious and acts_where_trained(cfg.attack.model):
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


def per_step_results(cfg: RunConfig, model: torch.nn.Module, clients: Sequence[ClientData],
                     global_state: dict[str, torch.Tensor], server_round: int,
                     momenta: Sequence[Optional[torch.Tensor]], parameters: torch.Tensor) -> list[LocalResult]:
    """One per-step round of ``clients`` (module docstring): their minibatch gradients at the global
    model in one vectorized call, their momenta, and what each sends (after its client-side attack).
    ``parameters`` is ``fedepic.vectors.parameter_mask`` of the model's state layout, which the caller
    computes once per run (:func:`state_parameters`): buffers are never attacked."""
    started = time.perf_counter()
    base = flatten_state(global_state)
    if parameters.shape != base.shape:
        raise ValueError(f"parameters has {parameters.numel()} entries, the global state {base.numel()}")
    seeds = [client_round_seed(cfg.seed, c.client_id, server_round) for c in clients]
    # a malicious client without rows whose vector the server-side attack replaces computes nothing (as
    # in ByzFL, where Byzantine clients hold no data); with rows it computes honestly, so that a round
    # in which the attack cannot apply (too few honest replies) aggregates its honest momentum
    replaced = [c.is_malicious and needs_honest(cfg.attack.model) and len(c) == 0 for c in clients]
    computing = [i for i, skip in enumerate(replaced) if not skip]
    grads = torch.zeros(len(clients), base.numel())
    if computing:
        rows = [client_batch_rows(cfg, len(clients[i]), seeds[i], server_round) for i in computing]
        xb = torch.stack([clients[i].x[r] for i, r in zip(computing, rows)])
        xb = float_images(xb)
        yb = torch.stack([clients[i].y[r] for i, r in zip(computing, rows)])
        # dropout masks (a model with dropout) seeded by (seed, round, client), whichever clients share the call
        mask_seeds = ([mask_seed(cfg.seed, server_round, clients[i].client_id) for i in computing]
                      if has_dropout(model) else None)
        # one shared point, the global model, for every client
        grads[computing] = gradients_in_state_layout(model, global_state, base, xb, yb, mask_seeds=mask_seeds)
    beta, form = cfg.train.client_momentum, cfg.train.client_momentum_form
    seconds = (time.perf_counter() - started) / max(len(computing), 1)
    mask = parameters
    results = []
    for client, gradient, previous, seed in zip(clients, grads, momenta, seeds):
        if client.is_malicious and not cfg.attack.momentum:  # attack.momentum=false: the raw gradient, no memory
            momentum = gradient.clone()
        else:
            momentum = client_momentum_(torch.zeros_like(gradient) if previous is None else previous.clone(),
                                        gradient, beta, form)
        sent, attack_nonfinite = momentum, 0
        if client.is_malicious and acts_where_trained(cfg.attack.model):
            outcome = run_model_attack(cfg.attack.model, momentum[mask][None], momentum[mask],
                                       torch.Generator().manual_seed(seed), **model_attack_arguments(cfg.attack))
            sent, attack_nonfinite = momentum.clone(), outcome.nonfinite
            sent[mask] = outcome.update
        metrics = {"num-examples": cfg.train.batch_size,  # equal weights: the literature's plain mean
                   "partition-id": client.client_id, "malicious": int(client.is_malicious), "train-loss": UNKNOWN,
                   "poisoned-rows": int(client.poisoned.sum()), "epic-dropped": 0, "epic-selections": 0,
                   "epic-poison-recall": UNKNOWN, "epic-skipped-nonfinite": 0, "attack-nonfinite": attack_nonfinite,
                   "train-seconds": seconds}
        results.append(LocalResult(unflatten_like(sent, global_state), metrics, None, momentum, sent))
    return results


def state_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Which entries of a ``flatten_state`` of ``model``'s states are its parameters
    (``fedepic.vectors.parameter_mask`` on its own state layout): one bool vector per run, the same for
    every state of the model (the global model of every round)."""
    return parameter_mask(model, model.state_dict())


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


def pack_epic_state(state: dict) -> dict:
    """``EpicState.state_dict()`` as plain data that a Flower ConfigRecord can carry: the kept-rows
    mask bit-packed."""
    keep = np.asarray(state["keep"], dtype=bool)
    return {"keep": np.packbits(keep).tobytes(), "rows": int(len(keep)), "selections": int(state["selections"])}


def unpack_epic_state(packed: Mapping[str, Any]) -> dict:
    """The ``EpicState.state_dict()`` that :func:`pack_epic_state` packed."""
    bits = np.frombuffer(packed["keep"], dtype=np.uint8)  # type: ignore[arg-type]
    keep = np.unpackbits(bits)[: int(packed["rows"])].astype(bool)
    return {"keep": keep.tolist(), "selections": int(packed["selections"])}
