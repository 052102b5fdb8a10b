"""Local epochs of many nodes at once: the minibatch SGD of ``fedepic.train.fit``, every node on its
own rows, in its own order, from its own seed, with all nodes' gradients of a step in one call.

A decentralized round under ``local_epochs`` trains every node for a few epochs on a few hundred
rows: thousands of tiny steps, each dominated by Python and autograd dispatch when taken one node at
a time (one dispatch per layer, node and step; docs/results/engines.md). Here step s of an epoch is one
``fedepic.stacked.weighted_gradients`` call (``torch.func.vmap``) over every node that still has a
batch s, then one fused ``torch.optim.SGD.step`` over the per-node rows of the stacked layers.

What makes it the same training as ``fit`` node by node (tests/test_stacked_fit.py):

- each node's ``torch.Generator`` is seeded with its own seed and draws, per epoch, the permutation of
  its kept rows (``keep``, which an ``epoch_end`` hook such as EPIC may shrink), and, with
  ``train.augment``, its crops and flips batch by batch, in ``train_epoch``'s order;
- batches are ``train.batch_size`` rows of that order, the last one short; a short batch is padded
  (with weight 0) and its rows weighted 1 / B_k, so every node's gradient is that of its own mean loss;
- the optimizer is torch's own SGD (momentum, Nesterov, weight decay) over one parameter per node
  and layer: the rows of the stacked [n, *shape] layer tensors. A node without a batch at step s gets no gradient, and
  torch's SGD skips a parameter whose ``grad`` is None, so it neither moves nor decays, exactly as
  when its own loop has ended; its momentum buffer starts at its own first step.

Equal to the loop up to float rounding (a batched matrix product sums in another order; the fused SGD
rounds the last elements of a tensor apart). Models whose exchanged entries are all parameters (mlp,
cnn, cnn_mnist) only: BatchNorm's running statistics are not parameters
(``fedepic.stacked.parameter_layout`` refuses them). CPU only: no autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fedepic.augment import random_crop_flip
from fedepic.config import TrainConfig
from fedepic.dropout import draw_masks, has_dropout
from fedepic.stacked import parameter_layout, split_flat, weighted_gradients
from fedepic.train import float_images

FUSED_SGD_DEVICES = ("cpu", "cuda")  # where torch has a fused SGD kernel

# (node index k, epoch, node k's parameters {name: tensor} after that epoch) -> statistics to record, or None
StackedEpochEnd = Callable[[int, int, dict[str, Tensor]], Optional[dict]]


@dataclass
class NodeRows:
    """One node's training data: all its rows ``x`` (uint8, or float in [0, 1]) and labels ``y``, the
    rows it trains on (``keep``, bool [N]: a hook may shrink it in place between epochs) and its seed."""

    x: Tensor
    y: Tensor
    keep: Tensor
    seed: int


def _epoch_orders(nodes: Sequence[NodeRows], generators: Sequence[torch.Generator]) -> list[Tensor]:
    """Each node's row order for one epoch, drawn as ``fedepic.train.train_epoch`` draws it."""
    orders = []
    for node, generator in zip(nodes, generators):
        rows = node.keep.to(node.x.device).nonzero().squeeze(1)
        orders.append(rows[torch.randperm(len(rows), generator=generator, device=generator.device).to(rows.device)])
    return orders


def _step_batch(nodes: Sequence[NodeRows], orders: Sequence[Tensor], active: Sequence[int], start: int,
                cfg: TrainConfig, generators: Sequence[torch.Generator], model: Optional[nn.Module] = None
                ) -> tuple[Tensor, Tensor, Tensor, list[int], Optional[dict[str, Tensor]]]:
    """Images [a, B, ...], labels [a, B] and weights [a, B] of step ``start // batch_size`` for the
    ``active`` nodes, short batches padded with weight-0 copies of a real row; also each node's real batch
    size and, with ``model`` (one with dropout), the dropout masks {name: [a, B, ...]}, each node's drawn
    from its own generator after its augmentation, as ``fedepic.train.train_epoch`` draws them (the
    padding's masks are ones)."""
    pieces = [orders[k][start:start + cfg.batch_size] for k in active]
    sizes = [len(p) for p in pieces]
    width = max(sizes)
    images, labels, masks = [], [], []
    for k, rows in zip(active, pieces):
        xb = float_images(nodes[k].x[rows])
        if cfg.augment != "none":  # per node, from its own generator, as its own loop would draw
            xb = random_crop_flip(xb, cfg.crop_pad, generators[k], flip=cfg.augment == "crop_flip")
        yb = nodes[k].y[rows]
        drawn = draw_masks(model, len(rows), generators[k]) if model is not None else {}
        if len(rows) < width:  # padded with copies of the first row (weight 0): finite wherever the real rows are
            xb = torch.cat([xb, xb[:1].expand(width - len(rows), *xb.shape[1:])])
            yb = torch.cat([yb, yb[:1].expand(width - len(rows))])
            drawn = {name: torch.cat([m, m.new_ones(width - len(rows), *m.shape[1:])]) for name, m in drawn.items()}
        images.append(xb)
        labels.append(yb)
        masks.append(drawn)
    weights = torch.zeros(len(active), width)
    for j, size in enumerate(sizes):
        weights[j, :size] = 1.0 / size
    stacked_masks = {name: torch.stack([m[name] for m in masks]) for name in masks[0]} if model is not None else None
    return torch.stack(images), torch.stack(labels), weights, sizes, stacked_masks


def stacked_fit(model: nn.Module, start: Tensor, nodes: Sequence[NodeRows], cfg: TrainConfig, *, epochs: int,
                lr: float, epoch_end: Optional[StackedEpochEnd] = None) -> tuple[Tensor, list[list[dict]]]:
    """Train every row of ``start`` [n, D] (flat parameters in ``fedepic.stacked.parameter_layout``
    order; ``model`` gives the architecture) for ``epochs`` epochs on ``nodes[k]``, with a fresh SGD
    at learning rate ``lr`` and ``cfg``'s momentum, Nesterov and weight decay (``train.milestones``
    are the caller's: ``lr`` is fixed here).

    ``epoch_end(k, epoch, params_k)`` runs after every epoch for every node, with node k's parameters
    {name: tensor} (views: copy what you keep), and may shrink ``nodes[k].keep``. Returns the trained
    parameters [n, D] and, per node, one record per epoch: {"epoch", "loss" (the mean training loss
    over the epoch's rows), "lr", "rows"} plus the hook's."""
    layout = parameter_layout(model)
    layers = {name: view.clone() for name, view in split_flat(start.detach(), layout).items()}
    per_node = [[layers[name][k] for name, _ in layout] for k in range(len(nodes))]  # views of the rows
    # torch's SGD over one parameter per node and layer. Fused: each tensor's whole update (weight decay,
    # momentum, Nesterov, step) in one kernel instead of one per operation and tensor, which for 20 nodes
    # x 6 layers of the mlp measured faster than foreach (docs/results/engines.md, fused SGD). The same
    # arithmetic: on the 2-core CPU it matched fit's unfused SGD to the bit except in each tensor's last
    # numel % 16 elements (the
    # kernel's scalar tail), which the batched matrix products already leave apart in the last bits.
    # Fused SGD needs every momentum buffer to start at the first step (a parameter first stepped after
    # the others raises): here it does, as every node with rows has a batch at step 0 of epoch 1 and
    # ``keep`` only shrinks; a node without rows is never stepped.
    params = [p for node_params in per_node for p in node_params]
    fused = bool(params) and all(p.device.type in FUSED_SGD_DEVICES for p in params)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay, **({"fused": True} if fused else {"foreach": True}))
    generators = [torch.Generator(device=node.x.device).manual_seed(node.seed) for node in nodes]
    dropout = model if has_dropout(model) else None  # its masks come from the nodes' generators
    histories: list[list[dict]] = [[] for _ in nodes]
    for epoch in range(1, epochs + 1):
        orders = _epoch_orders(nodes, generators)
        totals = torch.zeros(len(nodes))
        steps = max((math.ceil(len(o) / cfg.batch_size) for o in orders), default=0)
        for step in range(steps):
            first = step * cfg.batch_size
            active = [k for k, order in enumerate(orders) if first < len(order)]
            xb, yb, weights, sizes, masks = _step_batch(nodes, orders, active, first, cfg, generators, dropout)
            index = torch.tensor(active)
            point = layers if len(active) == len(nodes) else {n: t.index_select(0, index) for n, t in layers.items()}
            grads, losses = weighted_gradients(model, point, xb, yb, weights, masks)
            optimizer.zero_grad(set_to_none=True)
            for j, k in enumerate(active):
                for (name, _), param in zip(layout, per_node[k]):
                    param.grad = grads[name][j]
            optimizer.step()
            totals.index_add_(0, index, losses.detach() * torch.tensor(sizes, dtype=losses.dtype))
        for k, order in enumerate(orders):
            record = {"epoch": epoch, "loss": (totals[k] / max(len(order), 1)).item(), "lr": lr, "rows": len(order)}
            extra = None
            if epoch_end is not None:
                extra = epoch_end(k, epoch, {name: param for (name, _), param in zip(layout, per_node[k])})
            histories[k].append({**record, **(extra or {})})
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([layers[name].reshape(len(nodes), -1) for name, _ in layout], dim=1), histories
