"""Divide-and-Conquer (DnC), a server rule of the one signature (``strategies/aggregate.py``).

Paper: Virat Shejwalkar, Amir Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021,
https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/
(Algorithm 2, "DnC").

What the paper's Algorithm 2 does, each of ``niters`` times: draw a random set r of b coordinates,
take the updates' restriction to them, centre it on its mean, find the top right singular vector v of
the centred matrix, score each update by the squared projection ``s_i = <u_i[r] - mu_r, v>^2``, and
keep the n - c*m updates of lowest score; the good set is the intersection of the kept sets over
the iterations, and the aggregate is the mean of the good updates:

    mu_r = mean_i u_i[r],   v = top right singular vector of [u_i[r] - mu_r]_i,
    s_i = <u_i[r] - mu_r, v>^2,   I_t = the n - floor(c m) lowest s_i,   I = cap_t I_t,
    DnC(u) = mean_{i in I} u_i.

Example (3 close updates and one far one; m = 1, c = 1, b = D = 2; v points towards the far row, whose
score is the largest, so every iteration drops it)::

    >>> import torch
    >>> stack = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [5.0, 5.0]])
    >>> rule = DivideAndConquer(1, 1.0, 3, 2, seed=0)
    >>> out = rule(stack, None, None, {"round": 1})
    >>> out.kept.tolist(), out.vector
    ([True, True, True, False], tensor([0.0667, 0.0667]))

Cost: per iteration one draw of b coordinates (``torch.randperm`` over D), an n x b copy and its
thin SVD (O(n^2 b)), so O(niters (D + n^2 b)) time and O(n b) extra memory; the mean is O(n D).

Randomness: the coordinate draws come from ``strategies.aggregate.round_generator`` (the run's seed
and the server round, which the round engine puts in ``state["round"]``), so a run is reproducible,
every round draws afresh, and a resumed run draws what the uninterrupted one drew.

Deviations and readings (each marked where it is a reading):
- m, the number of attackers the paper's server knows, is ``defense.byzantine`` (null: the malicious
  clients, ``fedepic.extensions.assumed_byzantine``); n is the rows the rule receives (finite ones;
  NaN / inf rows are left out first by ``strategies.aggregate.aggregate``). The number removed per
  iteration is ``floor(c m)``, capped so that at least one update is kept (inferred: the paper writes
  n - c m and assumes it is at least 1).
- b larger than D is capped at D (then every iteration scores the same coordinates, and only the
  sign-free SVD makes them equal).
- The mean is unweighted, as in the paper (``weights`` are ignored).
- The good set is the intersection over the iterations; it can only be empty when the iterations
  together remove every row (niters * floor(c m) >= n). The paper does not say what then (FLPoison's
  port would average nothing); here the rows kept by the last iteration are averaged instead
  (inferred), and ``info["fallback"]`` says so.
- Ties of scores go to the lower row (a stable sort).
- Defaults (``defense.dnc``): niters 5, c 1.0 as FLPoison's port (``vio1etus/FLPoison``
  ``aggregators/dnc.py``), b 10000 (inferred from the paper's setup as remembered, not re-read).

Translation-equivariant, as every registered server rule (``strategies/mean.py``): centring removes a
common shift, so ``u_i + g`` keeps the same rows and moves the mean by g.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, round_generator


def outlier_scores(sample: Tensor) -> Tensor:
    """``<x_i - mu, v>^2`` per row of ``sample`` [n, b] (float64): mu the row mean, v the top right
    singular vector of the centred rows (zero scores when the centred matrix is zero)."""
    centred = sample.double() - sample.double().mean(dim=0)
    if not bool(centred.any()):
        return torch.zeros(sample.shape[0], dtype=torch.float64)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ v).square()


def lowest(scores: Tensor, count: int) -> Tensor:
    """bool [n]: the ``count`` lowest scores (ties to the lower row)."""
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:count]] = True
    return keep


class DivideAndConquer:
    """DnC (Shejwalkar, Houmansadr, NDSS 2021) over the clients' updates (module docstring).

    Parameters
    ----------
    num_malicious_nodes : int
        m, the assumed attackers (``defense.byzantine``).
    filter_fraction : float
        c: each iteration drops the floor(c m) highest scores (``defense.dnc.filter_fraction``).
    iterations : int
        niters (``defense.dnc.iterations``).
    subsample : int
        b, coordinates drawn per iteration (``defense.dnc.subsample``; capped at D).
    seed : int
        The run's seed (``seed``), mixed with the round (``strategies.aggregate.round_generator``).

    ``info``: ``scores`` (the last iteration's), ``removed`` (per iteration), ``fallback``.
    """

    def __init__(self, num_malicious_nodes: int, filter_fraction: float, iterations: int, subsample: int,
                 seed: int) -> None:
        if int(num_malicious_nodes) != num_malicious_nodes or num_malicious_nodes < 0:
            raise ValueError(f"dnc: num_malicious_nodes must be a non-negative integer, got {num_malicious_nodes!r}")
        if not filter_fraction >= 0:
            raise ValueError(f"dnc: filter_fraction must be >= 0, got {filter_fraction!r}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"dnc: iterations must be a positive integer, got {iterations!r}")
        if int(subsample) != subsample or subsample < 1:
            raise ValueError(f"dnc: subsample must be a positive integer, got {subsample!r}")
        self.num_malicious_nodes = int(num_malicious_nodes)
        self.filter_fraction = float(filter_fraction)
        self.iterations = int(iterations)
        self.subsample = int(subsample)
        self.seed = int(seed)

    def removed_per_iteration(self, n: int) -> int:
        """floor(c m), at most n - 1."""
        return max(0, min(int(self.filter_fraction * self.num_malicious_nodes), n - 1))

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n, dim = stack.shape
        generator = round_generator(self.seed, state, "dnc")
        keep_count = n - self.removed_per_iteration(n)
        good = torch.ones(n, dtype=torch.bool)
        kept = good
        scores = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.iterations):
            columns = torch.randperm(dim, generator=generator)[:min(self.subsample, dim)]
            scores = outlier_scores(stack[:, columns.to(stack.device)]).cpu()
            kept = lowest(scores, keep_count)
            good = good & kept
        fallback = not bool(good.any())
        if fallback:
            good = kept
        rows = good.nonzero().flatten()
        vector = stack[rows.to(stack.device)].mean(dim=0)
        return Aggregate(vector, good, info={"scores": scores.tolist(), "fallback": fallback,
                                             "removed": n - keep_count})
