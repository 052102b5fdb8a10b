"""Flatten model state dicts to one vector and back (the currency of aggregation rules and model attacks),
and the finiteness test every rule and attack applies to such vectors."""

from __future__ import annotations

from typing import Mapping

import torch


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point entries (weights, biases, BN statistics); integer counters are skipped."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def parameter_mask(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Which entries of ``flatten_state(state)`` (a state of ``model``) are ``model``'s parameters (the
    others are buffers: normalisation constants, BatchNorm statistics), as a bool vector. Model attacks
    act on the parameters only: a buffer travels with the model and is never attacked as if it were one."""
    parameters = {name for name, _ in model.named_parameters()}
    keys = float_keys(state)
    return torch.cat([torch.full((state[k].numel(),), k in parameters, dtype=torch.bool) for k in keys]) \
        if keys else torch.zeros(0, dtype=torch.bool)


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


def finite_rows(stack: torch.Tensor) -> torch.Tensor:
    """Bool tensor [n]: True for the rows of ``stack`` [n, D] whose entries are all finite."""
    # A row's sum is finite only if every entry is (inf and NaN propagate), so the elementwise test
    # runs only on rows whose sum is not finite: 5x cheaper on the usual all-finite stack, and exact.
    ok = torch.isfinite(stack.sum(dim=-1))
    if not bool(ok.all()):
        suspect = (~ok).nonzero().flatten()
        ok[suspect] = torch.isfinite(stack[suspect]).all(dim=-1)
    return ok


def all_finite(vector: torch.Tensor) -> bool:
    """True when every entry of ``vector`` is finite (the same test as ``finite_rows``)."""
    return bool(finite_rows(vector.reshape(1, -1))[0])


def selector(mask: torch.Tensor) -> "slice | torch.Tensor":
    """What indexes the entries a bool ``mask`` over the last dimension selects: a slice when they are
    one contiguous run (a model's parameters usually are: its few buffers come first or last), so that
    ``x[..., selector(mask)]`` is a view, else ``mask`` itself. Boolean indexing copies through a
    masked gather, several times slower than a view on a [n, 431k] stack."""
    hits = mask.nonzero().flatten()
    if hits.numel() == 0:
        return slice(0, 0)
    first, last = int(hits[0]), int(hits[-1])
    return slice(first, last + 1) if last - first + 1 == hits.numel() else mask


def row_shares(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a bool ``mask`` [n, D], the share of True entries, float64 [n]. Counted on the bytes
    (``uint8`` summed into int32: exact below 2**31 columns), O(n D) bytes read instead of 8 n D for
    float64 bools (docs/results/engines.md)."""
    d = mask.shape[-1]
    counts = mask.contiguous().view(torch.uint8).sum(dim=-1, dtype=torch.int32)
    return counts.to(torch.float64) / max(d, 1)
