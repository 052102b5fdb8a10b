"""EPIC: drop isolated training points by greedy medoid selection on gradient proxies.

Implements Algorithm 1 of Yu Yang, Tian Yu Liu and Baharan Mirzasoleiman, "Not All Poisons are
Created Equal: Robust Training against Data Poisoning" (ICML 2022).  Within every class the
selector greedily picks medoids that maximise the facility-location function (Eq. 5)

    F(S) = sum_i max_{j in S} (c0 - ||x_i - x_j||),   F(empty) = 0,

assigns each row to its nearest medoid, and drops the medoids whose cluster holds at
most ``threshold`` rows: effective poisons sit far from the clean points of their
class in gradient space, so they end up alone.

The same selector serves three callers: centralized training, a
federated client's local rows, and received model updates (one group).

Exactness.  The constant c0 (the largest in-class distance) adds n*c0 to every
non-empty F, so it never changes a greedy choice: the selector minimises
sum_i min_{j in S} d(i, j).  "The exact greedy result" must not depend on the
backend, the device, the batch shapes or the torch release, yet float sums depend
on their order, and BLAS kernels pick the order by shape, CPU and version.  So
every sum the selector takes is a sum of integers, exact in any order:

1. Fixed point.  Each group's features are centred (plain features only) on the
   coordinate-wise midrange c = max/2 + min/2 and rounded to integers,
   q = round((x - c) * 2**e).  e is the largest power of two that keeps every
   ||q_i|| <= 2**25 (2**26 for each factor of a last-layer proxy), found from exact
   quantities only (the largest |x - c|, then the exact integer norms).  Then every
   partial sum of the products below is an integer below 2**53: float64 holds it
   exactly, whatever order BLAS, a GPU or a later torch adds in.  The rounding is
   2**-25 of the largest row norm per coordinate, below the code resolution (3).
2. Squared distances.  Plain: ||q_i - q_j||^2 from one product, exact.  Proxies:
   A_i + A_j - 2 <g_i, g_j> <h_i, h_j> with exact inner products and fixed-order,
   correctly rounded float64 multiplications and additions (IEEE 754), so the same
   value on any machine.  Only element-wise operations follow the sums.
3. Codes.  code(i, j) = floor(sqrt(scale^2 * squared distance)), code(i, i) = 0,
   with scale^2 the power of two for which L/2 < scale * bound <= L, L = 2**23,
   bound = 2 * max_i ||q_i|| (>= the group's diameter), taken from the exponent of
   the largest squared norm (math.frexp, exact).

Gains are sums of integer codes, exact in any order, so the lazy path, the
compiled and batched backends, rows recomputed on demand, a naive greedy and a
pure-Python reference agree exactly, ties included.  Every tie-break is written
out: a candidate tie goes to the lowest row index, and a row at equal code
distance from two medoids stays with the medoid chosen first (strict '<').  The
resolution, about 2**-23 of the diameter, is float32 precision; codes fit int32,
and sums of 128 codes fit int32 too, which keeps the gain reductions fast.
:func:`distance_codes` exposes the code matrix.

Speed.  Lazy greedy (Minoux 1978): a heap of stale upper bounds (gains only shrink
as medoids are added, by submodularity), re-evaluated in small vectorised batches;
on a 5000-row class with 500 medoids it evaluates about 5 full passes' worth of
candidates instead of the naive 500.  On the CPU, when numba is installed, a
compiled kernel (:mod:`fedepic.greedy_kernel`) runs the same greedy with one fused
pass per gain, and overlaps each class's greedy with the next class's build.  On
a GPU, :mod:`fedepic.batched_greedy` runs all classes' greedy steps together as
whole-tensor operations (one host sync per step).  A class's int32 code matrix is stored when it
fits in ``max_matrix_bytes`` (default 2 GiB, about 23k rows); larger classes
recompute rows on demand in ``chunk_rows`` blocks, with the same codes (the sums
are exact).  The last-layer proxy costs n_c^2 * D flops per class to build.
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fedepic.batched_greedy import batched_lazy_greedy, lowest_argmax
from fedepic.metrics import poison_stats
from fedepic.train import float_images

__all__ = [
    "LastLayerProxy",
    "MedoidSelection",
    "EpicSchedule",
    "EpicState",
    "pairwise_distances",
    "distance_codes",
    "select_medoids",
    "gradient_proxy",
    "class_budget",
]

CODE_LEVELS = 2**23  # L: codes lie in [0, L]; int32 storage
_SUM_CHUNK = 128  # 128 * (L + 1) < 2**31: exact int32 partial sums (much faster than int64)
_BLOCK_ELEMS = 1 << 21  # float64 elements per converted column block of wide features (16 MiB)
_AUGMENTED_BYTES = 1 << 28  # float64 copies of a class's features (or its Gram matrix) up to 256 MiB
_CACHE_ELEMS = 1 << 18  # float64 work block (2 MiB) so the elementwise passes stay in cache
_KIND_METHODS = ("exact", "stochastic")


# --------------------------------------------------------------------------- proxies


@dataclass(frozen=True)
class LastLayerProxy:
    """Implicit last-layer gradients (p - y) h^T of n rows, never materialised.

    ``g`` is softmax - onehot, [n, C]; ``h`` the penultimate activations, [n, D].
    Row i stands for the C*D matrix g_i h_i^T, the gradient of the cross-entropy
    loss w.r.t. the classifier weight (the bias gradient g_i is not included).
    """

    g: Tensor
    h: Tensor

    def __post_init__(self) -> None:
        if self.g.dim() != 2 or self.h.dim() != 2 or len(self.g) != len(self.h):
            raise ValueError(
                f"LastLayerProxy needs g [n,C] and h [n,D] with equal n, got "
                f"{tuple(self.g.shape)} and {tuple(self.h.shape)}"
            )

    def __len__(self) -> int:
        return len(self.g)

    def __getitem__(self, idx: Any) -> "LastLayerProxy":
        return LastLayerProxy(self.g[idx], self.h[idx])

    @property
    def device(self) -> torch.device:
        return self.g.device

    def to(self, device: torch.device | str) -> "LastLayerProxy":
        return LastLayerProxy(self.g.to(device), self.h.to(device))

    def materialize(self) -> Tensor:
        """Explicit [n, C*D] gradient vectors (small inputs / tests only)."""
        return (self.g[:, :, None] * self.h[:, None, :]).flatten(1)


Features = Tensor | LastLayerProxy


def _col_blocks(*xs: Tensor) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """(first column, float64 copies of that column block of each x), in reused buffers.

    Keeps float64 work bounded for very wide inputs (flattened model updates), and
    reusing the buffers avoids the page faults of a fresh allocation per block.
    """
    rows, dim = sum(len(x) for x in xs), xs[0].shape[1]
    width = max(1, min(dim, _BLOCK_ELEMS // max(rows, 1)))
    bufs = [torch.empty(len(x) * width, dtype=torch.float64, device=x.device) for x in xs]
    for s in range(0, dim, width):
        w = min(width, dim - s)
        yield s, tuple(buf[: len(x) * w].view(len(x), w).copy_(x[:, s : s + w]) for buf, x in zip(bufs, xs))


def _proxy_sq_dists(a: LastLayerProxy, b: LastLayerProxy) -> Tensor:
    """||g_i h_i^T - g_j h_j^T||_F^2 = (|g_i|^2|h_i|^2 + |g_j|^2|h_j|^2) - 2<g_i,g_j><h_i,h_j>.

    The norms' sum is taken first (commutative), so the result is symmetric; with
    integer-valued inputs (the selector's fixed point) every sum here is exact and the
    rest are single IEEE operations in a fixed order.
    """
    ga, ha, gb, hb = (t.double() for t in (a.g, a.h, b.g, b.h))
    na = ga.square().sum(1) * ha.square().sum(1)
    nb = gb.square().sum(1) * hb.square().sum(1)
    cross = (ga @ gb.T).mul_(ha @ hb.T)
    return (na[:, None] + nb[None, :]).sub_(cross.mul_(2))


def pairwise_distances(a: Features, b: Features) -> Tensor:
    """Euclidean distances ||a_i - b_j|| as a float64 [len(a), len(b)] tensor.

    Accepts two plain [n, d] tensors (any float dtype; wide d is processed in
    float64 blocks, so flattened model updates are fine) or two
    :class:`LastLayerProxy` (Frobenius distance of the implicit gradient matrices).
    Uses the ||a||^2 + ||b||^2 - 2ab expansion, clamped at 0.
    """
    if isinstance(a, LastLayerProxy) != isinstance(b, LastLayerProxy):
        raise ValueError("pairwise_distances needs two tensors or two LastLayerProxy")
    if isinstance(a, LastLayerProxy):
        sq = _proxy_sq_dists(a, b)
    else:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"pairwise_distances needs [n,d] and [m,d], got {tuple(a.shape)}, {tuple(b.shape)}")
        sq = torch.zeros(len(a), len(b), dtype=torch.float64, device=a.device)
        na = torch.zeros(len(a), dtype=torch.float64, device=a.device)
        nb = torch.zeros(len(b), dtype=torch.float64, device=a.device)
        for _, (ab, bb) in _col_blocks(a, b):
            sq.addmm_(ab, bb.T, alpha=-2)
            na += ab.square().sum(1)
            nb += bb.square().sum(1)
        sq.add_(na[:, None]).add_(nb[None, :])
    return sq.clamp_(min=0).sqrt_()


# ----------------------------------------------------------------- code matrix of a group


def _is_heavy(x: Features) -> bool:
    """Whether squared distances need products over many columns (not the augmented form)."""
    return isinstance(x, LastLayerProxy) or len(x) * (x.shape[1] + 2) * 16 > _AUGMENTED_BYTES


_PLAIN_NORM_BITS = 25  # ||q_i|| <= 2**25: |2 q_i.q_j| + |q_i|^2 + |q_j|^2 <= 2**52 for any partial sum
_PROXY_NORM_BITS = 26  # ||q_i|| <= 2**26 per proxy factor: its inner products stay below 2**53


@dataclass(frozen=True)
class _FixedPoint:
    """q = round((x - center) * scale), scale a power of two (module docstring, step 1).

    Every operation is element-wise and correctly rounded, so q depends only on x.
    """

    center: Tensor | None  # float64 [d]; None: not centred (proxy factors)
    exponent: int  # scale = 2**exponent

    def __call__(self, block: Tensor, start: int = 0, *, inplace: bool = False) -> Tensor:
        """Integer-valued float64 q of a column block that starts at column ``start``;
        ``inplace`` reuses a float64 ``block`` (a work buffer)."""
        q = block if inplace and block.dtype == torch.float64 else block.to(torch.float64, copy=True)
        if self.center is not None:
            q.sub_(self.center[start : start + q.shape[1]])
        # In steps of at most 2**1000 (2**exponent itself may not be a float64 for tiny inputs); each
        # step multiplies by a power of two, exactly.
        left = self.exponent
        while left > 1000:
            q.mul_(2.0**1000)
            left -= 1000
        return q.mul_(2.0**left).round_()


def _fit_fixed_point(x: Tensor, bits: int, centre: bool) -> _FixedPoint:
    """The largest power-of-two scale with every ||round((x_i - c) * scale)|| <= 2**bits.

    Uses exact quantities only (extrema, frexp, integer norms), so the scale cannot
    depend on summation order.  First a safe scale from the largest entry
    (||x_i - c|| <= sqrt(d) max|x - c|), then as many doublings as the exact norms
    it gives allow (rounding moves a norm by at most sqrt(d)/2).
    """
    dim = x.shape[1]
    if dim == 0:
        return _FixedPoint(torch.zeros(0, dtype=torch.float64, device=x.device) if centre else None, 0)
    center = None
    if centre:
        extrema = [(blk.amax(0), blk.amin(0)) for _, (blk,) in _col_blocks(x)]  # one pass over x
        hi, lo = (torch.cat(parts) for parts in zip(*extrema))
        center = hi / 2 + lo / 2  # no overflow for finite inputs (any c would do: it only shifts)
        largest = float(torch.maximum(hi - center, center - lo).max())
    else:
        largest = float(x.abs().max())
    if not math.isfinite(largest):
        raise ValueError("features contain NaN or infinite values")
    if largest == 0:
        return _FixedPoint(center, 0)
    half_bits = ((dim - 1).bit_length() + 1) // 2  # sqrt(d) <= 2**half_bits
    first = bits - 1 - half_bits - math.frexp(largest)[1]  # entries < 2**(bits - 1 - half_bits)
    probe = _FixedPoint(center, first)
    norms = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for s, (blk,) in _col_blocks(x):
        norms += probe(blk, s, inplace=True).square_().sum(1)  # exact: integers below 2**(2 bits)
    root, slack = math.isqrt(int(norms.max())) + 1, math.isqrt(dim) + 1
    extra = 0
    while (2 ** (extra + 1)) * (2 * root + slack) + slack <= 2 ** (bits + 1):
        extra += 1
    return _FixedPoint(center, first + extra)


def _fixed_blocks(fixed: _FixedPoint, *xs: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The same column block of each x in fixed point (integer-valued float64), in reused buffers."""
    for s, blocks in _col_blocks(*xs):
        yield tuple(fixed(blk, s, inplace=True) for blk in blocks)


def _code_scale2(max_sq_norm: float) -> float:
    """scale^2 = 2**x, the largest x with 2**x * bound^2 <= L^2, bound^2 = 4 * max_sq_norm.

    x = floor(log2(L^2 / 4) - log2(N)), taken from N's binary exponent (exact, no log).
    """
    if max_sq_norm <= 0:
        return 0.0  # identical points: code 0 everywhere
    mantissa, exp2 = math.frexp(max_sq_norm)  # N = m 2**E, 0.5 <= m < 1
    top = 2 * int(math.log2(CODE_LEVELS)) - 2
    return 2.0 ** min(1000, top - exp2 + (mantissa == 0.5))


class _Group:
    """Integer distance codes of one group (class) of rows; see module docstring.

    Features are first put in fixed point (integer-valued float64), so every sum
    below is exact.  Squared distances come from one of three forms, chosen by
    size: a single product of augmented rows (few columns); a stored Gram matrix
    built in one pass (wide features, few rows: model updates); or, for wide
    features with many rows, a blocked Gram per request.
    """

    def __init__(self, x: Features) -> None:
        self.n, self.device = len(x), x.device
        self._proxy: LastLayerProxy | None = None
        self._left: Tensor | None = None
        self._gram: Tensor | None = None
        if isinstance(x, LastLayerProxy):
            g, h = (_fit_fixed_point(t, _PROXY_NORM_BITS, centre=False)(t) for t in (x.g, x.h))
            self._proxy = LastLayerProxy(g, h)
            self._norms = g.square().sum(1) * h.square().sum(1)
        elif not _is_heavy(x):
            q = _fit_fixed_point(x, _PLAIN_NORM_BITS, centre=True)(x)
            self._norms = q.square().sum(1)
        else:
            self._fixed = _fit_fixed_point(x, _PLAIN_NORM_BITS, centre=True)
            if self.n * self.n * 8 <= _AUGMENTED_BYTES:
                gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
                for (blk,) in _fixed_blocks(self._fixed, x):
                    gram.addmm_(blk, blk.T)
                self._gram = gram
                self._norms = gram.diagonal().clone()
            else:
                self._x = x
                self._norms = torch.zeros(self.n, dtype=torch.float64, device=x.device)
                for (blk,) in _fixed_blocks(self._fixed, x):
                    self._norms += blk.square_().sum(1)
        if not bool(torch.isfinite(self._norms).all()):
            raise ValueError("features contain NaN or infinite values")
        self.scale2 = _code_scale2(float(self._norms.max()))
        # Products with many columns (proxies, wide features) dominate the build and
        # get large blocks; the augmented product works in cache-sized blocks.
        self.heavy = _is_heavy(x)
        if not self.heavy:
            # One product gives scale^2 ||a - b||^2: [-2s a, s|a|^2, s] . [b, 1, |b|^2], s = scale^2.
            ones, norms = torch.ones_like(self._norms)[:, None], self._norms[:, None]
            self._left = torch.cat([q * (-2 * self.scale2), norms * self.scale2, ones * self.scale2], 1)
            self._right_t = torch.cat([q, ones, norms], 1).T.contiguous()

    def _scaled_sq(self, sel: slice | Tensor) -> Tensor:
        """scale^2 * squared distances of rows ``sel`` to all rows (float64)."""
        if self._left is not None:
            return self._left[sel] @ self._right_t
        if self._proxy is not None:
            sq = _proxy_sq_dists(self._proxy[sel], self._proxy)
        elif self._gram is not None:
            sq = (self._norms[sel][:, None] + self._norms[None, :]).sub_(self._gram[sel].mul(2))
        else:
            cross = torch.zeros(len(self._norms[sel]), self.n, dtype=torch.float64, device=self.device)
            for a, b in _fixed_blocks(self._fixed, self._x[sel], self._x):
                cross.addmm_(a, b.T)
            sq = (self._norms[sel][:, None] + self._norms[None, :]).sub_(cross.mul_(2))
        return sq.mul_(self.scale2)

    def codes(self, sel: slice | Tensor, sums: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """int32 codes of rows ``sel`` (a unit-step slice or index tensor) against all rows.

        ``sums``, if given, receives the exact row sums (while the rows are in cache);
        ``out`` is an optional int32 [len(sel), n] destination.
        """
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(self.n)
            ids = torch.arange(start, stop, device=self.device)
        else:
            ids = sel
        if out is None:
            out = torch.empty(len(ids), self.n, dtype=torch.int32, device=self.device)
        if self.device.type != "cpu":
            limit = _CACHE_ELEMS * 64
        else:
            limit = _BLOCK_ELEMS if self.heavy else _CACHE_ELEMS
        step = max(1, limit // self.n)
        for s in range(0, len(ids), step):
            e = min(s + step, len(ids))
            part = slice(start + s, start + e) if isinstance(sel, slice) else ids[s:e]
            sq = self._scaled_sq(part).clamp_(0, float(CODE_LEVELS) ** 2).sqrt_()
            out[s:e] = sq  # the int32 copy truncates: floor for values >= 0
            out[torch.arange(s, e, device=self.device), ids[s:e]] = 0  # d(i, i) = 0 exactly
            if sums is not None:
                sums[s:e] = _row_sums(out[s:e])
        return out


def distance_codes(features: Features) -> Tensor:
    """The int32 [n, n] distance codes the greedy of :func:`select_medoids` uses for one group.

    code(i, j) = floor(||x_i - x_j|| * scale), scale ~ 2**23 / bound (module docstring),
    code(i, i) = 0; row j holds candidate j against every row i.  For references and
    tests: ``select_medoids`` builds the same matrix per class.
    """
    _check_features(features)
    return _Group(features).codes(slice(0, len(features)))


class _Codes:
    """Row access to a group's codes: stored in full, or recomputed in chunks.

    ``workspace`` (flat int32) is reused for the stored matrix when large enough:
    a fresh allocation of the matrix's size pays a page fault per page written.
    """

    def __init__(
        self, group: _Group, chunk_rows: int, max_matrix_bytes: int, workspace: Tensor | None = None
    ) -> None:
        self.group, self.n, self.chunk = group, group.n, chunk_rows
        self.matrix: Tensor | None = None
        self.sums = torch.empty(self.n, dtype=torch.int64, device=group.device)
        self._buf = torch.empty(0, dtype=torch.int32, device=group.device)
        self.workspace = workspace
        if 4 * self.n * self.n <= max_matrix_bytes:
            size = self.n * self.n
            if workspace is None or workspace.numel() < size or workspace.device != group.device:
                self.workspace = torch.empty(size, dtype=torch.int32, device=group.device)
            dest = self.workspace[:size].view(self.n, self.n)
            self.matrix = group.codes(slice(0, self.n), self.sums, out=dest)
        else:
            for s in range(0, self.n, chunk_rows):
                group.codes(slice(s, s + chunk_rows), self.sums[s : s + chunk_rows])

    def rows(self, idx: Tensor) -> Tensor:
        """Writable codes of candidates ``idx`` against all rows, valid until the next call."""
        if self.matrix is None:
            return self.group.codes(idx)
        if len(self._buf) < len(idx) * self.n:  # reused: fresh allocations page-fault
            self._buf = torch.empty(max(len(idx), 256) * self.n, dtype=torch.int32, device=self.matrix.device)
        out = self._buf[: len(idx) * self.n].view(len(idx), self.n)
        return torch.index_select(self.matrix, 0, idx, out=out)

    def row(self, j: int) -> Tensor:
        """Codes of candidate j (a read-only view when stored)."""
        if self.matrix is not None:
            return self.matrix[j]
        return self.group.codes(torch.tensor([j], device=self.group.device))[0]

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """All candidate rows in chunks (views when stored)."""
        step = self.chunk if self.matrix is None else max(1, _CACHE_ELEMS // self.n)
        for s in range(0, self.n, step):
            stop = min(s + step, self.n)
            yield s, self.matrix[s:stop] if self.matrix is not None else self.group.codes(slice(s, stop))


# --------------------------------------------------------------------------- greedy


def _row_sums(codes: Tensor) -> Tensor:
    """Exact int64 row sums of int32 codes (<= L + 1) via int32 partial sums."""
    rows, n = codes.shape
    whole = n - n % _SUM_CHUNK
    out = codes[:, :whole].view(rows, -1, _SUM_CHUNK).sum(2, dtype=torch.int32).sum(1)
    return out + codes[:, whole:].sum(1) if whole < n else out


class _Greedy:
    """Facility-location greedy state over one group's codes (exact, ties to low index).

    gain(j) = sum_i max(best_i - code(j, i), 0) = sum(best) - sum_i min(best_i, code(j, i)),
    best_i = the code from row i to its nearest medoid so far.
    """

    def __init__(self, codes: _Codes) -> None:
        self.codes, self.n = codes, codes.n
        dev = codes.group.device
        # Sentinel L + 1 exceeds every code; it shifts only the first step's gains,
        # by the same constant for all candidates (c0 never changes greedy choices).
        self.best = torch.full((self.n,), CODE_LEVELS + 1, dtype=torch.int32, device=dev)
        self.assign = torch.full((self.n,), -1, dtype=torch.int64, device=dev)
        self.taken = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self.chosen: list[int] = []
        self._total = int(self.best.sum())

    def gains(self, idx: Tensor) -> Tensor:
        rows = self.codes.rows(idx)
        return self._total - _row_sums(torch.minimum(rows, self.best, out=rows))

    def all_gains(self) -> Tensor:
        """Exact gains of every candidate, taken ones set to -1 (one blocked pass)."""
        if not self.chosen:  # min(sentinel, code) = code: the row sums suffice
            return self._total - self.codes.sums
        out = torch.cat([self._total - _row_sums(torch.minimum(b, self.best)) for _, b in self.codes.blocks()])
        return out.masked_fill_(self.taken, -1)

    def add(self, j: int) -> None:
        row = self.codes.row(j)
        self.assign.masked_fill_(row < self.best, j)  # strict: ties stay with the earlier medoid
        torch.minimum(self.best, row, out=self.best)
        self._total = int(_row_sums(self.best[None])[0])
        self.chosen.append(j)
        self.taken[j] = True


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside, restored on exit."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _single_thread(device: torch.device) -> Iterator[int]:
    """Single-threaded torch ops on CPU inside; yields the caller's thread count.

    Selection issues thousands of cache-sized operations; OpenMP threads gain little
    there and, on a busy machine, waiting for a descheduled thread made them far
    slower (docs/results/engines.md), and idle workers spin and steal the core.
    Only the float64 products of heavy groups (proxies, wide features) get the
    caller's threads back.  Running classes in parallel Python threads was slower
    here (GIL hand-offs between small operations).
    """
    threads = torch.get_num_threads()
    with _threads(1 if device.type == "cpu" else threads):
        yield threads


def _lazy_greedy(greedy: _Greedy, k: int, batch_max: int = 256) -> None:
    """Minoux's lazy greedy; a heap of (-bound, index) gives lowest-index tie breaks.

    The heap top, once fresh (evaluated against the current medoid set), has the
    largest exact gain: every other entry's true gain is at most its stale bound
    (gains only shrink, by submodularity), and an equal bound belongs to a larger
    index.  Stale tops are re-evaluated in batches that double while the top stays
    stale.  The first two steps evaluate every candidate (one blocked pass each):
    the first gains carry the sentinel and bound nothing useful.
    """
    dev = greedy.best.device
    for step in range(min(k, 2)):
        gains = greedy.all_gains()
        greedy.add(int(lowest_argmax(gains)))
    if k <= 2:
        return
    heap = [(-g, j) for j, g in enumerate(gains.tolist()) if g >= 0 and j != greedy.chosen[-1]]
    heapq.heapify(heap)
    stamp = [1] * greedy.n  # the step at which each bound was computed
    for step in range(2, k):
        batch = 16
        while stamp[heap[0][1]] != step:
            popped = [heapq.heappop(heap) for _ in range(min(batch, len(heap)))]
            stale = [j for _, j in popped if stamp[j] != step]
            for entry in popped:
                if stamp[entry[1]] == step:
                    heapq.heappush(heap, entry)
            for j, g in zip(stale, greedy.gains(torch.tensor(stale, device=dev)).tolist()):
                stamp[j] = step
                heapq.heappush(heap, (-g, j))
            batch = min(2 * batch, batch_max)
        greedy.add(heapq.heappop(heap)[1])


def _stochastic_greedy(greedy: _Greedy, k: int, gen: torch.Generator, eps: float = 0.01) -> None:
    """Stochastic greedy (Mirzasoleiman et al., AAAI 2015): best of a random sample per step."""
    sample = min(greedy.n, max(1, math.ceil(greedy.n / k * math.log(1 / eps))))
    for _ in range(k):
        free = (~greedy.taken).nonzero().flatten().cpu()
        pick = free[torch.randperm(len(free), generator=gen)[:sample]].sort().values
        gains = greedy.gains(pick.to(greedy.best.device)).cpu()
        greedy.add(int(pick[int(lowest_argmax(gains))]))  # pick is sorted: the lowest row index


# ----------------------------------------------------------------------- selection


@dataclass(frozen=True)
class MedoidSelection:
    """Result of :func:`select_medoids`; index tensors live on the CPU.

    medoids:    row indices (into the full input) in greedy order, classes in
                ascending label order.
    sizes:      cluster size of each medoid, itself included (same order).
    drop:       bool [n], True for medoids whose cluster size <= threshold.
    assignment: [n], the medoid row each row joined (nearest; ties go to the
                medoid chosen first).
    """

    medoids: Tensor
    sizes: Tensor
    drop: Tensor
    assignment: Tensor


def class_budget(fraction: float, count: int) -> int:
    """k_c = ceil(fraction * n_c), at least 1 and at most n_c.

    The 1e-9 slack absorbs float error: 0.1 * 30 = 3.0000000000000004 must give 3.
    """
    return min(count, max(1, math.ceil(fraction * count - 1e-9)))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_features(features: Features) -> None:
    if isinstance(features, LastLayerProxy):
        parts = (features.g, features.h)
    elif isinstance(features, Tensor):
        if features.dim() != 2:
            raise ValueError(f"features must be 2-D [n, d], got shape {tuple(features.shape)}")
        parts = (features,)
    else:
        raise ValueError(f"features must be a Tensor or LastLayerProxy, got {type(features).__name__}")
    if len(features) == 0:
        raise ValueError("features is empty: nothing to select from")
    for t in parts:
        if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int32, torch.int64)):
            raise ValueError(f"features must be numeric, got dtype {t.dtype}")


def _check_selection_args(
    features: Features, labels: Tensor, fraction: float, threshold: int, method: str, chunk_rows: int
) -> None:
    _check_features(features)
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError("labels must be a 1-D integer tensor")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if len(labels) != len(features):
        raise ValueError(f"labels has {len(labels)} rows but features has {len(features)}")
    if not _is_real(fraction) or math.isnan(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if not _is_int(threshold) or threshold < 0:
        raise ValueError(f"threshold must be an integer >= 0, got {threshold!r}")
    if method not in _KIND_METHODS:
        raise ValueError(f"method must be one of {_KIND_METHODS}, got {method!r}")
    if not _is_int(chunk_rows) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")


_BACKENDS = ("auto", "compiled", "torch", "batched")


def _resolve_backend(backend: str, device: torch.device) -> tuple[str, Callable | None]:
    """(the backend that runs, the compiled kernel or None) for ``backend`` on ``device``.

    "auto" is "batched" on a GPU, "compiled" on the CPU when numba is installed, else "torch".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto" and device.type != "cpu":
        return "batched", None
    if backend in ("torch", "batched"):
        return backend, None
    if device.type != "cpu":
        raise ValueError(f"backend='compiled' runs on the CPU; features are on {device}")
    try:
        from fedepic.greedy_kernel import lazy_greedy
    except Exception as err:  # numba is optional (ImportError), and its cache may be unusable here
        if backend == "compiled":
            raise ValueError(f"backend='compiled' needs a working numba (pip install numba): {err}") from None
        return "torch", None
    return "compiled", lazy_greedy


def _run_batched(
    features: Features, groups: list[Tensor], fraction: float, chunk_rows: int, max_matrix_bytes: int,
    threads: int, batch: int = 128,
) -> list[tuple[Tensor, Tensor]]:
    """(chosen, assign) per class with :func:`fedepic.batched_greedy.batched_lazy_greedy`.

    Consecutive classes share one padded [C, N, N] code tensor while it fits in
    ``max_matrix_bytes`` (plus one scratch matrix for a class smaller than N); a class too big to
    store runs the torch greedy on rows computed on demand.
    """
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(groups)
    storable = [pos for pos, idx in enumerate(groups) if 4 * len(idx) ** 2 <= max_matrix_bytes]
    for pos in sorted(set(range(len(groups))) - set(storable)):
        codes = _class_codes(features, groups[pos], chunk_rows, max_matrix_bytes, threads)
        results[pos] = _torch_greedy(codes, class_budget(fraction, len(groups[pos])), "exact", 0)
    for members in _batches([len(groups[pos]) for pos in storable], max_matrix_bytes):
        positions = [storable[m] for m in members]
        sizes = [len(groups[pos]) for pos in positions]
        width = max(sizes)
        stack = torch.zeros(len(positions), width, width, dtype=torch.int32, device=features.device)
        sums = torch.zeros(len(positions), width, dtype=torch.int64, device=features.device)
        scratch = None
        for slot, (pos, n) in enumerate(zip(positions, sizes)):
            direct = n == width  # build straight into the slot
            workspace = stack[slot].view(-1) if direct else scratch
            codes = _class_codes(features, groups[pos], chunk_rows, max_matrix_bytes, threads, workspace)
            if not direct:
                scratch = codes.workspace
                stack[slot, :n, :n] = codes.matrix
            sums[slot, :n] = codes.sums
        budgets = [class_budget(fraction, n) for n in sizes]
        for pos, result in zip(positions, batched_lazy_greedy(stack, sums, sizes, budgets, CODE_LEVELS + 1, batch)):
            results[pos] = result
    return results  # type: ignore[return-value]


def _batches(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive runs of classes whose padded int32 [C, N, N] stack fits in ``max_bytes``."""
    out: list[list[int]] = []
    for i, n in enumerate(sizes):
        if out:
            width = max(n, *(sizes[j] for j in out[-1]))
            if 4 * (len(out[-1]) + 1) * width * width <= max_bytes:
                out[-1].append(i)
                continue
        out.append([i])
    return out


@dataclass(frozen=True)
class _GroupPlan:
    """Builds each class's codes and runs its greedy; (chosen, assign) per class, local indices.

    With the compiled kernel (which releases the GIL) and two or more threads, the
    greedy of one class runs in a worker thread while the next class's matrix is
    built, in the other of two workspaces; only when two of the largest class's
    matrices fit in ``max_matrix_bytes``.  Whether a matrix is stored never depends
    on this, so neither does the result.
    """

    fraction: float
    method: str
    seed: int | None
    chunk_rows: int
    max_matrix_bytes: int
    kernel: Callable | None
    threads: int

    def run(self, features: Features, groups: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        largest = max(len(idx) for idx in groups)
        overlap = (
            self.kernel is not None
            and self.method == "exact"
            and self.threads >= 2
            and len(groups) > 1
            and 2 * 4 * largest * largest <= self.max_matrix_bytes
        )
        workspaces: list[Tensor | None] = [None, None]
        results: list[Future | tuple[Tensor, Tensor]] = []
        # With a greedy running in the worker, the build leaves it one of the caller's threads.
        threads = max(1, self.threads - 1) if overlap else self.threads
        pool = ThreadPoolExecutor(1) if overlap else None
        try:
            for pos, idx in enumerate(groups):
                slot = pos % 2 if overlap else 0
                if overlap and pos >= 2:
                    results[pos - 2] = _resolved(results[pos - 2])  # its workspace is free again
                codes = _class_codes(features, idx, self.chunk_rows, self.max_matrix_bytes, threads, workspaces[slot])
                workspaces[slot] = codes.workspace
                k = class_budget(self.fraction, len(idx))
                if self.kernel is not None and self.method == "exact" and codes.matrix is not None:
                    job = partial(_compiled_greedy, self.kernel, codes, k)
                    results.append(pool.submit(job) if pool is not None else job())
                else:
                    results.append(_torch_greedy(codes, k, self.method, (self.seed or 0) + pos))
            return [_resolved(r) for r in results]
        finally:
            if pool is not None:  # on an error or Ctrl-C: drop the queued class, finish the running one
                pool.shutdown(wait=True, cancel_futures=True)


def _class_codes(
    features: Features, idx: Tensor, chunk_rows: int, max_matrix_bytes: int, threads: int,
    workspace: Tensor | None = None,
) -> _Codes:
    """The codes of rows ``idx``. Light CPU groups build with one torch thread (their cache-sized
    products got slower with more); heavy groups and GPU inputs with ``threads``."""
    x = features[idx.to(features.device)]
    with _threads(threads if _is_heavy(x) or x.device.type != "cpu" else 1):
        return _Codes(_Group(x), chunk_rows, max_matrix_bytes, workspace)


def _resolved(result: Future | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return result.result() if isinstance(result, Future) else result


def _compiled_greedy(kernel: Callable, codes: _Codes, k: int) -> tuple[Tensor, Tensor]:
    chosen, assign = kernel(codes.matrix.numpy(), codes.sums.numpy(), k, CODE_LEVELS + 1)
    return torch.from_numpy(chosen), torch.from_numpy(assign)


def _torch_greedy(codes: _Codes, k: int, method: str, seed: int) -> tuple[Tensor, Tensor]:
    greedy = _Greedy(codes)
    if method == "exact":
        _lazy_greedy(greedy, k)
    else:
        _stochastic_greedy(greedy, k, torch.Generator().manual_seed(seed))
    return torch.tensor(greedy.chosen, dtype=torch.int64), greedy.assign.cpu()


def select_medoids(
    features: Features,
    labels: Tensor,
    fraction: float,
    threshold: int = 1,
    *,
    method: str = "exact",
    chunk_rows: int = 4096,
    seed: int | None = None,
    max_matrix_bytes: int = 2**31,
    backend: str = "auto",
) -> MedoidSelection:
    """Per-class greedy medoids and the isolated ones to drop (EPIC, Algorithm 1).

    features:  [n, d] tensor (proxies, or flattened model updates) or a
               :class:`LastLayerProxy`; CPU or CUDA (the work runs on its device).
    labels:    [n] integer groups; classes may be arbitrarily unbalanced.
    fraction:  medoid budget per class, k_c = :func:`class_budget` (fraction, n_c).
    threshold: medoids whose cluster holds <= threshold rows are dropped.
    method:    "exact" (lazy greedy; equals the plain greedy, ties to the lowest
               row index) or "stochastic" (stochastic greedy, sampled with ``seed``,
               0 when None).
    chunk_rows: rows per block when a class is too big to store its code matrix.
    max_matrix_bytes: largest int32 code matrix stored per class (default 2 GiB).
               With the compiled backend and two or more torch threads, two
               classes' matrices are alive at once when both fit in this bound.
    backend:   how the exact greedy runs on a stored matrix: "compiled" (numba,
               CPU only, :mod:`fedepic.greedy_kernel`), "torch" (a heap and
               batched re-evaluation), "batched" (all classes in whole-tensor
               steps, :mod:`fedepic.batched_greedy`: for GPUs), or "auto"
               (batched on a GPU; compiled on the CPU when numba is installed,
               else torch).  The result does not depend on it.
    """
    _check_selection_args(features, labels, fraction, threshold, method, chunk_rows)
    runner, kernel = _resolve_backend(backend, features.device)
    with _single_thread(features.device) as caller_threads:
        labels_cpu = labels.detach().cpu()
        groups = [(labels_cpu == c).nonzero().flatten() for c in torch.unique(labels_cpu, sorted=True).tolist()]
        if runner == "batched" and method == "exact":
            results = _run_batched(features, groups, fraction, chunk_rows, max_matrix_bytes, caller_threads)
        else:
            plan = _GroupPlan(fraction, method, seed, chunk_rows, max_matrix_bytes, kernel, caller_threads)
            results = plan.run(features, groups)
    medoids, sizes = [], []
    assignment = torch.empty(len(labels_cpu), dtype=torch.int64)
    for idx, (chosen, local) in zip(groups, results):
        local[chosen] = chosen  # a medoid always belongs to its own cluster
        assignment[idx] = idx[local]
        medoids.append(idx[chosen])
        sizes.append(torch.bincount(local, minlength=len(idx))[chosen])
    medoids_t, sizes_t = torch.cat(medoids), torch.cat(sizes)
    drop = torch.zeros(len(labels_cpu), dtype=torch.bool)
    drop[medoids_t[sizes_t <= threshold]] = True
    return MedoidSelection(medoids=medoids_t, sizes=sizes_t, drop=drop, assignment=assignment)


# ------------------------------------------------------------------ gradient proxies

_PROXY_KINDS = ("logits", "last_layer")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def gradient_proxy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    kind: str = "logits",
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> Features:
    """Per-example gradient proxies of the cross-entropy loss, one no-grad eval pass.

    kind="logits": softmax(model(x)) - onehot(y), the gradient w.r.t. the logits
        (equivalently the last layer's bias gradient).  The official EPIC code uses
        softmax(W h) without the bias; we use the model's true logits (bias included).
    kind="last_layer": the full last-layer weight gradient (p - y) h^T, returned
        implicitly as a :class:`LastLayerProxy` (h = model.features(x)).

    x is float in [0, 1] or uint8 (divided by 255 per batch on the device).  The
    model runs in eval mode without augmentation; its train/eval mode is restored.
    Results are float32 on ``device`` (default: the model's device).
    """
    if kind not in _PROXY_KINDS:
        raise ValueError(f"kind must be one of {_PROXY_KINDS}, got {kind!r}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y need the same non-zero length, got {len(x)} and {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    gs, hs = [], []
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device)
            xb = float_images(xb)
            if kind == "logits":
                logits = model(xb)
            else:
                h = model.features(xb)
                logits = model.classifier(h)
                hs.append(h.float())
            g = torch.softmax(logits.float(), dim=1)
            yb = y[s : s + batch_size].to(device).long()
            g[torch.arange(len(yb), device=device), yb] -= 1
            gs.append(g)
    finally:
        model.train(was_training)
    if kind == "logits":
        return torch.cat(gs)
    return LastLayerProxy(torch.cat(gs), torch.cat(hs))


# ------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class EpicSchedule:
    """When EPIC selects during training, and with which settings.

    Selection runs at the end of epoch e, e = the number of completed epochs
    (1-based; a 0-based loop index i passes e = i + 1), when
    e >= warmup, (e - warmup) % interval == 0 and (until is None or e <= until).

    Paper settings (Yang et al. 2022, Sec. 5): warmup K, interval T, and selection
    stops at the last learning-rate drop.  40-epoch pipeline: K=10, T=2, LR x0.1 at
    15, 25, 35, so until=35 gives selections at 10, 12, ..., 34 (13 selections).
    200-epoch pipeline: K=30, T=10, LR drops at 100 and 150, so until=150 gives
    30, 40, ..., 150 (13 selections).

    proxy: "logits" or "last_layer" (see :func:`gradient_proxy`); threshold: drop
    medoids whose cluster holds <= threshold rows.
    """

    fraction: float = 0.1
    warmup: int = 10
    interval: int = 2
    until: int | None = None
    proxy: str = "logits"
    threshold: int = 1

    def __post_init__(self) -> None:
        if not _is_real(self.fraction) or math.isnan(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.until is not None and self.until < 0:
            raise ValueError(f"until must be None or >= 0, got {self.until}")
        if self.proxy not in _PROXY_KINDS:
            raise ValueError(f"proxy must be one of {_PROXY_KINDS}, got {self.proxy!r}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    @classmethod
    def pipeline_40(cls, fraction: float = 0.1, **kw: Any) -> "EpicSchedule":
        """40 epochs, LR x0.1 at 15/25/35: K=10, T=2, until 35 (13 selections)."""
        return cls(fraction=fraction, warmup=10, interval=2, until=35, **kw)

    @classmethod
    def pipeline_200(cls, fraction: float = 0.1, **kw: Any) -> "EpicSchedule":
        """200 epochs, LR x0.1 at 100/150: K=30, T=10, until 150 (13 selections)."""
        return cls(fraction=fraction, warmup=30, interval=10, until=150, **kw)

    def is_selection_epoch(self, epoch: int) -> bool:
        """True when selection runs after ``epoch`` completed epochs."""
        if epoch < 0:
            raise ValueError(f"epoch counts completed epochs and must be >= 0, got {epoch}")
        if epoch < self.warmup or (self.until is not None and epoch > self.until):
            return False
        return (epoch - self.warmup) % self.interval == 0

    def selection_epochs(self, total_epochs: int) -> list[int]:
        """All selection epochs e in 1..total_epochs."""
        return [e for e in range(1, total_epochs + 1) if self.is_selection_epoch(e)]


class EpicState:
    """The rows EPIC has kept so far; drops accumulate and never come back.

    ``keep`` is a bool tensor over the n training rows (CPU unless the caller swaps
    in its own mask); :meth:`select` and :meth:`load_state_dict` update it in place,
    so a training loop may share it.  :meth:`state_dict` gives plain Python data
    that a Flower client can keep in Context.state.  ``device`` is where the model
    computes the proxies (and so where the selection runs); ``seed`` only matters
    for method="stochastic" (selection s uses seed + s).
    """

    def __init__(
        self,
        num_rows: int,
        schedule: EpicSchedule | None = None,
        *,
        batch_size: int = 1024,
        device: torch.device | str | None = None,
        method: str = "exact",
        seed: int | None = None,
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if method not in _KIND_METHODS:
            raise ValueError(f"method must be one of {_KIND_METHODS}, got {method!r}")
        self.schedule = schedule if schedule is not None else EpicSchedule()
        self.keep = torch.ones(num_rows, dtype=torch.bool)
        self.selections = 0
        self.batch_size, self.device, self.method, self.seed = batch_size, device, method, seed

    def maybe_select(
        self, epoch: int, model: nn.Module, x: Tensor, y: Tensor, poison_mask: Tensor | None = None
    ) -> dict | None:
        """Run :meth:`select` when the schedule says so after ``epoch`` completed epochs."""
        if not self.schedule.is_selection_epoch(epoch):
            return None
        return {"epoch": epoch, **self.select(model, x, y, poison_mask)}

    def select(self, model: nn.Module, x: Tensor, y: Tensor, poison_mask: Tensor | None = None) -> dict:
        """One EPIC selection on the kept rows (x: all n rows, uint8 or float in [0, 1]).

        Returns: selection (count so far), skipped_nonfinite (1 when the model's proxies hold NaN
        or infinite values: nothing is selected or dropped), selected_rows (medoids chosen),
        dropped_now, dropped_total, kept, selection_seconds (proxies included), and
        with ``poison_mask`` (bool [n]) the cumulative poisons_dropped,
        poison_recall (0.0 without poisons), clean_dropped and clean_drop_rate.
        """
        n = len(self.keep)
        if len(x) != n or len(y) != n:
            raise ValueError(f"x and y must have the {n} rows EpicState was made for, got {len(x)}, {len(y)}")
        if poison_mask is not None and (poison_mask.dtype != torch.bool or len(poison_mask) != n):
            raise ValueError(f"poison_mask must be a bool tensor of length {n}")
        start = time.perf_counter()
        rows = self.keep.nonzero().flatten().cpu()
        sched, medoids, skipped = self.schedule, 0, False
        dropped_now = rows[:0]
        if len(rows):
            labels = y[rows.to(y.device)]
            proxy = gradient_proxy(model, x[rows.to(x.device)], labels, sched.proxy, self.batch_size, self.device)
            # A diverged model (NaN or infinite outputs, e.g. a node that aggregated a poisoned model)
            # has no gradient geometry to select on: this selection drops nothing.
            skipped = not _all_finite(proxy)
            if not skipped:
                seed = None if self.seed is None else self.seed + self.selections
                sel = select_medoids(proxy, labels, sched.fraction, sched.threshold, method=self.method, seed=seed)
                dropped_now, medoids = rows[sel.drop], len(sel.medoids)
                self.keep[dropped_now.to(self.keep.device)] = False
        self.selections += 1
        stats: dict[str, Any] = {
            "selection": self.selections,
            "skipped_nonfinite": int(skipped),
            "selected_rows": medoids,
            "dropped_now": len(dropped_now),
            "dropped_total": int((~self.keep).sum()),
            "kept": int(self.keep.sum()),
        }
        if poison_mask is not None:
            stats.update(poison_stats(~self.keep.cpu(), poison_mask.cpu()))
        stats["selection_seconds"] = time.perf_counter() - start
        return stats

    def state_dict(self) -> dict:
        """{"keep": list[bool], "selections": int}: plain data for Flower's Context.state."""
        return {"keep": [bool(v) for v in self.keep.tolist()], "selections": self.selections}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (keep: list, array or tensor), in place."""
        keep = torch.as_tensor(state["keep"]).bool().flatten()
        if len(keep) != len(self.keep):
            raise ValueError(f"state holds {len(keep)} rows, EpicState has {len(self.keep)}")
        self.keep.copy_(keep)
        self.selections = int(state.get("selections", 0))


def _all_finite(proxy: Features) -> bool:
    parts = (proxy.g, proxy.h) if isinstance(proxy, LastLayerProxy) else (proxy,)
    return all(bool(torch.isfinite(t).all()) for t in parts)
