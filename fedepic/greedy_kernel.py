"""Compiled (numba) lazy greedy over a stored code matrix: the CPU fast path of fedepic.epic.

:func:`fedepic.epic.select_medoids` uses it when numba is installed, the input is on
the CPU and a class's int32 code matrix is stored; the torch path is the fallback
and gives the same medoids (both are the exact greedy on the same integer codes).
Importing this module imports numba; fedepic.epic imports it lazily.

Why by hand: the torch lazy greedy is bound by Python and by one memory pass per
tensor operation (gather, minimum, sum: about 7 us per 5000-row gain), and no
library offers an exact facility-location greedy with these integer codes and tie
rules (apricot, for one, works on float similarities, where sums depend on order).
One fused pass per gain reads each code once, and ``nogil`` lets the caller build
the next class's matrix meanwhile.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _gain(row: np.ndarray, best: np.ndarray) -> int:
    """sum_i max(best_i - code(j, i), 0), exact in int64."""
    total = 0
    for i in range(row.shape[0]):
        diff = np.int64(best[i]) - row[i]
        if diff > 0:
            total += diff
    return total


@njit(cache=True, nogil=True)
def _add(row: np.ndarray, j: int, best: np.ndarray, assign: np.ndarray) -> None:
    """Add medoid j: rows strictly closer to it than to their medoid join it."""
    for i in range(row.shape[0]):
        if row[i] < best[i]:
            best[i] = row[i]
            assign[i] = j


@njit(cache=True, nogil=True)
def lazy_greedy(codes: np.ndarray, sums: np.ndarray, k: int, sentinel: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact greedy facility-location medoids of one class (Minoux's lazy evaluation).

    codes: int32 [n, n], row j = candidate j against every row (symmetric, zero
    diagonal); sums: int64 row sums; k: medoids to pick (1 <= k <= n); sentinel:
    the initial distance of every row to the empty medoid set (> every code).
    Returns (chosen [k] in greedy order, assign [n]: the medoid each row joined, ties
    to the earlier medoid).  Ties between candidates go to the lowest index: the
    first medoid minimises the row sum (every gain is n * sentinel - sum), and the
    heap orders (-gain, j); a fresh top beats every stale bound, gains only shrink.
    """
    n = codes.shape[0]
    best = np.full(n, sentinel, dtype=np.int32)
    assign = np.full(n, -1, dtype=np.int64)
    chosen = np.empty(k, dtype=np.int64)
    first = 0
    for j in range(1, n):
        if sums[j] < sums[first]:
            first = j
    _add(codes[first], first, best, assign)
    chosen[0] = first
    heap = [(np.int64(0), np.int64(0)) for _ in range(0)]  # typed empty list of (-gain, j)
    for j in range(n):
        if j != first:
            heap.append((-np.int64(_gain(codes[j], best)), np.int64(j)))
    heapq.heapify(heap)
    stamp = np.ones(n, dtype=np.int64)  # the step each bound was computed for
    for step in range(1, k):
        while stamp[heap[0][1]] != step:
            _, j = heapq.heappop(heap)
            stamp[j] = step
            heapq.heappush(heap, (-np.int64(_gain(codes[j], best)), j))
        _, j = heapq.heappop(heap)
        _add(codes[j], j, best, assign)
        chosen[step] = j
    return chosen, assign
