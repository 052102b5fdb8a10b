"""EPIC on stacked model updates (one group): the pure rule behind the server strategy and the peer rule.

Framework-free (torch only), so the Flower strategy (strategies/epic_server.py) and the decentralized
peer rule (strategies/epic_peer.py) share one definition of how many medoids to pick and what to drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fedepic.epic import select_medoids
from fedepic.vectors import finite_rows
from strategies.aggregate import Aggregate
from strategies.mean import weighted_mean


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


def check_epic_parameters(fraction: float, threshold: int, min_medoids: int, num_malicious_nodes: int) -> None:
    """EPIC on updates' settings, as the tensor rule and the Flower strategy both take them."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if threshold < 0 or min_medoids < 1 or num_malicious_nodes < 0:
        raise ValueError("threshold and num_malicious_nodes must be >= 0, min_medoids >= 1")


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


class EpicRule:
    """EPIC on the clients' updates, then FedAvg of the kept ones: ``strategies.epic_server.EpicServer``
    as a server rule of the one signature.

    ``epic_select_updates(stack, fraction, threshold, min_medoids, num_malicious_nodes)`` picks
    k = ``medoid_count(n, ...)`` medoids greedily (facility location over the pairwise distances) and
    drops the rows whose medoid's cluster holds at most ``threshold`` rows; the result is
    ``sum_{i kept} w_i u_i / sum_{i kept} w_i`` with ``w`` the example counts (equal when None), as
    EpicServer averages the kept replies with ``aggregate_arrayrecords``. The selection reads only
    distances, so updates and models give the same ``kept`` (module docstring of ``strategies.mean``).

    Paper: Yu Yang, Tian Yu Liu, Baharan Mirzasoleiman, "Not All Poisons are Created Equal: Robust
    Training against Data Poisoning", ICML 2022 (PMLR 162), https://proceedings.mlr.press/v162/yang22j.html.
    Deviation (ours, as EpicServer): the paper selects over training examples' gradients, here the
    points are client updates.

    Example (the far row sits alone in its cluster)::

        >>> stack = torch.tensor([[0.0], [0.1], [0.2], [0.3], [9.0]])
        >>> out = EpicRule(0.1, 1, 2, 0)(stack, None, None, {})
        >>> out.kept.tolist(), out.vector
        ([True, True, True, True, False], tensor([0.1500]))

    Parameters
    ----------
    fraction, threshold, min_medoids, num_malicious_nodes :
        As EpicServer's (``defense.epic.fraction``, ``.threshold``, ``.min_medoids``, ``defense.byzantine``).

    Cost: ``fedepic.epic.select_medoids`` on n rows (O(n^2 D) for the distances, then the greedy on
    [n, n]) plus O(n D) for the mean. ``info``: the medoids (row indices, greedy order) and their
    cluster sizes. Deviation from EpicServer: none on the same stack (it builds the stack with
    ``record_vector``, the same selection runs); the mean is rounded in float32 as Flower's (another
    order of summation). ``own_index`` is ignored; stateless.
    """

    def __init__(self, fraction: float, threshold: int, min_medoids: int, num_malicious_nodes: int) -> None:
        check_epic_parameters(fraction, threshold, min_medoids, num_malicious_nodes)
        self.fraction, self.threshold, self.min_medoids = fraction, threshold, min_medoids
        self.num_malicious_nodes = num_malicious_nodes

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        selection = epic_select_updates(stack, self.fraction, self.threshold, self.min_medoids,
                                        self.num_malicious_nodes)
        rows = selection.keep.nonzero().flatten()
        vector = weighted_mean(stack[rows], None if weights is None else torch.as_tensor(weights)[rows])
        return Aggregate(vector, selection.keep.clone(), info={
            "medoids": selection.medoids.tolist(), "sizes": selection.sizes.tolist()})
