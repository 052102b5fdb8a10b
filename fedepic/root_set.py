"""The server's root set and its update each round, for the server rules that need one (FLTrust:
Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping", NDSS 2021,
https://arxiv.org/abs/2012.13995; ``strategies/fltrust.py``).

The root set: ``defense.fltrust.root_size`` rows of the training split (the paper uses 100 root
examples), drawn without replacement by ``numpy.random.default_rng(seed * 7_919 + 104_729)`` once per
run, with their clean labels (data attacks poison the clients' copies only). Reading: the paper's root
set is a small clean set the server collects; taking it uniformly from the training data, as its
experiments and FLPoison's port (class-proportional) do, is an inference; the rows may also belong to
clients, as there.

The update: the root set trained as one more benign client would be (``fedepic.client_work.local_train``
with client id -1: the same local epochs, optimiser, learning rate and seed scheme), from the round's
global model, minus that model, on the parameter entries: the same kind of vector as the clients'
updates (``fedepic.server_rounds.parameter_updates``). Local EPIC is off for it (the root set is clean).
Only the local-epochs protocol has it: config validation refuses FLTrust under ``server.protocol=per_step``.

Cost: one client's local training per round.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedepic.client_data import ClientData
from fedepic.client_work import local_train
from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.seeds import root_set_seed
from fedepic.vectors import flatten_state, selector

ROOT_CLIENT = -1  # the id the root set trains under (client seeds count ids from 0)


def root_rows(cfg: RunConfig, data: ImageData) -> np.ndarray:
    """The root set's row indices into the training split (sorted), seeded by ``cfg.seed``."""
    count = len(data.train_y)
    size = min(cfg.defense.fltrust.root_size, count)
    rng = np.random.default_rng(root_set_seed(cfg.seed))
    return np.sort(rng.choice(count, size=size, replace=False))


def root_client(cfg: RunConfig, data: ImageData) -> ClientData:
    rows = root_rows(cfg, data)
    index = torch.from_numpy(rows)
    return ClientData(ROOT_CLIENT, rows, data.train_x[index], data.train_y[index],
                      torch.zeros(len(rows), dtype=torch.bool), False)


def server_update(cfg: RunConfig, data: ImageData, like: dict[str, torch.Tensor], rnd: int,
                  parameters: torch.Tensor) -> torch.Tensor:
    """The root set's update from the global model ``like`` in round ``rnd``, on the ``parameters``
    entries of ``flatten_state`` [P]."""
    plain = dataclasses.replace(cfg, defense=dataclasses.replace(cfg.defense, local_epic=False))
    result = local_train(plain, data, root_client(cfg, data), like, rnd)
    entries = selector(parameters)
    return flatten_state(result.state)[..., entries] - flatten_state(like)[..., entries]
