"""Exact lazy greedy for several classes at once, as whole-tensor steps: the GPU path of fedepic.epic.

On a GPU the per-candidate lazy greedy (a Python heap, one small kernel and one host sync per
re-evaluation) is bound by launch latency, not by the device. Here every step of the greedy is a few
tensor operations over all classes of a batch, with one host sync per step:

1. each class evaluates exactly its ``batch`` candidates with the largest upper bounds (stale gains:
   gains only shrink as medoids are added, so an old gain bounds the current one);
2. if the best evaluated gain is strictly larger than every bound left out, it is the class's exact
   maximum (ties among the evaluated go to the lowest index); otherwise the class evaluates every
   candidate in this step (rare), which also refreshes all its bounds;
3. each class adds its winner.

So every step picks the exact greedy choice, ties to the lowest index, as the heap-based paths do.
Classes are padded to the largest class: padded rows have distance 0 to the medoid set (they add
nothing to any gain) and padded candidates are never chosen.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_lazy_greedy", "lowest_argmax"]

_DENSE_BLOCK = 1 << 24  # int32 elements per block of a class's dense evaluation (64 MiB)


def lowest_argmax(values: Tensor, dim: int = -1) -> Tensor:
    """Index of the maximum along ``dim``, the lowest index among equal maxima.

    Written out rather than left to ``Tensor.argmax``, so that the tie rule is this code's and
    not a property of a torch release or device kernel.
    """
    top = values.amax(dim, keepdim=True)
    index = torch.arange(values.shape[dim], device=values.device)
    index = index.view([-1 if d == dim % values.dim() else 1 for d in range(values.dim())])
    return torch.where(values == top, index, values.shape[dim]).amin(dim)


def _dense_gains(codes: Tensor, best: Tensor, total: Tensor) -> Tensor:
    """Exact gains of every candidate of one class: total - sum_i min(best_i, code(j, i))."""
    n = codes.shape[0]
    step = max(1, _DENSE_BLOCK // n)
    parts = [total - torch.minimum(codes[s : s + step], best).sum(1, dtype=torch.int64) for s in range(0, n, step)]
    return torch.cat(parts)


def batched_lazy_greedy(
    codes: Tensor, sums: Tensor, sizes: list[int], budgets: list[int], sentinel: int, batch: int = 128
) -> list[tuple[Tensor, Tensor]]:
    """Greedy facility-location medoids of C classes at once (see the module docstring).

    codes: int32 [C, N, N]; class c's codes fill ``codes[c, :n_c, :n_c]`` (row j = candidate j,
    symmetric, zero diagonal), the rest is 0. sums: int64 [C, N] row sums (0 beyond n_c).
    sizes, budgets: n_c and k_c (1 <= k_c <= n_c). sentinel: the distance of every row to the
    empty medoid set (larger than every code). batch: candidates evaluated per class and step.
    Returns per class (chosen [k_c] in greedy order, assign [n_c]: the medoid each row joined, ties
    to the earlier medoid), on the CPU.
    """
    classes, n = codes.shape[0], codes.shape[1]
    dev = codes.device
    rows_of = torch.arange(classes, device=dev)
    valid = torch.arange(n, device=dev)[None, :] < torch.tensor(sizes, device=dev)[:, None]
    budget = torch.tensor(budgets, device=dev)
    best = torch.where(valid, sentinel, 0).to(torch.int32)
    total = best.sum(1, dtype=torch.int64)
    blocked = ~valid  # candidates that may not be chosen: padding, then the medoids
    assign = torch.full((classes, n), -1, dtype=torch.int64, device=dev)
    chosen = torch.full((classes, max(budgets)), -1, dtype=torch.int64, device=dev)
    bound = torch.full((classes, n), -1, dtype=torch.int64, device=dev)
    lazy = batch + 1 <= n
    for step in range(max(budgets)):
        active = step < budget
        if step < 2 or not lazy:  # the first gains carry the sentinel: no useful bounds yet
            if step == 0:
                bound = (total[:, None] - sums).masked_fill_(blocked, -1)
            else:
                for c in range(classes):
                    bound[c] = _dense_gains(codes[c], best[c], total[c]).masked_fill_(blocked[c], -1)
            winner = lowest_argmax(bound, 1)
        else:
            winner = _lazy_step(codes, best, total, blocked, bound, rows_of, batch, active)
        winner = torch.where(active, winner, 0)
        row = codes[rows_of, winner]
        joins = active[:, None] & (row < best)  # strict: ties stay with the earlier medoid
        assign = torch.where(joins, winner[:, None], assign)
        best = torch.where(joins, row, best)
        total = best.sum(1, dtype=torch.int64)
        picked = torch.zeros_like(blocked).scatter_(1, winner[:, None], active[:, None])
        blocked |= picked
        bound.masked_fill_(picked, -1)
        chosen[:, step] = torch.where(active, winner, -1)
    chosen_cpu, assign_cpu = chosen.cpu(), assign.cpu()
    return [(chosen_cpu[c, :k].clone(), assign_cpu[c, :m].clone()) for c, (k, m) in enumerate(zip(budgets, sizes))]


def _lazy_step(
    codes: Tensor, best: Tensor, total: Tensor, blocked: Tensor, bound: Tensor, rows_of: Tensor, batch: int,
    active: Tensor,
) -> Tensor:
    """Each class's exact best candidate (lowest index on ties); refreshes ``bound`` in place."""
    # topk may order equal bounds either way; the result does not depend on it: the winner is
    # decided among the evaluated only when its gain beats every bound left out.
    values, order = bound.topk(batch + 1, dim=1)  # descending
    candidates, left_out = order[:, :batch], values[:, batch]
    rows = codes[rows_of[:, None], candidates]  # [C, batch, N]
    gains = total[:, None] - torch.minimum(rows, best[:, None, :]).sum(2, dtype=torch.int64)
    gains.masked_fill_(blocked.gather(1, candidates), -1)
    bound.scatter_(1, candidates, gains)
    top = gains.max(1).values
    winner = torch.where(gains == top[:, None], candidates, codes.shape[1]).min(1).values
    undecided = active & (top <= left_out)  # a bound left out could hide an equal or larger gain
    if bool(undecided.any()):
        for c in undecided.nonzero().flatten().tolist():
            bound[c] = _dense_gains(codes[c], best[c], total[c]).masked_fill_(blocked[c], -1)
            winner[c] = lowest_argmax(bound[c])
    return winner
