"""Many copies of one model at once: per-copy minibatch gradients over stacked flat parameter vectors.

Decentralized gradient tracking takes one minibatch step per node per round, so a round is many tiny
gradients; one ``torch.func.vmap`` over ``torch.func.functional_call`` computes all of them in one
call instead of one Python-level backward pass per node (torch.func is PyTorch's own batching of
functional transforms; nothing here reimplements autograd). A single node is the case n = 1, so the
in-process engine and a Ray node run the same function.

The flat layout is ``fedepic.vectors.flatten_state`` of the exchanged state (the model's state dict
without the fixed ``mean``/``std`` normalisation buffers): models whose exchanged entries are all
parameters (mlp, cnn) are supported; models with running statistics (BatchNorm: resnet18) are not.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedepic.models import FIXED_BUFFERS


def parameter_layout(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every exchanged float entry, in the order of the flat vectors."""
    params = dict(model.named_parameters())
    layout = []
    for name, value in model.state_dict().items():
        if name in FIXED_BUFFERS or not torch.is_floating_point(value):
            continue
        if name not in params:
            raise ValueError(f"stacked gradients need a model without running buffers; {name!r} is one "
                             "(use decentralized.algorithm=dpsgd for models with BatchNorm)")
        layout.append((name, value.shape))
    return layout


def split_flat(flat: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    """Views of ``flat`` [n, D] as {name: [n, *shape]}."""
    out, offset = {}, 0
    for name, shape in layout:
        size = shape.numel()
        out[name] = flat[:, offset:offset + size].reshape(flat.shape[0], *shape)
        offset += size
    if offset != flat.shape[1]:
        raise ValueError(f"flat vectors have {flat.shape[1]} entries, the model needs {offset}")
    return out


def stacked_gradients(model: nn.Module, flat: Tensor, xb: Tensor, yb: Tensor, weight_decay: float = 0.0) -> Tensor:
    """Gradient [n, D] of ``cross_entropy(model_k(xb[k]), yb[k]) + weight_decay / 2 ||theta_k||^2`` for
    every row k of ``flat`` [n, D] (parameters), with minibatches ``xb`` [n, B, ...] and ``yb`` [n, B].

    ``flat`` may also be one point [D] shared by all n minibatches (the server-based per-step round,
    where every client is at the global model): the parameters are then not batched, which keeps
    convolutions ungrouped (13x faster for a 5x5 two-conv MNIST net with 10 clients here)."""
    layout = parameter_layout(model)
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}
    shared = flat.dim() == 1

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, {**params, **fixed}, (x,)), y)

    points = flat[None] if shared else flat
    params = {k: v[0] for k, v in split_flat(points, layout).items()} if shared else split_flat(points, layout)
    grads = vmap(grad(loss), in_dims=(None if shared else 0, 0, 0))(params, xb, yb)
    out = torch.cat([grads[name].reshape(xb.shape[0], -1) for name, _ in layout], dim=1)
    return out + weight_decay * flat if weight_decay else out


def gradients_in_state_layout(model: nn.Module, like: dict[str, Tensor], points: Tensor, xb: Tensor,
                              yb: Tensor, weight_decay: float = 0.0) -> Tensor:
    """:func:`stacked_gradients` with ``points`` ([n, D] or one shared [D]) and the result [n, D] in the layout of
    ``fedepic.vectors.flatten_state(like)``, where ``like`` is a full state dict (the fixed
    normalisation buffers included, at which the gradient is 0): the server-based mode exchanges full
    state dicts."""
    params = dict(model.named_parameters())
    keys = [k for k, v in like.items() if torch.is_floating_point(v)]
    sizes = [like[k].numel() for k in keys]
    is_param = [k in params for k in keys]
    for k, param in zip(keys, is_param):
        if not param and k not in FIXED_BUFFERS:
            raise ValueError(f"stacked gradients need a model without running buffers; {k!r} is one")
    pieces = points.split(sizes, dim=-1)
    grads = stacked_gradients(model, torch.cat([p for p, keep in zip(pieces, is_param) if keep], dim=-1), xb, yb,
                              weight_decay).split([s for s, keep in zip(sizes, is_param) if keep], dim=1)
    it = iter(grads)
    n = xb.shape[0]
    return torch.cat([next(it) if keep else p.new_zeros(n, p.shape[-1]) for p, keep in zip(pieces, is_param)], dim=1)


def stacked_fit(model: nn.Module, flat: Tensor, xs: list[Tensor], ys: list[Tensor], keeps: list[Tensor], *,
                batch_size: int, lr: float, momentum: float, nesterov: bool, weight_decay: float, seeds: list[int],
                epochs: int, epoch_end: Optional[Callable[[int, Tensor], None]] = None) -> tuple[Tensor, list[list[float]]]:
    """``fedepic.train.fit`` for n copies of ``model`` at once: copy k starts at ``flat[k]`` (the
    parameter layout) and trains ``epochs`` epochs of SGD on its own rows ``xs[k][keeps[k]]``.

    Per copy, exactly fit's schedule: each epoch a permutation of its kept rows from its own generator
    (seeded ``seeds[k]``, one ``randperm`` per epoch, as fit draws it), minibatches of ``batch_size``
    (the last one partial), torch.optim.SGD's update with a fresh momentum buffer (``buf = g`` at the
    first step, then ``buf <- momentum buf + g``; Nesterov ``d = g + momentum buf``; ``g`` includes
    ``weight_decay * theta``) at a constant ``lr``. A step of the batched loop moves every copy that
    still has a minibatch in this epoch; a partial minibatch is padded with weight-0 rows, so its
    loss is the mean over its real rows. ``epoch_end(epoch, flat)`` runs after every epoch and may
    shrink ``keeps`` in place (local EPIC). Returns the trained [n, D] and each copy's epoch losses
    (the mean minibatch loss over the epoch's rows, as fit reports it). Augmentation is not supported
    (the caller falls back to fit). Every copy needs at least one kept row.

    Written by hand because torch.optim steps one parameter set; torch.func gives the per-copy
    gradients, and the momentum update below is SGD's, row-wise.
    """
    layout = parameter_layout(model)
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}

    def weighted_loss(params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        ce = F.cross_entropy(functional_call(model, {**params, **fixed}, (x,)), y, reduction="none")
        return (ce * w).sum() / w.sum()

    step = vmap(grad_and_value(weighted_loss))
    flat = flat.clone()
    n = flat.shape[0]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    buffer = torch.zeros_like(flat) if momentum else None
    started = torch.zeros(n, dtype=torch.bool)
    history: list[list[float]] = [[] for _ in range(n)]
    for epoch in range(1, epochs + 1):
        orders = []
        for k in range(n):
            rows = keeps[k].nonzero().squeeze(1)
            orders.append(rows[torch.randperm(len(rows), generator=generators[k])])
        steps = [-(-len(o) // batch_size) for o in orders]
        totals = torch.zeros(n)
        for t in range(max(steps, default=0)):
            active = torch.tensor([k for k in range(n) if t < steps[k]])
            idx = torch.zeros(len(active), batch_size, dtype=torch.long)
            weights = torch.zeros(len(active), batch_size)
            for a, k in enumerate(active.tolist()):
                part = orders[k][t * batch_size:(t + 1) * batch_size]
                idx[a, :len(part)], weights[a, :len(part)] = part, 1.0
            xb = torch.stack([xs[k][idx[a]] for a, k in enumerate(active.tolist())])
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
            yb = torch.stack([ys[k][idx[a]] for a, k in enumerate(active.tolist())])
            points = flat[active]
            grads, losses = step(split_flat(points, layout), xb, yb, weights)
            g = torch.cat([grads[name].reshape(len(active), -1) for name, _ in layout], dim=1)
            if weight_decay:
                g = g + weight_decay * points
            if buffer is not None:
                first = ~started[active]
                buf = torch.where(first[:, None], g, momentum * buffer[active] + g)
                buffer[active] = buf
                started[active] = True
                g = g + momentum * buf if nesterov else buf
            flat[active] = points - lr * g
            totals[active] += losses.detach() * weights.sum(1)
        for k in range(n):
            history[k].append(float(totals[k]) / max(len(orders[k]), 1))
        if epoch_end is not None:
            epoch_end(epoch, flat)
    return flat, history
