"""Each client's (possibly attacked) rows, the partition report, and the per-process caches the Ray
workers read them from. Free of Flower and Ray: the in-process decentralized loop uses it too.

Caches: a Ray actor runs many ClientApp calls in one process, so the parsed config, the dataset and
each client's rows are memoised, keyed by the config text (and the partition id). They hold only
values derived deterministically from that key, so they never change results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from fedepic import seeds
from fedepic.attacks import data_attack, poison_rows
from fedepic.config import ConfigError, RunConfig, malicious_ids, validate
from fedepic.data import ImageData, cache_dir, default_root, load_dataset
from fedepic.extensions import DATA_ATTACKS
from fedepic.partition import label_histograms, partition


def worker_config(cfg: RunConfig) -> RunConfig:
    """The config clients and nodes get: data root and decoded cache as absolute paths resolved on the
    driver, so that Ray workers (other processes, other working directories, other machines of a
    cluster without FEDEPIC_DATA) read the same files as the driver."""
    data = dataclasses.replace(cfg.data, root=str(default_root(cfg.data).resolve()),
                               cache_dir=str(cache_dir(cfg.data).resolve()),
                               partition_file=None if cfg.data.partition_file is None
                               else str(Path(cfg.data.partition_file).resolve()))
    return dataclasses.replace(cfg, data=data, progress=False)


@dataclass(frozen=True)
class ClientData:
    """One client's share of the training set, after its data attack (if it is malicious)."""

    client_id: int
    rows: np.ndarray  # indices into data.train_x / train_y
    x: torch.Tensor  # uint8 [n, C, H, W]
    y: torch.Tensor  # int64 [n]
    poisoned: torch.Tensor  # bool [n]: rows the attack changed
    is_malicious: bool

    def __len__(self) -> int:
        return len(self.y)


def client_partition(cfg: RunConfig, data: ImageData) -> list[np.ndarray]:
    """Row indices per client, reproducible from cfg.seed (the same split for every strategy): a
    ``data.partition=rows`` file's rows in its order under ``train.sampler=in_order`` (which reads them
    in their stored order; a run-level key for that reason), ascending otherwise."""
    return partition(data.train_y.numpy(), cfg.clients.count, cfg.data, cfg.seed,
                     keep_order=cfg.train.sampler == "in_order")


@lru_cache(maxsize=4)
def _load_poison_set(path: str):
    from fedepic.attacks.gradient_matching import load_poisons

    return load_poisons(path)


def poison_set(cfg: RunConfig):
    """The saved Witches' Brew poison set for attack.data=gradient_matching (FL reuses, never brews)."""
    if not DATA_ATTACKS.has(cfg.attack.data, "poison_set"):
        return None
    if not cfg.attack.poisons:
        raise ConfigError("invalid value None for key 'attack.poisons': federated gradient_matching needs a saved "
                          "poison set (brew one with mode=centralized, then pass attack.poisons=FILE.npz)")
    return _load_poison_set(str(cfg.attack.poisons))


def checked_poison_set(cfg: RunConfig, data: ImageData):
    """`poison_set`, refused (one-line DataError / ConfigError) unless it fits ``data`` and attack.eps."""
    poisons = poison_set(cfg)
    if poisons is not None:
        from fedepic.attacks.gradient_matching import check_poisons

        check_poisons(poisons, data.train_x, data.train_y, data.test_y, data.num_classes, cfg.attack.eps)
    return poisons


def client_seed(cfg: RunConfig, client_id: int) -> int:
    """Client ``client_id``'s seed in the run of ``cfg`` (``fedepic.seeds.client_seed``)."""
    return seeds.client_seed(cfg.seed, client_id)


def build_client_data(cfg: RunConfig, data: ImageData, client_id: int,
                      parts: Optional[Sequence[np.ndarray]] = None) -> ClientData:
    """Client `client_id`'s rows, attacked when it is malicious; deterministic from cfg.seed.

    Data attacks of a malicious client:
    (the attack's ``client_fraction`` of its rows, or the poison set of an attack flagged ``poison_set``)
    - label_flip: every flippable row of the client (fraction 1.0; Tolpegin et al. 2020's setting);
    - backdoor: attack.backdoor_fraction of the client's non-target rows get the trigger (BadNets);
    - gradient_matching: the rows of the saved poison set (attack.poisons) that fall in this client's
      partition are replaced by their poisoned versions; poisons in benign partitions stay clean.
    """
    if not 0 <= client_id < cfg.clients.count:
        raise ValueError(f"client_id {client_id} outside [0, clients.count={cfg.clients.count})")
    parts = client_partition(cfg, data) if parts is None else parts
    rows = np.asarray(parts[client_id], dtype=np.int64)
    index = torch.from_numpy(rows)
    x, y = data.train_x[index], data.train_y[index]
    malicious = client_id in set(malicious_ids(cfg))
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    fraction = data_attack(cfg.attack).client_fraction if malicious else None  # None: no rows drawn
    if fraction is not None:
        attacked = poison_rows(cfg.attack, x, y, data.num_classes, fraction=fraction, seed=client_seed(cfg, client_id))
        x, y, poisoned = attacked.x, attacked.y, attacked.poisoned
    elif malicious and DATA_ATTACKS.has(cfg.attack.data, "poison_set"):
        poisons = checked_poison_set(cfg, data)
        position = {int(r): i for i, r in enumerate(rows)}
        hits = [(position[int(r)], j) for j, r in enumerate(poisons.indices.tolist()) if int(r) in position]
        if hits:
            local, source = (torch.tensor(v, dtype=torch.int64) for v in zip(*hits))
            x = x.clone()
            x[local] = poisons.poisoned_x[source].to(x.dtype)
            poisoned[local] = True
    return ClientData(client_id, rows, x, y, poisoned, malicious)


def partition_report(cfg: RunConfig, data: ImageData, parts: Optional[Sequence[np.ndarray]] = None) -> dict:
    """Label histogram and size per client, and the malicious ids (written to the run's summary)."""
    parts = client_partition(cfg, data) if parts is None else parts
    hist = label_histograms(data.train_y.numpy(), parts, data.num_classes)
    return {"clients": cfg.clients.count, "sizes": [int(len(p)) for p in parts], "label_histograms": hist,
            "malicious": malicious_ids(cfg), "partition": cfg.data.partition}


# Each ClientApp call ships only the run's config as YAML text; a Ray actor process decodes it and
# loads the dataset once (the memo Flower's own examples keep for their FederatedDataset), then
# cuts each client's partition out of it. Keyed by the config text, so two runs never mix.


@lru_cache(maxsize=4)
def config_from_text(text: str) -> RunConfig:
    """The RunConfig the ServerApp sent (schema defaults <- its YAML), validated."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


@lru_cache(maxsize=64)
def member_from_text(text: str, entry: str) -> tuple[str, RunConfig]:
    """(peer rule, member config) of a ``strategies`` entry of the config the ServerApp sent
    (``fedepic.config.member_config``), resolved once per worker process: a variant's merge is not
    repeated for every message."""
    from fedepic.config import member_config

    return member_config(config_from_text(text), entry)


@lru_cache(maxsize=2)
def dataset_for(text: str) -> ImageData:
    cfg = config_from_text(text)
    return load_dataset(cfg.data, cfg.seed)


@lru_cache(maxsize=2)
def partition_for(text: str) -> list[np.ndarray]:
    return client_partition(config_from_text(text), dataset_for(text))


@lru_cache(maxsize=1024)
def client_data_for(text: str, client_id: int) -> ClientData:
    return build_client_data(config_from_text(text), dataset_for(text), client_id, partition_for(text))
