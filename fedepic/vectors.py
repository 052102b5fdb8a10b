"""Flatten model state dicts to one vector and back: the currency of aggregation rules and model attacks."""

from __future__ import annotations

from typing import Mapping

import torch


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point entries (weights, biases, BN statistics); integer counters are skipped."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_state(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    keys = float_keys(state)
    return torch.cat([state[k].detach().reshape(-1).float().cpu() for k in keys]) if keys else torch.zeros(0)


def unflatten_like(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict shaped like `like` whose float entries come from `vector`; other entries are copied."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, ref in like.items():
        if torch.is_floating_point(ref):
            n = ref.numel()
            out[key] = vector[offset:offset + n].view_as(ref).to(ref.dtype).clone()
            offset += n
        else:
            out[key] = ref.clone()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the state dict needs {offset}")
    return out
