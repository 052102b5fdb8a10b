"""Seeded, disjoint and complete partitions of a labelled dataset across clients.

Schemes: iid, dirichlet(alpha) (Hsu et al. 2019), shards (McMahan et al. 2017: k label-sorted shards per
client), explicit label sets (which clients hold which labels) and saved rows (a split made elsewhere,
neither necessarily complete nor, under ``data.shared_rows=true``, disjoint).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedepic.config import DataConfig, LabelGroup
from fedepic.errors import ConfigError


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_per_client: int = 10, max_tries: int = 1000) -> list[np.ndarray]:
    """Per class, split its rows by proportions ~ Dir(alpha); redraw until every client has `min_per_client` rows."""
    min_needed = min(min_per_client, len(labels) // num_clients)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(rows)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_needed:
            return merged
    raise ValueError(f"dirichlet partition: no draw in {max_tries} gave every client >= {min_needed} rows; "
                     "raise data.alpha or lower data.min_per_client")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort rows by label (shuffled within a label), cut into equal shards, deal k shards to each client."""
    order = np.lexsort((rng.permutation(len(labels)), labels))
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def label_sets(labels: np.ndarray, num_clients: int, groups: Sequence[LabelGroup],
               rng: np.random.Generator) -> list[np.ndarray]:
    """Each label's rows are split evenly among the clients whose group lists that label."""
    holders: dict[int, list[int]] = {}
    listed: set[int] = set()
    for group in groups:
        for client in group.clients:
            if client in listed:
                raise ValueError(f"data.label_sets: client {client} appears in two groups")
            listed.add(client)
            for label in group.labels:
                holders.setdefault(int(label), []).append(int(client))
    missing_clients = sorted(set(range(num_clients)) - listed)
    if missing_clients:
        raise ValueError(f"data.label_sets: clients {missing_clients} are in no group")
    present = sorted(int(c) for c in np.unique(labels))
    orphan = [c for c in present if c not in holders]
    if orphan:
        raise ValueError(f"data.label_sets: labels {orphan} are held by no client (partitions must be complete)")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, clients in holders.items():
        rows = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(sorted(clients), np.array_split(rows, len(clients))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def saved_rows(path: str, num_clients: int, num_rows: int, keep_order: bool = False) -> list[np.ndarray]:
    """The rows of every client as saved in ``path`` (client_0, client_1, ...): a split made elsewhere,
    e.g. by another framework, so that both train on the same clients. Clients may hold no rows, rows
    may belong to nobody, and, under ``data.shared_rows=true``, to several clients (the config check
    has refused a row twice in one client, and rows shared without that key). Each client's rows in
    ascending order, or, with ``keep_order`` (``train.sampler=in_order``, which reads them in their
    stored order), in the file's order."""
    with np.load(path) as saved:
        parts = [saved[f"client_{k}"].astype(np.int64) for k in range(num_clients)]
    if not keep_order:
        parts = [np.sort(p) for p in parts]
    top = max((int(p.max()) for p in parts if p.size), default=-1)
    if top >= num_rows:
        raise ConfigError(f"invalid value {path!r} for key 'data.partition_file': row {top} is beyond the "
                          f"{num_rows} training rows of the dataset")
    return parts


def partition(labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int,
              keep_order: bool = False) -> list[np.ndarray]:
    """Row indices per client under `cfg.partition`, reproducible from `seed`; ``keep_order``: a rows
    file's order as saved (:func:`saved_rows`), the other schemes' rows ascending either way."""
    labels = np.asarray(labels)
    if num_clients < 1 or num_clients > len(labels):
        raise ValueError(f"cannot split {len(labels)} rows among clients.count={num_clients}")
    rng = np.random.default_rng(seed)
    if cfg.partition == "iid":
        return iid(labels, num_clients, rng)
    if cfg.partition == "dirichlet":
        return dirichlet(labels, num_clients, cfg.alpha, rng, cfg.min_per_client)
    if cfg.partition == "shards":
        return shards(labels, num_clients, cfg.shards_per_client, rng)
    if cfg.partition == "label_sets":
        return label_sets(labels, num_clients, cfg.label_sets, rng)
    if cfg.partition == "rows":
        return saved_rows(cfg.partition_file, num_clients, len(labels), keep_order)
    raise ValueError(f"unknown data.partition {cfg.partition!r}")


def label_histograms(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> list[list[int]]:
    labels = np.asarray(labels)
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
