"""EPIC on stacked model updates (one group): the pure rule behind the server strategy and the peer rule.

Framework-free (torch only), so the Flower strategy (strategies/epic_server.py) and the decentralized
peer rule (strategies/epic_peer.py) share one definition of how many medoids to pick and what to drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedepic.epic import select_medoids
from fedepic.vectors import finite_rows


@dataclass(frozen=True)
class UpdateSelection:
    """Which of m updates EPIC keeps: keep (bool [m]), the medoids (rows, greedy order), their sizes,
    and the rows dropped before the selection because they held NaN / inf (``nonfinite``)."""

    keep: Tensor
    medoids: Tensor
    sizes: Tensor
    nonfinite: tuple[int, ...] = ()

    @property
    def dropped(self) -> list[int]:
        return (~self.keep).nonzero().flatten().tolist()


def medoid_count(m: int, fraction: float, min_medoids: int = 2, num_malicious: int = 0) -> int:
    """k = max(min_medoids, num_malicious + 1, ceil(fraction * m)), at most m - 1.

    With few clients, fraction * m is below 2 (0.1 * 20 = 2, 0.1 * 10 = 1), and a single medoid
    isolates nobody; one medoid for the honest bulk plus one per assumed attacker lets every
    far-off update become its own singleton cluster. k <= m - 1 keeps at least one cluster of two
    or more, so some updates always survive.
    """
    if m < 1:
        raise ValueError(f"need at least one update, got m={m}")
    wanted = max(min_medoids, num_malicious + 1, math.ceil(fraction * m - 1e-9))
    return max(1, min(wanted, m - 1))


def epic_select_updates(updates: Tensor, fraction: float = 0.1, threshold: int = 1, min_medoids: int = 2,
                        num_malicious: int = 0) -> UpdateSelection:
    """EPIC on stacked updates [m, D] (one group): medoids whose cluster holds <= threshold updates are dropped.

    Fewer than three updates cannot single out an isolated one: all are kept. An update holding NaN or
    inf is dropped before the selection (it has no distance to anything) and listed in ``nonfinite``;
    the selection runs on the finite rest, and medoids are indices of the original rows.
    """
    if updates.dim() != 2:
        raise ValueError(f"updates must be [m, D], got shape {tuple(updates.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    finite = finite_rows(updates).cpu()
    if not bool(finite.all()):
        rows = finite.nonzero().flatten()
        inner = epic_select_updates(updates[finite.to(updates.device)], fraction, threshold, min_medoids,
                                    num_malicious)
        keep = torch.zeros(updates.shape[0], dtype=torch.bool)
        keep[rows] = inner.keep.cpu()
        bad = tuple((~finite).nonzero().flatten().tolist())
        return UpdateSelection(keep, rows[inner.medoids.cpu()], inner.sizes, bad)
    m = updates.shape[0]
    if m < 3:
        ones = torch.ones(m, dtype=torch.bool)
        return UpdateSelection(ones, torch.arange(m), torch.ones(m, dtype=torch.int64))
    k = medoid_count(m, fraction, min_medoids, num_malicious)
    # select_medoids takes a fraction: class_budget(k / m, m) = ceil(k - 1e-9) = k medoids.
    sel = select_medoids(updates, torch.zeros(m, dtype=torch.int64), k / m, threshold)
    return UpdateSelection(~sel.drop, sel.medoids, sel.sizes)
