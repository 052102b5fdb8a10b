"""Self-centered clipping (ClippedGossip) as a decentralized peer rule.

Paper: Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-Robust Decentralized Learning via
ClippedGossip", arXiv:2202.01545, 2022 (self-centered clipping). Deviation: NaN / inf neighbours
are left out before clipping (``strategies.aggregate.aggregate``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate
from strategies.gossip import own_only, resolve_weights, split_own


def clip_rows(z: Tensor, tau: float, norms: Optional[Tensor] = None) -> Tensor:
    """``clip(z, tau) = z * min(1, tau / ||z||)`` row-wise; zero rows are left unchanged. ``norms``:
    the row norms [m, 1] when the caller has them."""
    norms = z.norm(dim=1, keepdim=True) if norms is None else norms
    scale = torch.where(
        norms > tau, tau / norms.clamp_min(torch.finfo(z.dtype).tiny), torch.ones_like(norms)
    )
    return z * scale


class SelfCenteredClipping:
    """ClippedGossip: ``x_i <- x_i + sum_j w_ij clip(x_j - x_i, tau)`` (He et al., 2022).

    Each neighbour can move the node by at most ``w_ij * tau``, so a Byzantine neighbour's
    influence is bounded while close (honest) neighbours are averaged as in plain gossip.

    Parameters
    ----------
    tau: fixed clipping radius (> 0), in model-vector L2 units.
    delta: adaptive radius instead of a fixed one: ``tau`` is set each call to the ``(1 - delta)``
       quantile (linear interpolation) of the distances ``||x_j - x_i||`` over the neighbours, so
       roughly the ``delta`` fraction of farthest neighbours is clipped. ``delta`` plays the role of
       the paper's bound on the Byzantine share of the neighbourhood; the paper's adaptive rule picks
       the radius so that the neighbours carrying that share of the weight are clipped, and with
       equal weights the two coincide. Give exactly one of ``tau`` and ``delta``.

    A peer rule of the one signature (``strategies/aggregate.py``); the centre is own (row
    ``own_index``). Every row enters the sum (``kept`` all True, a far neighbour clipped, not dropped);
    ``info["radius"]`` is the radius used and ``info["clipped"]`` the rows whose difference was clipped.

    Non-finite vectors are left out before the radius is chosen and the rest clipped
    (``strategies.aggregate.aggregate``): a NaN or inf difference has no norm to clip by, and in delta mode it
    would make the quantile radius NaN, switching clipping off for every neighbour. The paper assumes
    finite messages; this is the reading that keeps its bound ``w_ij * tau`` per neighbour.
    """


    def __init__(self, tau: float | None, delta: float | None = None) -> None:
        if (tau is None) == (delta is None):
            raise ValueError("scclip: give exactly one of tau (fixed radius) or delta (adaptive)")
        if tau is not None and not tau > 0:
            raise ValueError(f"scclip: tau must be > 0, got {tau!r}")
        if delta is not None and not 0 <= delta < 1:
            raise ValueError(f"scclip: delta must be in [0, 1), got {delta!r}")
        self.tau = tau
        self.delta = delta

    def radius(self, diffs: Tensor, dists: Optional[Tensor] = None) -> float:
        """The clipping radius for neighbour differences ``diffs`` [m, D] (``dists``: their norms [m],
        when the caller has them)."""
        if self.tau is not None:
            return float(self.tau)
        dists = diffs.norm(dim=1) if dists is None else dists
        return float(torch.quantile(dists.double(), 1.0 - float(self.delta)))

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, w = split_own(stack, own_index, weights)
        if neighbours.shape[0] == 0:
            return own_only(stack, own_index)
        w = resolve_weights(w, neighbours.shape[0], own)
        diffs = neighbours - own
        norms = diffs.norm(dim=1, keepdim=True)
        tau = self.radius(diffs, norms.squeeze(1))
        others = torch.arange(stack.shape[0])[torch.arange(stack.shape[0]) != own_index]
        return Aggregate(own + w[1:] @ clip_rows(diffs, tau, norms), torch.ones(stack.shape[0], dtype=torch.bool),
                         info={"radius": tau, "clipped": others[(norms.squeeze(1) > tau).cpu()].tolist()})
