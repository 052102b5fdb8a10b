"""SignGuard, a server rule of the one signature (``strategies/aggregate.py``).

Paper: Jian Xu, Shao-Lun Huang, Linqi Song, Tian Lan, "SignGuard: Byzantine-robust Federated Learning
through Collaborative Malicious Gradient Filtering", ICDCS 2022, arXiv:2109.05872,
https://arxiv.org/abs/2109.05872. (The issue's brief lists the authors as "Xu, Huang, Wei, Li"; the
arXiv page lists the four above.) Authors' code: ``JianXu95/SignGuard``, ``aggregators/signguard.py``
(class ``signguard_multiclass``), which fixes every detail the abstract leaves open; this module follows
it, and says where.

The paper's abstract: "the received gradients are first processed to generate relevant magnitude, sign,
and similarity statistics, which are then collaboratively utilized by multiple, parallel filters to
eliminate malicious gradients before final aggregation." The plain SignGuard has two filters:

1. norm filter: ``M = median_i ||g_i||``, ``S1 = {i : L M < ||g_i|| < R M}`` (L = 0.1, R = 3.0);
2. sign filter: a random block of ``floor(beta D)`` coordinates (beta = 0.1), per gradient the shares of
   positive, zero and negative entries in it, each divided by its largest value over the gradients
   (``+ 1e-8``), clustered by MeanShift (flat kernel, bandwidth from the 0.5 quantile of the
   nearest-neighbour distances, bin seeding, unclustered points left out); ``S2`` = the largest cluster;

then ``S = S1 cap S2`` and

    SignGuard(g) = (1 / |S|) sum_{i in S} g_i min(1, M / ||g_i||).

Example (four gradients with mostly positive entries and one sign-flipped one, which the sign filter
drops; the first is clipped to the median norm 2)::

    >>> import torch
    >>> g = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5],
    ...                   [1.0, 1.0, 0.5, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    >>> out = SignGuard(0.1, 3.0, 1.0, seed=0)(g, None, None, {"round": 1})
    >>> out.kept.tolist(), out.info["norm_kept"], out.info["sign_kept"]
    ([True, True, True, True, False], [0, 1, 2, 3, 4], [0, 1, 2, 3])

MeanShift is sklearn's (``sklearn.cluster.MeanShift(bandwidth=estimate_bandwidth(X, quantile=0.5),
bin_seeding=True, cluster_all=False)``), which torch lacks; :func:`mean_shift_labels` writes the same
steps in torch for the [n, 3] features: bandwidth = the mean over points of the distance to their
``max(1, floor(n / 2))``-th nearest point, the point itself counted first; seeds = the distinct
``round(x / bandwidth) * bandwidth`` (the points themselves when no two share a bin); each seed moves to
the mean of the points within the bandwidth until it moves less than 1e-3 bandwidth (at most 300 steps);
the converged centres, by decreasing count of points within the bandwidth, drop every later centre
within the bandwidth of a kept one; each point joins its nearest centre if that lies within the
bandwidth (otherwise it is left out, -1).

Cost: O(n D) for the norms, the clipping and the mean, O(beta n D) for the sign shares, and O(s^2 n)
per MeanShift step over s seeds of 3 features; O(n D) extra memory for the clipped rows.

Randomness: the block's start is drawn by ``strategies.aggregate.round_generator`` (the run's seed and
the server round), uniform in [0, D - floor(beta D)) as the authors' ``torch.randint``.

Deviations and readings:
- ``estimate_bandwidth``'s ``n_samples=50`` draws 50 of the points at random when there are more; here
  every point is used (the same for n <= 50 clients).
- A bandwidth of 0 (all features equal, or more than half the points on top of each other) would make
  sklearn divide by zero in its bin seeding; here the clusters are then the groups of equal features,
  the largest winning (inferred).
- Ties between clusters of equal size go to the one found first (its centre's count is higher, or
  equal and its coordinates larger, sklearn's order).
- An empty S (possible when the largest sign cluster lies outside the norm band) aggregates nothing:
  the vector is None and the server keeps its model this round (inferred: the authors' mean of no row
  would be NaN).
- ``weights`` are ignored (the paper's mean is unweighted). A zero gradient fails the norm filter
  unless the median norm is 0; then it is kept and clipped to 0 (the authors divide 0 by 0).
- Not translation-equivariant (norms and signs of the updates are what it reads): it must see updates,
  as the round engine hands them (``fedepic.server_rounds.parameter_updates``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, round_generator

BANDWIDTH_QUANTILE = 0.5  # the authors' estimate_bandwidth(quantile=0.5)
MAX_SHIFTS = 300  # sklearn MeanShift's max_iter
EPS = 1e-8  # the authors' guard of the feature scaling


def median_value(values: Tensor) -> float:
    """``np.median``: the middle value, or the mean of the two middle ones."""
    ordered = torch.sort(values.double()).values
    n, mid = ordered.shape[0], ordered.shape[0] // 2
    return float(ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2)


def sign_features(block: Tensor) -> Tensor:
    """[n, 3]: per row of ``block`` the shares of positive, zero and negative entries, each column divided
    by its largest value (+ 1e-8), as the authors' code."""
    width = block.shape[1]
    shares = torch.stack([(block > 0).sum(dim=1), (block == 0).sum(dim=1), (block < 0).sum(dim=1)], dim=1)
    shares = shares.double() / width
    return shares / (shares.max(dim=0).values + EPS)


def estimate_bandwidth(points: Tensor, quantile: float = BANDWIDTH_QUANTILE) -> float:
    """sklearn's ``estimate_bandwidth``: the mean over points of the distance to their k-th nearest point
    (the point itself first), k = max(1, floor(n quantile))."""
    k = max(1, int(points.shape[0] * quantile))
    return float(torch.sort(torch.cdist(points, points), dim=1).values[:, k - 1].mean())


def bin_seeds(points: Tensor, bandwidth: float) -> Tensor:
    """sklearn's ``get_bin_seeds`` (min_bin_freq 1): the distinct ``round(x / bandwidth) * bandwidth``,
    or the points themselves when every point has its own bin."""
    bins = torch.unique(torch.round(points / bandwidth), dim=0)
    if bins.shape[0] == points.shape[0]:
        return points.clone()
    return (bins.float() * bandwidth).to(points.dtype)  # sklearn keeps the seeds in float32


def mean_shift_labels(points: Tensor) -> Tensor:
    """int64 [n]: the MeanShift cluster of each row of ``points`` [n, k] (0 = the centre with the most
    points within the bandwidth), -1 for a point farther than the bandwidth from every centre (module
    docstring)."""
    bandwidth = estimate_bandwidth(points)
    if bandwidth <= 0.0:
        return equal_groups(points)
    found: dict[tuple, int] = {}
    for seed in bin_seeds(points, bandwidth):
        centre, count = shift(points, seed, bandwidth)
        if count:
            found[tuple(centre.tolist())] = count
    ordered = sorted(found.items(), key=lambda item: (item[1], item[0]), reverse=True)
    centres = torch.tensor([c for c, _ in ordered], dtype=points.dtype)
    unique = torch.ones(len(ordered), dtype=torch.bool)
    for i in range(len(ordered)):
        if unique[i]:
            unique[sq_distances(centres[i:i + 1], centres)[0] <= bandwidth ** 2] = False
            unique[i] = True
    centres = centres[unique]
    nearest = sq_distances(points, centres).min(dim=1)
    return torch.where(nearest.values <= bandwidth ** 2, nearest.indices, torch.full_like(nearest.indices, -1))


def sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared distances [len(a), len(b)] from exact differences: sklearn's neighbour searches compare
    squared distances with the squared radius, and sign features put points exactly on the radius."""
    return (a[:, None, :] - b[None, :, :]).square().sum(dim=2)


def shift(points: Tensor, seed: Tensor, bandwidth: float) -> tuple[Tensor, int]:
    """A flat-kernel mean shift from ``seed``: the converged centre and the points within the bandwidth
    of it (sklearn's ``_mean_shift_single_seed``)."""
    centre = seed.clone()
    count = 0
    for _ in range(MAX_SHIFTS):
        within = sq_distances(points, centre[None])[:, 0] <= bandwidth ** 2
        count = int(within.sum())
        if count == 0:
            break
        previous, centre = centre, points[within].mean(dim=0)
        if float((centre - previous).norm()) <= 1e-3 * bandwidth:
            break
    return centre, count


def equal_groups(points: Tensor) -> Tensor:
    """Labels by groups of equal rows, the largest group 0 (ties: the first row's group)."""
    _, inverse, counts = torch.unique(points, dim=0, return_inverse=True, return_counts=True)
    order = sorted(range(len(counts)), key=lambda g: (-int(counts[g]), int((inverse == g).nonzero()[0])))
    rank = torch.empty(len(counts), dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(len(counts))
    return rank[inverse]


def largest_cluster(labels: Tensor) -> Tensor:
    """bool [n]: the rows of the most populous cluster (labels >= 0; ties: the lower label)."""
    valid = labels[labels >= 0]
    if valid.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    counts = torch.bincount(valid)
    return labels == int(torch.argmax(counts))


class SignGuard:
    """SignGuard (Xu, Huang, Song, Lan, ICDCS 2022) over the clients' updates (module docstring).

    Parameters
    ----------
    lower, upper : float
        L and R of the norm filter, times the median norm (``defense.signguard.lower`` / ``.upper``).
    coordinate_fraction : float
        beta, the share of coordinates in the sign block (``defense.signguard.coordinate_fraction``).
    seed : int
        The run's seed (``seed``), mixed with the round (``strategies.aggregate.round_generator``).

    ``info``: ``norm_kept`` (S1), ``sign_kept`` (S2), ``median_norm`` (M), ``block`` (start, width).
    """

    def __init__(self, lower: float, upper: float, coordinate_fraction: float, seed: int) -> None:
        if not 0 <= lower < upper:
            raise ValueError(f"signguard: needs 0 <= lower < upper, got {lower!r}, {upper!r}")
        if not 0 < coordinate_fraction <= 1:
            raise ValueError(f"signguard: coordinate_fraction must lie in (0, 1], got {coordinate_fraction!r}")
        self.lower, self.upper = float(lower), float(upper)
        self.coordinate_fraction = float(coordinate_fraction)
        self.seed = int(seed)

    def block(self, dim: int, generator: torch.Generator) -> tuple[int, int]:
        """(start, width) of the sign block: width max(1, floor(beta D)), start uniform in
        [0, D - width) (0 when the block is the whole vector)."""
        width = max(1, int(self.coordinate_fraction * dim))
        start = int(torch.randint(0, dim - width, (1,), generator=generator)) if dim > width else 0
        return start, width

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n, dim = stack.shape
        generator = round_generator(self.seed, state, "signguard")
        norms = stack.double().norm(dim=1).cpu()
        median = median_value(norms)
        in_band = (norms > self.lower * median) & (norms < self.upper * median)
        if median == 0.0:
            in_band = norms == 0.0
        start, width = self.block(dim, generator)
        features = sign_features(stack[:, start:start + width]).cpu()
        in_cluster = largest_cluster(mean_shift_labels(features))
        kept = in_band & in_cluster
        info = {"norm_kept": in_band.nonzero().flatten().tolist(), "sign_kept": in_cluster.nonzero().flatten().tolist(),
                "median_norm": median, "block": [start, width]}
        if not bool(kept.any()):
            return Aggregate(None, kept, info=info)
        rows = kept.nonzero().flatten()
        scale = torch.clamp(median / norms[rows].clamp_min(torch.finfo(torch.float64).tiny), max=1.0)
        clipped = stack[rows.to(stack.device)] * scale.to(stack.dtype).to(stack.device)[:, None]
        return Aggregate(clipped.mean(dim=0), kept, info=info)
