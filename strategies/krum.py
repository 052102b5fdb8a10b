"""Krum / Multi-Krum selection as a decentralized peer rule (Byzantine-robust aggregation).

Paper: Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
https://papers.nips.cc/paper/6617. Deviation: f adapts to small neighbourhoods (see ``KrumSelect``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, self_first
from strategies.mean import weighted_mean


def pairwise_sq_distances(stack: Tensor) -> Tensor:
    """Squared Euclidean distances [n, n] between rows, computed from exact differences.

    Pairwise differences avoid the cancellation of the ``|a|^2 + |b|^2 - 2ab`` trick, so equal rows
    give exactly 0 and ties are resolved deterministically. n is a neighbourhood (small), and one
    pair at a time keeps the temporary memory at one model vector.
    """
    n = stack.shape[0]
    out = torch.zeros(n, n, dtype=stack.dtype, device=stack.device)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = torch.dist(stack[i], stack[j]).square()
    return out


def krum_scores(stack: Tensor, f: int) -> Tensor:
    """Krum score of each row: sum of squared distances to its ``n - f - 2`` nearest other rows."""
    n = stack.shape[0]
    k = n - f - 2
    if k < 1:
        raise ValueError(f"krum: needs n - f - 2 >= 1 (n = {n} models incl. own, f = {f})")
    dist = pairwise_sq_distances(stack)
    dist.fill_diagonal_(float("inf"))
    return torch.topk(dist, k, dim=1, largest=False).values.sum(dim=1)


class KrumSelect:
    """Krum over own and the neighbours (Blanchard et al., NeurIPS 2017), a peer rule of the one
    signature (``strategies/aggregate.py``).

    Each of the n = m + 1 models is scored by the sum of squared distances to its ``n - f - 2``
    nearest other models, the paper's definition (ByzFL uses ``n - f - 1``; we follow the paper).
    The lowest score wins; ties go to own first, then to the lowest row (the rows are scored in the
    order own, then the others in stack order). ``kept`` marks the selected rows; ``info["selected"]``
    lists them best first.

    Small neighbourhoods (a change from the paper, which assumes n - f - 2 >= 1 everywhere; node
    degrees in a graph differ): at a node with ``n - f - 2 < 1`` the rule uses ``f' = n - 3`` when
    n >= 3, and with n <= 2 (own and at most one neighbour) keeps the node's own model, since one
    neighbour cannot be told apart from own and own is the one model the node trusts. ``multi`` is
    capped at the n models. Non-finite vectors are left out first (``strategies.aggregate.aggregate``),
    and n counts what remains.

    Example: own = [0], neighbours = [[0.1], [5.0], [-0.1]], f = 1: n - f - 2 = 1, scores
    [0.01, 24.01, 0.01, 0.04] -> own (which wins the tie) is returned. With neighbours = [[5.0]]
    the node keeps [0]::

        >>> out = KrumSelect(1)(torch.tensor([[0.0], [0.1], [5.0], [-0.1]]), 0, None, {})
        >>> out.vector, out.kept.tolist()
        (tensor([0.]), [True, False, False, False])

    Parameters
    ----------
    f : int
        Byzantine models tolerated (``defense.byzantine``; the paper's guarantee needs ``n > 2f + 2``;
        the rule only requires ``n - f - 2 >= 1`` so that the score is defined, and adapts below that).
    multi : int
        Multi-Krum's m': average the ``multi`` lowest-score models (1 = plain Krum).
    The mixing weights are ignored (selection is unweighted, as in the paper).
    """


    def __init__(self, f: int, multi: int = 1) -> None:
        if int(f) != f or f < 0:
            raise ValueError(f"krum: f must be a non-negative integer, got {f!r}")
        if int(multi) != multi or multi < 1:
            raise ValueError(f"krum: multi must be a positive integer, got {multi!r}")
        self.f = int(f)
        self.multi = int(multi)

    def select(self, stack: Tensor) -> Tensor:
        """Indices of the selected rows of ``stack``, best first (stable: ties keep lower index)."""
        if self.multi > stack.shape[0]:
            raise ValueError(f"krum: multi = {self.multi} exceeds the {stack.shape[0]} models")
        order = torch.sort(krum_scores(stack, self.f), stable=True).indices
        return order[: self.multi]

    def effective_f(self, n: int) -> int | None:
        """The f used for n models: ``self.f``, lowered to n - 3 when needed; None when n <= 2."""
        if n <= 2:
            return None
        return min(self.f, n - 3)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        if own_index is None:
            raise ValueError("krum (peer): needs own_index, the row of the node's own vector")
        n = stack.shape[0]
        kept = torch.zeros(n, dtype=torch.bool)
        f = self.effective_f(n)
        if f is None:
            kept[own_index] = True
            return Aggregate(stack[own_index].clone(), kept, info={"selected": [own_index]})
        order = self_first(n, own_index)  # own first: it wins ties
        ordered = stack if own_index == 0 else stack[order.to(stack.device)]
        chosen = KrumSelect(f, min(self.multi, n)).select(ordered)
        rows = order[chosen.cpu()]
        kept[rows] = True
        return Aggregate(ordered[chosen].mean(dim=0), kept, info={"selected": rows.tolist()})


DISTANCE_CHUNK = 1 << 16  # columns per float64 block of exact_sq_distances


def exact_sq_distances(stack: Tensor, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """Squared Euclidean distances [n, n] between the rows of ``stack`` [n, D], float64, from exact
    differences: ``torch.cdist`` without the matrix-product shortcut, on float64 copies of ``chunk``
    columns at a time, the blocks' squared distances summed.

    Why: Flower (``flwr.serverapp.strategy.multikrum.compute_distances``) uses
    ``|a|^2 + |b|^2 - 2 a.b`` in the arrays' dtype (float32); on models whose updates are small against
    the weights the cancellation costs it about 3 significant digits (431k coordinates, weights of
    std 0.05, updates of 1e-3: relative errors up to 0.3 %, more than the gaps between honest clients'
    Krum scores). Differences in float64 are exact to ~1e-13 relative and give exactly 0 for equal
    rows (ties stay ties). One ``cdist`` on the whole stack in float64 would need a float64 copy of it
    (4.4 GB for 50 x 11M); the blocks keep that at ``n * chunk`` values. Cost: O(n^2 D) (the float64
    matrix-product form is the same order and measured faster, but is not exact for equal rows:
    docs/results/engines.md).
    """
    n = stack.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64, device=stack.device)
    for start in range(0, stack.shape[1], chunk):
        block = stack[:, start:start + chunk].double()
        out += torch.cdist(block, block, compute_mode="donot_use_mm_for_euclid_dist").square()
    return out


def multikrum_scores(stack: Tensor, num_malicious_nodes: int) -> Tensor:
    """Flower's Krum score per row (float64 [n]): the sum of the squared distances to its
    ``k = max(1, n - f - 2)`` nearest other rows (at most n - 1 of them).

    As ``flwr.serverapp.strategy.multikrum.select_multikrum``: each row of the distance matrix, its own
    zero included, is sorted and entries 1..k summed (with a duplicate row the skipped zero may be the
    duplicate's, the sum is the same). The paper's n - f - 2 neighbours, floored at 1 where Flower
    floors it (``strategies.krum.krum_scores`` refuses n - f - 2 < 1 instead)."""
    n = stack.shape[0]
    k = min(max(1, n - num_malicious_nodes - 2), n - 1)
    if k < 1:
        return torch.zeros(n, dtype=torch.float64)
    return torch.sort(exact_sq_distances(stack), dim=1).values[:, 1:k + 1].sum(dim=1)


def lowest_scores(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` lowest scores (at most all), best first; equal scores go to the lower
    index (a stable sort; Flower's ``np.argsort`` leaves their order unspecified)."""
    return torch.sort(scores, stable=True).indices[:min(count, scores.shape[0])]


def _check_count(name: str, value: int, low: int) -> int:
    if int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class MultiKrumRule:
    """Multi-Krum (Blanchard et al., NeurIPS 2017) as Flower's MultiKrum computes it, a server rule of the
    one signature.

    Score of row i: ``s_i = sum_{j in N_i} |u_i - u_j|^2`` over its ``k = max(1, n - f - 2)`` nearest
    other rows N_i; the m = ``num_nodes_to_select`` rows of lowest score are kept and averaged weighted
    by ``weights`` (Flower's MultiKrum averages them with ``aggregate_arrayrecords``, i.e. weighted by
    ``num-examples``; equal weights when None). m = 1 is Krum (``KrumRule``), whose result is the chosen
    row itself.

    Paper: Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
    https://papers.nips.cc/paper/6617 (arXiv:1703.02757).

    Example (f = 1, n = 4: k = 1 neighbour; the far row scores worst)::

        >>> stack = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
        >>> out = MultiKrumRule(1, 3)(stack, None, torch.tensor([1.0, 1.0, 2.0, 1.0]), {})
        >>> out.vector, out.kept.tolist(), out.info["scores"]
        (tensor([1.7500]), [True, True, True, False], [1.0, 1.0, 4.0, 49.0])

    Parameters
    ----------
    num_malicious_nodes : int
        f, the assumed attackers (``defense.byzantine``).
    num_nodes_to_select : int
        m, rows averaged (capped at n, as Flower's slice caps it).

    Cost: O(n^2 D) for the distances (``exact_sq_distances``) plus O(m D) for the mean. Deviations from
    Flower: distances in float64 from exact differences (Flower: float32 ``|a|^2 + |b|^2 - 2 a.b``,
    see ``exact_sq_distances``); on data whose score gaps exceed Flower's float32 error the selection
    is Flower's, below it Flower's own selection is rounding noise. Equal scores: lowest index. The
    weighted mean is rounded in float32 as Flower's (another order of summation). ``own_index`` is
    ignored; stateless.
    """

    def __init__(self, num_malicious_nodes: int, num_nodes_to_select: int) -> None:
        self.num_malicious_nodes = _check_count("multikrum: num_malicious_nodes", num_malicious_nodes, 0)
        self.num_nodes_to_select = _check_count("multikrum: num_nodes_to_select", num_nodes_to_select, 1)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        n = stack.shape[0]
        scores = multikrum_scores(stack, self.num_malicious_nodes)
        chosen = lowest_scores(scores, self.num_nodes_to_select)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[chosen] = True
        # summed in the order of the scores, as Flower's select_multikrum hands its choice to the average
        rows = torch.as_tensor(chosen)
        vector = stack[chosen[0]].clone() if len(chosen) == 1 else \
            weighted_mean(stack[rows], None if weights is None else torch.as_tensor(weights)[rows])
        return Aggregate(vector, kept, info={"scores": scores.tolist(), "order": chosen.tolist()})


class KrumRule(MultiKrumRule):
    """Krum (Blanchard et al., NeurIPS 2017), Flower's Krum: ``MultiKrumRule`` with m = 1, whose result is
    the lowest-score row itself (``weights`` play no part).

    >>> KrumRule(0)(torch.tensor([[0.0], [1.0], [5.0]]), None, None, {}).kept.tolist()
    [True, False, False]

    Parameters
    ----------
    num_malicious_nodes : int
        f, the assumed attackers (``defense.byzantine``).

    Cost: O(n^2 D). Deviations: as ``MultiKrumRule``.
    """

    def __init__(self, num_malicious_nodes: int) -> None:
        super().__init__(num_malicious_nodes, 1)
