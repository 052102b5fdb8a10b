"""The decentralized simulation as a plain in-process loop: the same node and router functions as the
Flower apps (``dfl_node``, ``dfl_router``), without Flower or Ray (it imports neither:
tests/test_layers.py checks it).

It exists for two reasons. It is the reference that the Flower run is tested against (same seed, same
numbers: tests/test_decentralized.py), and it makes sweeps over attacks and detector settings cheap
(``benchmarks/dfl_attack_sweep.py``): on 2 idle CPU cores one noniid.yaml strategy takes about 10 s
here, against 15 s through Flower and Ray (120 s for the 8 strategies, Ray start included), whose
extra cost is starting Ray and moving models between processes.
Nodes run one after another, so it does not scale out; ``mode=decentralized`` remains the way to run.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from fedepic.config import RunConfig, malicious_ids
from fedepic.extensions import PEER_RULES
from fedepic.data import ImageData, load_dataset
from fedepic.train import evaluate
from fedepic.vectors import flatten_state, unflatten_like
from simulations.client_data import build_client_data, client_partition, partition_report
from simulations.dfl_node import (
    STATEFUL, NodeState, aggregate_models, derive_seed, exchanged_state, load_exchanged, new_model, train_local,
    uses_local_epic,
)
from simulations.dfl_router import (
    communication_graph, detection_truth, inbox, outgoing, round_metrics, routing_for, run_label_roles,
)


def run_sequential(cfg: RunConfig, strategy: str, data: Optional[ImageData] = None) -> list[dict[str, Any]]:
    """One strategy's rounds; returns the per-round records ``round_metrics`` gives the Flower run
    (without timings). ``data`` may be passed to reuse a loaded dataset across strategies."""
    data = load_dataset(cfg.data, cfg.seed) if data is None else data
    parts = client_partition(cfg, data)
    bad = malicious_ids(cfg)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    routing = routing_for(strategy, communication_graph(cfg), bad)
    benign = [i for i in range(cfg.clients.count) if i not in bad]
    active = benign if PEER_RULES.has(strategy, "benign_graph") else list(range(cfg.clients.count))
    clients = {i: build_client_data(cfg, data, i, parts) for i in active}
    states = {i: NodeState(strategy) for i in active}
    truth = detection_truth(routing.graph, bad) if strategy in STATEFUL else None
    device = torch.device("cpu")

    def model_of(state_dict=None):
        net = new_model(cfg, data)
        return net if state_dict is None else load_exchanged(net, state_dict)

    records = []
    for round_ in range(1, cfg.rounds + 1):
        trained = {}
        for i in active:
            net = model_of(states[i].model)
            train_local(net, clients[i].x, clients[i].y, cfg, states[i], round_=round_,
                        seed=derive_seed(cfg.seed, round_, i), device=device,
                        epic=uses_local_epic(strategy, cfg, clients[i].is_malicious), poison_mask=clients[i].poisoned)
            states[i].trained = exchanged_state(net)
            trained[i] = flatten_state(states[i].trained)
        sent = outgoing(cfg.attack, trained, routing.graph.subgraph(active), bad, seed=cfg.seed, round_=round_)
        evals, models, confirmed = {}, {}, {}
        for i in active:
            box, w = inbox(sent, i), routing.weights[i]
            received = {j: unflatten_like(v, states[i].trained) for j, v in box.items()}
            report = aggregate_models(strategy, cfg, states[i], received, {j: w[j] for j in box},
                                      1 - sum(w[j] for j in box), clients[i].is_malicious)
            confirmed[i] = report.confirmed
            if i in benign:
                evals[i] = evaluate(model_of(states[i].model), data.test_x, data.test_y,
                                    cfg.train.eval_batch_size, data.num_classes, cfg.train.amp)
                models[i] = flatten_state(states[i].model)
        records.append({"round": round_, **round_metrics(evals, models, benign, roles,
                                                         confirmed if truth else None, truth)})
    return records
