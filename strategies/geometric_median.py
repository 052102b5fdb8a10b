"""Geometric median by the smoothed Weiszfeld algorithm (RFA), a server rule and a peer rule of the one
signature (``strategies/aggregate.py``).

Paper: Krishna Pillutla, Sham M. Kakade, Zaid Harchaoui, "Robust Aggregation for Federated Learning",
IEEE Transactions on Signal Processing 70, 1142-1154, 2022, https://doi.org/10.1109/TSP.2022.3153135
(arXiv:1912.13445).

Formula: the geometric median ``argmin_z sum_i alpha_i ||z - x_i||`` approximated by T smoothed
Weiszfeld steps from z_0 = 0,

    beta_i = alpha_i / max(nu, ||z_t - x_i||_2),   z_{t+1} = sum_i beta_i x_i / sum_i beta_i,

with alpha_i the rows' weights (the paper's alpha_i = n_i / sum_j n_j, the clients' example counts)
and nu > 0 the smoothing that keeps a step defined when z_t meets a row.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate


def smoothed_weiszfeld(stack: Tensor, alphas: Tensor, nu: float, iterations: int) -> tuple[Tensor, Tensor]:
    """``iterations`` smoothed Weiszfeld steps over the rows of ``stack`` [n, D] with weights ``alphas``
    [n] (any positive scale) from z = 0; returns z and the last step's normalised weights
    ``beta / sum(beta)`` [n]."""
    z = torch.zeros(stack.shape[1], dtype=stack.dtype, device=stack.device)
    alphas = alphas.to(dtype=stack.dtype, device=stack.device)
    shares = alphas / alphas.sum()
    for _ in range(iterations):
        betas = alphas / (stack - z).norm(dim=1).clamp_min(nu)
        shares = betas / betas.sum()
        z = shares @ stack
    return z, shares


class GeometricMedianRule:
    """RFA (Pillutla, Kakade, Harchaoui, IEEE TSP 2022): the smoothed Weiszfeld geometric median.

    At a server (``own_index`` None) the rows are weighted by ``weights`` (the clients' example counts,
    the paper's alpha_i), or equally when None (ByzFL's ``GeometricMedian``). At a peer (``own_index``
    set) the node's own vector is one row like the others and every row weighs the same: the mixing
    weights are ignored, as ClippedGossip's code computes its peer RFA (He, Karimireddy, Jaggi,
    ``epfml/byzantine-robust-decentralized-optimizer``, ``codes/aggregator.py``: ``DeRFA`` calls RFA
    on ``[local_inputs] + neighbor_inputs`` with ``alphas = [1 / len(inputs)]``).

    Every row takes part (``kept`` all True: the Weiszfeld weights shrink a far row, they never drop
    it); ``info["weights"]`` holds the last step's normalised weights ``beta_i / sum_j beta_j``.

    Example (from z_0 = 0 the rows 0, 1, 100 are at distances 0, 1, 100; with nu = 1 their weights are
    1/1, 1/1, 1/100, so z_1 = (0 + 1 + 100/100) / 2.01 = 2/2.01: the far row weighs 1/201)::

        >>> rule = GeometricMedianRule(iterations=1, nu=1.0)
        >>> out = rule(torch.tensor([[0.0], [1.0], [100.0]], dtype=torch.float64), None, None, {})
        >>> round(float(out.vector), 6), out.kept.tolist(), round(out.info["weights"][2], 6)
        (0.995025, [True, True, True], 0.004975)

    Parameters
    ----------
    iterations : int
        T, the Weiszfeld steps (>= 1; ``defense.geometric_median.iterations``).
    nu : float
        The smoothing (> 0; ``defense.geometric_median.nu``).

    Cost: O(T n D) time, O(n D) extra memory for the differences.

    Deviations: none from ByzFL's ``GeometricMedian`` (z_0 = 0, T steps, ``max(nu, d)``) and
    ClippedGossip's ``RFA`` / ``DeRFA`` where ``weights`` is None or at a peer. The paper's authors'
    package (``geom_median``, ``geometric_median_array(points, weights, eps, maxiter, ftol)``) runs up
    to ``maxiter`` steps and stops when the objective improves by less than ``ftol``, and (inferred)
    starts at the weighted mean; we follow the two reference codes' fixed T from zero, so the rule is
    not translation-equivariant (``strategies/mean.py``): few steps from 0 on a stack of models
    stay nearer to 0 than from its mean. Rows holding NaN / inf are left out first
    (``strategies.aggregate.aggregate``); ByzFL leaves out rows holding inf and, with them, counts
    n in alpha (which cancels in the ratio). Stateless.
    """

    def __init__(self, iterations: int, nu: float) -> None:
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"geometric_median: iterations must be an integer >= 1, got {iterations!r}")
        if not nu > 0:
            raise ValueError(f"geometric_median: nu must be > 0, got {nu!r}")
        self.iterations = int(iterations)
        self.nu = float(nu)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n = stack.shape[0]
        if weights is None or own_index is not None:
            alphas = torch.ones(n, dtype=torch.float64)
        else:
            alphas = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if alphas.shape != (n,) or bool((alphas < 0).any()) or not float(alphas.sum()) > 0:
                raise ValueError(f"geometric_median: weights must be {n} non-negative values with a positive sum")
        z, shares = smoothed_weiszfeld(stack, alphas, self.nu, self.iterations)
        return Aggregate(z, torch.ones(n, dtype=torch.bool), info={"weights": shares.tolist()})
