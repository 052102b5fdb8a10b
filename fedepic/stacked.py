"""Many copies of one model at once: per-copy minibatch gradients over stacked flat parameter vectors.

Decentralized gradient tracking takes one minibatch step per node per round, so a round is many tiny
gradients; one ``torch.func.vmap`` over ``torch.func.functional_call`` computes all of them in one
call instead of one Python-level backward pass per node (torch.func is PyTorch's own batching of
functional transforms; nothing here reimplements autograd). A single node is the case n = 1, so the
in-process engine and a Ray node run the same function.

The flat layout is ``fedepic.vectors.flatten_state`` of the exchanged state (the model's state dict
without the fixed ``mean``/``std`` normalisation buffers): models whose exchanged entries are all
parameters (mlp, cnn) are supported; models with running statistics (BatchNorm: resnet18) are not.

Dropout (``fedepic.dropout``): the gradient functions take one dropout seed per row (``mask_seeds``)
and pass each row its own masks, drawn from a generator with that seed, into the forward pass, in
training mode; a model without dropout draws nothing and ignores the seeds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedepic.dropout import has_dropout, seeded_masks
from fedepic.grouped_gradients import grouped_gradients
from fedepic.models import FIXED_BUFFERS
from fedepic.train import float_images


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


def row_masks(model: nn.Module, batch: int, mask_seeds: Optional[Sequence[int]], rows: int,
              device: torch.device) -> Optional[dict[str, Tensor]]:
    """Each of ``rows`` rows' dropout masks ({name: [rows, batch, ...]}, ``fedepic.dropout.seeded_masks``
    from ``mask_seeds``), or None for a model without dropout. A model with dropout needs one seed per row."""
    if not has_dropout(model):
        return None
    if mask_seeds is None or len(mask_seeds) != rows:
        raise ValueError(f"a model with dropout needs one dropout seed per row ({rows}), got "
                         f"{None if mask_seeds is None else len(mask_seeds)}")
    return seeded_masks(model, batch, mask_seeds, device)


@contextmanager
def training_mode(model: nn.Module, on: bool) -> Iterator[None]:
    """``model`` in training mode inside when ``on`` (its mode restored after); untouched otherwise."""
    was_training = model.training
    if on:
        model.train()
    try:
        yield
    finally:
        if on:
            model.train(was_training)


def stacked_gradients(model: nn.Module, flat: Tensor, xb: Tensor, yb: Tensor, weight_decay: float = 0.0,
                      mask_seeds: Optional[Sequence[int]] = None) -> Tensor:
    """Gradient [n, D] of ``cross_entropy(model_k(xb[k]), yb[k]) + weight_decay / 2 ||theta_k||^2`` for
    every row k of ``flat`` [n, D] (parameters), with minibatches ``xb`` [n, B, ...] and ``yb`` [n, B].

    ``flat`` may also be one point [D] shared by all n minibatches (the server-based per-step round,
    where every client is at the global model): the parameters are then not batched, which keeps
    convolutions ungrouped (n ordinary convolutions instead of one grouped one: faster,
    docs/results/engines.md). Models of Linear and Conv2d layers only (mlp, cnn, cnn_mnist, mnist_net) then take
    one batched pass instead
    (``fedepic.grouped_gradients``). ``xb`` may be uint8 (``float_images`` converts it).

    A model with dropout needs ``mask_seeds``, one per row k (its masks: ``fedepic.dropout.seeded_masks``),
    and is run in training mode; the same seeds give the same gradients whichever rows share the call."""
    layout = parameter_layout(model)
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}
    shared = flat.dim() == 1
    xb = float_images(xb)
    masks = row_masks(model, xb.shape[1], mask_seeds, xb.shape[0], xb.device)
    with training_mode(model, masks is not None):
        out = grouped_gradients(model, flat, xb, yb, masks) if shared else None
        if out is not None:
            return out + weight_decay * flat if weight_decay else out

        def loss(params: dict[str, Tensor], x: Tensor, y: Tensor, m: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(model, {**params, **fixed, **m}, (x,)), y)

        points = flat[None] if shared else flat
        params = {k: v[0] for k, v in split_flat(points, layout).items()} if shared else split_flat(points, layout)
        grads = vmap(grad(loss), in_dims=(None if shared else 0, 0, 0, 0))(params, xb, yb, masks or {})
    out = torch.cat([grads[name].reshape(xb.shape[0], -1) for name, _ in layout], dim=1)
    return out + weight_decay * flat if weight_decay else out


def weighted_gradients(model: nn.Module, params: dict[str, Tensor], xb: Tensor, yb: Tensor,
                       weights: Tensor, masks: Optional[dict[str, Tensor]] = None) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients {name: [n, *shape]} and values [n] of
    ``sum_b weights[k, b] * cross_entropy(model_k(xb[k, b]), yb[k, b])`` for the n models whose
    parameters are ``params`` {name: [n, *shape]} (``parameter_layout``'s names), one ``torch.func``
    vmap over the models.

    With ``weights[k, b] = 1 / B_k`` on a node's B_k real rows and 0 on padding, row k is the gradient
    and the loss of the mean cross-entropy of its own minibatch: minibatches of different sizes (the
    last, short batch of an epoch) share one call. Gradients stay per layer: concatenating them into
    flat [n, D] rows every step cost more than the gradients themselves (MLP, 20 nodes, here).

    A model with dropout needs ``masks`` ({name: [n, B, ...]}, the caller's: ``fedepic.stacked_fit``
    draws them from each node's generator) and is run in training mode."""
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}
    dropout = has_dropout(model)
    if dropout and masks is None:
        raise ValueError("a model with dropout needs its dropout masks (fedepic.dropout.draw_masks)")

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor, m: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, {**p, **fixed, **m}, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum()

    with training_mode(model, dropout):
        return vmap(grad_and_value(loss))(params, xb, yb, weights, masks if dropout else {})


def gradients_in_state_layout(model: nn.Module, like: dict[str, Tensor], points: Tensor, xb: Tensor,
                              yb: Tensor, weight_decay: float = 0.0,
                              mask_seeds: Optional[Sequence[int]] = None) -> Tensor:
    """:func:`stacked_gradients` with ``points`` ([n, D] or one shared [D]) and the result [n, D] in the layout of
    ``fedepic.vectors.flatten_state(like)``, where ``like`` is a full state dict (the fixed
    normalisation buffers included, at which the gradient is 0): the server-based mode exchanges full
    state dicts. ``mask_seeds``: as :func:`stacked_gradients`'s."""
    params = dict(model.named_parameters())
    keys = [k for k, v in like.items() if torch.is_floating_point(v)]
    sizes = [like[k].numel() for k in keys]
    is_param = [k in params for k in keys]
    for k, param in zip(keys, is_param):
        if not param and k not in FIXED_BUFFERS:
            raise ValueError(f"stacked gradients need a model without running buffers; {k!r} is one")
    pieces = points.split(sizes, dim=-1)
    grads = stacked_gradients(model, torch.cat([p for p, keep in zip(pieces, is_param) if keep], dim=-1), xb, yb,
                              weight_decay, mask_seeds).split([s for s, keep in zip(sizes, is_param) if keep], dim=1)
    it = iter(grads)
    n = xb.shape[0]
    return torch.cat([next(it) if keep else p.new_zeros(n, p.shape[-1]) for p, keep in zip(pieces, is_param)], dim=1)



@torch.no_grad()
def stacked_logits(model: nn.Module, flat: Tensor, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits [n, B, C] of every row of ``flat`` [n, D] (parameters) on the same images ``x`` [B, ...]
    (uint8, or float in [0, 1]), in eval mode: one vmap over the models, the images unbatched, so a
    linear layer is one matrix product per model. Images go through ``batch_size`` at a time."""
    layout = parameter_layout(model)
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}
    params = split_flat(flat, layout)
    was_training = model.training
    model.eval()

    def forward(p: dict[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(model, {**p, **fixed}, (images,))

    outs = []
    try:
        for start in range(0, len(x), batch_size):
            images = x[start:start + batch_size]
            images = float_images(images)
            outs.append(vmap(forward, in_dims=(0, None))(params, images).float())
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=1) if outs else flat.new_zeros(flat.shape[0], 0, 0)


@torch.no_grad()
def activation_size(model: nn.Module, image: Tensor) -> int:
    """Entries of all module outputs for one image (``image`` [1, ...]): what one model holds in
    flight per image in a forward pass, used to size the chunks of :func:`stacked_logits`."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        model(image.float())
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
