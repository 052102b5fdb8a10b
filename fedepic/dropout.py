"""Dropout with explicit masks, drawn from a seeded ``torch.Generator`` that the caller owns.

torch's ``nn.Dropout`` draws its mask from the global RNG, and under ``torch.func.vmap`` it needs
``randomness="different"`` and still draws from the global RNG: the numbers would depend on the order
of calls, not on a run's seed. :class:`MaskedDropout` draws nothing. In training mode it multiplies
its input by the mask held in its (non-persistent) buffer ``mask``, which the caller sets for one
forward pass: ``torch.func.functional_call(model, {**params, **masks}, ...)`` with the masks of
:func:`draw_masks` ({``<layer>.mask``: [B, *mask_shape]}), which under vmap may carry the node
dimension too (:func:`seeded_masks`: [n, B, *mask_shape], node k's from its own seed). In
evaluation mode it is the identity. In training mode without a mask it raises: a training path that
forgot the masks must not silently train without dropout.

A mask is Bernoulli(1 - p) scaled by 1 / (1 - p), as ``torch.nn.functional.dropout`` scales it
(Srivastava et al., "Dropout: a simple way to prevent neural networks from overfitting", JMLR 15,
2014, with the rescaling at training time rather than at test time). ``mask_shape`` is per example:
(C, 1, 1) zeroes whole channels of a [B, C, H, W] input (``nn.Dropout2d``); the full feature shape
zeroes single entries (``nn.Dropout``). Cost: B * prod(mask_shape) draws and one multiplication per
layer and forward pass. The mask is not part of the state dict: models exchange the same entries
with or without dropout.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fedepic.seeds import dropout_seed


class MaskedDropout(nn.Module):
    """Dropout of rate ``p`` whose mask [B, *mask_shape] is given (module docstring)."""

    mask: Optional[Tensor]

    def __init__(self, p: float, mask_shape: Sequence[int]) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = float(p)
        self.mask_shape = tuple(int(s) for s in mask_shape)
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.mask is None:
            raise RuntimeError("MaskedDropout in training mode needs its mask: train through fedepic.train.fit or "
                               "fedepic.stacked (fedepic.dropout.draw_masks), or call model.eval()")
        return x * self.mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, mask_shape={self.mask_shape}"


def dropout_layers(model: nn.Module) -> list[tuple[str, MaskedDropout]]:
    """(name, layer) of every :class:`MaskedDropout` of ``model``, in forward-definition order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedDropout)]


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`MaskedDropout` (a walk over its modules)."""
    return any(isinstance(m, MaskedDropout) for m in model.modules())


def draw_masks(model: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """{``<layer>.mask``: [batch, *mask_shape]} for every dropout layer of ``model``, drawn from
    ``generator`` (on its device) layer after layer; {} for a model without dropout (nothing drawn)."""
    masks = {}
    for name, layer in dropout_layers(model):
        keep = 1.0 - layer.p
        mask = torch.empty((batch, *layer.mask_shape), device=generator.device)
        masks[f"{name}.mask"] = mask.bernoulli_(keep, generator=generator).div_(keep)
    return masks


def seeded_masks(model: nn.Module, batch: int, seeds: Sequence[int],
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """{``<layer>.mask``: [n, batch, *mask_shape]}: row k is :func:`draw_masks` from a generator seeded
    with ``seeds[k]``, so a node's masks do not depend on which other nodes share the call."""
    per_row = [draw_masks(model, batch, torch.Generator(device=device).manual_seed(int(s))) for s in seeds]
    return {name: torch.stack([row[name] for row in per_row]) for name in (per_row[0] if per_row else {})}


def mask_seed(seed: int, round_: int, node: int, draw: int = 0) -> int:
    """The dropout seed of node (or client) ``node``'s minibatch number ``draw`` in ``round_`` of a run
    seeded ``seed`` (``fedepic.seeds.dropout_seed``)."""
    return dropout_seed(seed, round_, node, draw)
