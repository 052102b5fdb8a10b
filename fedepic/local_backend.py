"""The in-process backend of the server-based round engine (``engine=local``): clients' work as direct
calls, aggregation by the tensor rules, no messages.

Node work calls the same functions a Flower ClientApp calls (``fedepic.client_work``): local epochs
client by client, or, under the per-step protocol, every sampled client's minibatch gradient at the
global model in one batched call. Aggregation runs the member's tensor rule
(``fedepic.extensions.SERVER_RULES``; each is tested equal to its Flower strategy) through
``strategies.aggregate.aggregate``, which leaves out NaN / inf rows first. The rule sees the clients'
parameter updates (model minus global model; momenta under per_step), as the round engine hands them
to either backend (``fedepic.server_rounds.parameter_updates``; buffers follow in ``new_vector``).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch

from fedepic.client_data import ClientData
from fedepic.client_work import (
    local_train, model_for, pack_epic_state, per_step_results, state_parameters, unpack_epic_state,
)
from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.extensions import SERVER_RULES, expected_clients
from fedepic.server_rounds import Aggregated, ClientReply, NodeWork, Progress, per_step
from fedepic.vectors import flatten_state


def aggregate_rows(rule: Any, stack: torch.Tensor, weights: torch.Tensor, state: dict) -> Any:
    """``strategies.aggregate.aggregate`` (imported by name: the core does not import strategies/)."""
    return importlib.import_module("strategies.aggregate").aggregate(rule, stack, None, weights, state)


class RuleAggregation:
    """A member's tensor rule over a round's parameter updates: the one aggregation of ``engine=local``,
    and of ``engine=ray`` for a rule that has no Flower strategy."""

    def __init__(self, cfg: RunConfig, name: str) -> None:
        self.rule = SERVER_RULES.build(name, cfg, {"expected": expected_clients(cfg)})
        self.rule_state: dict = {}

    def __call__(self, work: NodeWork, updates: torch.Tensor, rnd: Optional[int] = None) -> Aggregated:
        """The rule over ``updates``; the round ``rnd`` and the server's own update (``work.server_update``)
        are in the rule's state for this call only (``strategies/aggregate.py``), never checkpointed."""
        weights = torch.tensor([float(r.metrics["num-examples"]) for r in work.replies], dtype=torch.float64)
        inputs = {k: v for k, v in (("round", rnd), ("server_update", work.server_update)) if v is not None}
        self.rule_state.update(inputs)
        try:
            out = aggregate_rows(self.rule, updates, weights, self.rule_state)
        finally:
            for key in inputs:
                self.rule_state.pop(key, None)
        excluded, shares = out.server_notes()
        return Aggregated(out.vector, excluded, shares, out.nonfinite.tolist())

    def state_dict(self) -> dict:
        return {"rule": dict(self.rule_state)}

    def load_state_dict(self, state: dict) -> None:
        self.rule_state = dict(state.get("rule", {}))


class LocalServerBackend:
    """Every client of a member in this process (see the module docstring)."""

    def __init__(self, cfg: RunConfig, name: str, data: ImageData, clients: Sequence[ClientData]) -> None:
        self.cfg, self.data, self.clients = cfg, data, list(clients)
        self.model = model_for(cfg, data)  # the structure per-step gradients go through
        self.parameters = state_parameters(self.model)  # once per member: the layout never changes
        self.aggregation = RuleAggregation(cfg, name)

    def train(self, rnd: int, clients: Sequence[int], progress: Progress) -> NodeWork:
        chosen = [self.clients[i] for i in clients]
        if per_step(self.cfg):
            results = per_step_results(self.cfg, self.model, chosen, progress.like, rnd,
                                       [progress.momentum.get(c.client_id) for c in chosen], self.parameters)
            for client, result in zip(chosen, results):
                progress.momentum[client.client_id] = result.momentum
        else:
            results = []
            for client in chosen:
                saved = progress.epic.get(client.client_id)
                result = local_train(self.cfg, self.data, client, progress.like, rnd,
                                     unpack_epic_state(saved) if saved is not None else None)
                if result.epic_state is not None:
                    progress.epic[client.client_id] = pack_epic_state(result.epic_state)
                results.append(result)
        replies = [ClientReply(c.client_id, r.vector if r.vector is not None else flatten_state(r.state), r.metrics)
                   for c, r in zip(chosen, results)]
        return NodeWork(replies, [], len(chosen))

    def aggregate(self, rnd: int, work: NodeWork, updates: torch.Tensor) -> Aggregated:
        return self.aggregation(work, updates, rnd)

    def state_dict(self) -> dict:
        return self.aggregation.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aggregation.load_state_dict(state)
