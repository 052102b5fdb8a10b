"""Evaluation of many decentralized nodes at once: the benign nodes' models as rows of one [n, D]
tensor, scored together by one vmap over the models (``fedepic.stacked.stacked_logits``) instead of one
forward pass per node. Used by both in-process members (``peer_local``, ``peer_stacked``) for models
whose exchanged entries are all parameters (mlp, cnn, cnn_mnist); BatchNorm models are scored node by
node. Equal to ``train.evaluate`` and ``attack_success`` model by model: tests/test_dfl_stacked.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from fedepic.attacks import attack_success, attack_success_many, data_attack
from fedepic.attacks.data_attacks import batched_success
from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.stacked import activation_size, parameter_layout, stacked_logits
from fedepic.train import evaluate, logit_metrics
from fedepic.vectors import unflatten_like
from fedepic.peer_node import exchanged_state, load_exchanged, new_model

EVAL_ENTRIES = 2 ** 27  # activation entries (float32: 512 MB) in flight in one vectorized evaluation


def stackable(model: nn.Module) -> bool:
    """Whether ``model``'s exchanged entries are all parameters (mlp, cnn), so rows can stand for models."""
    try:
        parameter_layout(model)
    except ValueError:
        return False
    return True


def evaluate_rows(model: nn.Module, rows: Tensor, cfg: RunConfig, data: ImageData) -> list[dict[str, Any]]:
    """``train.evaluate`` and the attack's success for every row of ``rows`` [n, D] (models in
    ``model``'s flat layout), scored together: the test images go once through a vmap over a chunk of
    models (``fedepic.stacked.stacked_logits``). An attack that scores one model at a time
    (``batched_success``) is scored with its own ``success`` on each model."""
    images = min(cfg.train.eval_batch_size, max(len(data.test_y), 1))
    per_model = activation_size(model, data.test_x[:1].float() / 255) * images
    chunk = max(1, EVAL_ENTRIES // max(per_model, 1))
    together = batched_success(data_attack(cfg.attack))
    out: list[dict[str, Any]] = []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        logits = stacked_logits(model, part, data.test_x, images)
        evals = [logit_metrics(logits[k], data.test_y, data.num_classes) for k in range(part.shape[0])]
        if together:
            success = attack_success_many(lambda x: stacked_logits(model, part, x, images), part.shape[0],
                                          cfg.attack, data.test_x, data.test_y, data.num_classes)
        else:
            success = [attack_success(load_exchanged(model, unflatten_like(r, exchanged_state(model))), cfg.attack,
                                      data.test_x, data.test_y, data.num_classes) for r in part]
        for k, result in enumerate(evals):
            value = None if success is None or success[k] is None else float(success[k])
            out.append({**result, "attack_success": value})
    return out


AVERAGE = "average_accuracy"  # the metrics.jsonl column of the average model (train.eval_average_model)


def average_columns(cfg: RunConfig) -> list[str]:
    """The columns :func:`average_record` writes under ``cfg``: none, or ``average_accuracy`` and one
    ``average_accuracy_<name>`` per ``topology.groups`` entry."""
    if not cfg.train.eval_average_model:
        return []
    return [AVERAGE, *(f"{AVERAGE}_{name}" for name in cfg.topology.groups)]


def average_record(cfg: RunConfig, data: ImageData, models: Mapping[int, Tensor],
                   model: Optional[nn.Module] = None) -> dict[str, float]:
    """The test accuracy of ONE model, the plain mean of the benign nodes' models ``models`` ({node:
    flat exchanged state}, those evaluated this round), and of the mean over each ``topology.groups``
    entry's benign nodes (NaN for a group without any): the columns of :func:`average_columns`, empty
    without ``train.eval_average_model``.

    ClippedGossip's code scores its nodes this way (He, Karimireddy, Jaggi, arXiv:2202.01545, 2022;
    dumbbell.py:224-262 with codes/simulator.py:288-295: "``state_dict[key] = sum(sd[key] for sd in
    state_dicts) / len(state_dicts)``", fedepic/reproduce/PROTOCOLS.md 1.6): all honest nodes, and each
    clique. Deviation: fedepic scores all of its test set (the authors' loader drops the last partial
    batch: 9,984 of 10,000 images). The mean is taken in float64 and rounded to float32 once. ``model``:
    a template of the layout (built from ``cfg`` when None). Cost: one evaluation per model.
    """
    if not cfg.train.eval_average_model or not models:
        return {}
    sets = {AVERAGE: sorted(models)}
    sets.update({f"{AVERAGE}_{name}": [i for i in nodes if i in models] for name, nodes in cfg.topology.groups.items()})
    scored = {key: ids for key, ids in sets.items() if ids}
    out = {key: float("nan") for key in sets}
    if not scored:
        return out
    means = torch.stack([torch.stack([models[i] for i in ids]).double().mean(0).float() for ids in scored.values()])
    model = new_model(cfg, data) if model is None else model
    if stackable(model):
        results = evaluate_rows(model, means, cfg, data)
    else:
        template = exchanged_state(model)
        results = [evaluate(load_exchanged(model, unflatten_like(row, template)), data.test_x, data.test_y,
                            cfg.train.eval_batch_size, data.num_classes, cfg.train.amp) for row in means]
    out.update({key: float(result["accuracy"]) for key, result in zip(scored, results)})
    return out
