"""EPIC at a Flower server: drop isolated client updates by greedy medoid selection, average the rest.

Paper: Yu Yang, Tian Yu Liu, Baharan Mirzasoleiman, "Not All Poisons are Created Equal: Robust Training
against Data Poisoning", ICML 2022 (PMLR 162), https://proceedings.mlr.press/v162/yang22j.html.
Deviation (our extension): the paper selects over training examples' gradients; here the points are
the clients' updates.

The selector is fedepic.epic.select_medoids, the same one that cleans training sets and
each client's rows (here the third place): the features are the clients' flattened updates and all
labels are equal (one group).

Updates and received models give the same selection: the update of client i is w_i - w_global,
so every pairwise distance ||u_i - u_j|| = ||w_i - w_j|| and the selector (which works only on
distances, see fedepic/epic.py) never needs the global model. The strategy therefore overrides
only `aggregate_train`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from fedepic.vectors import flatten_state
from strategies.epic_updates import (  # noqa: F401 (UpdateSelection, medoid_count re-exported)
    UpdateSelection, check_epic_parameters, epic_select_updates, medoid_count,
)


def record_vector(record: ArrayRecord) -> Tensor:
    """``fedepic.vectors.flatten_state`` of the record's arrays: the one vector layout of every mode."""
    return flatten_state(record.to_torch_state_dict())


def client_id(msg: Message, key: str = "partition-id") -> int:
    """The client's partition id from its reply metrics, else its node id (the server sees only node ids)."""
    metrics = next(iter(msg.content.metric_records.values()), None)
    if metrics is not None and key in metrics:
        return int(metrics[key])
    return int(msg.metadata.src_node_id)


class EpicServer(FedAvg):
    """EPIC [Yang et al., 2022] applied to client updates, then Federated Averaging of the kept ones.

    Yu Yang, Tian Yu Liu and Baharan Mirzasoleiman, "Not All Poisons are Created Equal: Robust
    Training against Data Poisoning", ICML 2022 (https://proceedings.mlr.press/v162/yang22j.html). EPIC drops training
    points that sit alone in gradient space; here the points are the round's client updates, so an
    update far from all others (a boosted, sign-flipped or noise update) is left out of the average.
    Colluding attackers that send one identical update form a cluster and are not isolated.

    Parameters
    ----------
    fraction : float
        Medoid budget as a fraction of the round's updates (see `medoid_count`; ``defense.epic.fraction``).
    threshold : int
        Medoids whose cluster holds at most this many updates are dropped (``defense.epic.threshold``).
    min_medoids : int
        Lower bound on the medoid count (``defense.epic.min_medoids``).
    num_malicious_nodes : int
        Assumed attackers; the medoid count is at least this plus one (``defense.byzantine``).
    client_id_key : str (default: "partition-id")
        MetricRecord key naming the client in `dropped_history`; the source node id when absent.
    **kwargs
        Passed to FedAvg (fraction_train, min_available_nodes, weighted_by_key, ...).

    Attributes
    ----------
    dropped_history : dict[int, list[int]]
        Round -> ids of the clients whose updates were dropped.
    """

    def __init__(self, fraction: float, threshold: int, min_medoids: int, num_malicious_nodes: int,
                 client_id_key: str = "partition-id", **kwargs) -> None:
        super().__init__(**kwargs)
        check_epic_parameters(fraction, threshold, min_medoids, num_malicious_nodes)
        self.fraction, self.threshold, self.min_medoids = fraction, threshold, min_medoids
        self.num_malicious_nodes = num_malicious_nodes
        self.client_id_key = client_id_key
        self.dropped_history: dict[int, list[int]] = {}

    def _client_id(self, msg: Message) -> int:
        return client_id(msg, self.client_id_key)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Drop the isolated updates (EPIC), then weighted-average the kept ArrayRecords and metrics."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents: list[RecordDict] = [msg.content for msg in valid]
        key = next(iter(contents[0].array_records.keys()))
        stack = torch.stack([record_vector(content[key]) for content in contents])
        selection = epic_select_updates(stack, self.fraction, self.threshold, self.min_medoids,
                                        self.num_malicious_nodes)
        self.dropped_history[server_round] = sorted(self._client_id(valid[i]) for i in selection.dropped)
        kept = [c for c, k in zip(contents, selection.keep.tolist()) if k]
        arrays = aggregate_arrayrecords(kept, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(kept, self.weighted_by_key)
        return arrays, metrics
