"""Krum / Multi-Krum selection as a decentralized peer rule (Byzantine-robust aggregation).

Paper: Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
https://papers.nips.cc/paper/6617. Deviation: f adapts to small neighbourhoods (see ``KrumSelect``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from strategies.finite import split_finite


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
    """Krum over ``{own} ∪ neighbours`` (Blanchard et al., NeurIPS 2017).

    Each of the n = m + 1 models is scored by the sum of squared distances to its ``n - f - 2``
    nearest other models, the paper's definition (ByzFL uses ``n - f - 1``; we follow the paper).
    The lowest score wins; ties go to the lowest index, so ``own`` (index 0) wins a tie.

    Small neighbourhoods (a change from the paper, which assumes n - f - 2 >= 1 everywhere; node
    degrees in a graph differ): at a node with ``n - f - 2 < 1`` the rule uses ``f' = n - 3`` when
    n >= 3, and with n <= 2 (own and at most one neighbour) keeps the node's own model, since one
    neighbour cannot be told apart from own and own is the one model the node trusts. ``multi`` is
    capped at the n models. Non-finite vectors are left out first (``strategies/finite.py``), and n
    counts what remains.

    Example: own = [0], neighbours = [[0.1], [5.0], [-0.1]], f = 1: n - f - 2 = 1, scores
    [0.01, 24.01, 0.01, 0.04] -> own (lowest index of the tie) is returned. With neighbours = [[5.0]]
    the node keeps [0].

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

    def apply(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None):
        inp = split_finite(own, neighbours, None)
        stack = torch.cat([inp.own.unsqueeze(0), inp.neighbours])
        f = self.effective_f(stack.shape[0])
        if f is None:
            return inp.own.clone(), inp.report
        adapted = KrumSelect(f, min(self.multi, stack.shape[0]))
        return stack[adapted.select(stack)].mean(dim=0), inp.report

    def __call__(self, own: Tensor, neighbours: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.apply(own, neighbours, weights)[0]
