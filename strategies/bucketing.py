"""Bucketing, a pre-aggregation step (``fedepic.extensions.PRE_AGGREGATION``, ``strategies/preaggregation.py``).

Paper: Sai Praneeth Karimireddy, Lie He, Martin Jaggi, "Byzantine-Robust Learning on Heterogeneous
Datasets via Bucketing", ICLR 2022, https://openreview.net/forum?id=jXKKDEi5vJt (arXiv:2006.09365).

Formula (the paper's Algorithm 1, ByzFL's ``Bucketing(s)``): draw a random permutation pi of the n
inputs, cut it into ceil(n / s) buckets of s consecutive inputs (the last one holds the rest), and
replace the inputs by the buckets' means

    y_b = 1 / |B_b| * sum_{i in B_b} x_{pi(i)},   B_b = {(b - 1) s + 1, ..., min(b s, n)},

which the robust rule then aggregates. Mixing s inputs per bucket lowers the heterogeneity the rule
sees by about s, while one Byzantine input spoils at most one bucket.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fedepic.seeds import permutation_seed
from fedepic.vectors import finite_rows


def bucket_of_rows(permutation: Tensor, s: int) -> Tensor:
    """Per row (int64 [n]), the bucket it falls in when ``permutation`` [n] (pi: position -> row) is cut
    into buckets of ``s`` consecutive positions."""
    bucket = torch.empty_like(permutation)
    bucket[permutation] = torch.arange(permutation.shape[0]) // s
    return bucket


def bucket_means(vectors: Tensor, permutation: Tensor, s: int) -> Tensor:
    """The paper's (and ByzFL's) output: the ceil(n / s) bucket means [ceil(n / s), D] of the rows of
    ``vectors`` [n, D] taken in the order ``permutation``, s at a time (the last bucket the rest)."""
    if not s >= 1:
        raise ValueError(f"bucketing: the bucket size must be >= 1, got {s}")
    ordered = vectors[permutation.to(vectors.device)]
    return torch.stack([chunk.mean(dim=0) for chunk in torch.split(ordered, s)])


def bucketed_rows(vectors: Tensor, permutation: Tensor, s: int) -> Tensor:
    """Every row of ``vectors`` [n, D] replaced by the mean of its bucket (``bucket_means``), [n, D]."""
    means = bucket_means(vectors, permutation, s)
    return means[bucket_of_rows(permutation, s).to(means.device)]


class Bucketing:
    """Bucketing as a step (Karimireddy, He, Jaggi, ICLR 2022): each row becomes the mean of its bucket.

    The permutation is drawn from a torch generator seeded explicitly (:func:`permutation_seed`),
    independent of the inputs as in the paper. At a server the step is built every round with the
    round (``fedepic.extensions.pre_aggregation_steps(cfg, rnd)``) and draws from
    ``fedepic.seeds.permutation_seed(seed, round)``, the server taken as node ``SERVER_NODE`` (not
    ``seed * 1_000_003 + round``, which seeds the server rules' own draws). At a peer the step is built
    once per run (on Ray, at every call) without a round; ``strategies.preaggregation.PreAggregated`` binds
    it for each call
    (:meth:`for_call`) to the round and the receiving node's id that the peer engines put in the rule's
    state (``fedepic.peer_node.rule_context``), and it draws from
    ``(seed * 1_000_003 + round) * 1_000_033 + node``: a new permutation for each node and round, the
    same on both engines and after a resume, with no state to keep. A step with no round (a peer step
    called outside the engines) raises ValueError.

    Example (s = 2, the permutation (2, 0, 1): buckets {x_2, x_0} and {x_1})::

        >>> x = torch.tensor([[0.0], [10.0], [4.0]])
        >>> bucket_means(x, torch.tensor([2, 0, 1]), 2)
        tensor([[ 2.],
                [10.]])
        >>> bucketed_rows(x, torch.tensor([2, 0, 1]), 2)
        tensor([[ 2.],
                [10.],
                [ 2.]])

    Parameters
    ----------
    s : int
        The bucket size (>= 1; ``defense.bucket_size``; 1 leaves the rows as they are).
    seed : int
        The run's seed (``seed``).
    round : int or None
        The server round (the pre-aggregation context); None at a peer until :meth:`for_call` binds it.
    node : int or None
        The receiving peer's id (bound by :meth:`for_call`), None at a server.

    Cost: O(n D) time and memory (the permuted copy and the means), O(n) for the permutation.

    Deviation (the step keeps the stack's shape): the paper hands the robust rule the ceil(n / s)
    bucket means; here each of the n rows is replaced by its bucket's mean, so the rule sees every
    bucket mean as many times as the bucket has members. Why: fedepic's rules report per input row
    (``kept``, ``shares``), a peer's rule needs its own row and mixing weights, and the Flower backend
    hands one row per client to Flower's strategy; a step that changed the row count would break all
    three. What it changes: rules that weigh rows equally (mean, geometric median, centered clipping,
    coordinate median) give the paper's result where every bucket is full (s divides n), and weigh a
    short last bucket by its size otherwise; rules that count rows (trimmed mean, Krum, MoNNA, NNM)
    see f bad buckets as s f bad rows, so set ``defense.byzantine`` / ``defense.trim`` to s f for the
    paper's setting (inferred: the bad fraction, f / (n / s) there and s f / n here, is the same).
    Rows holding NaN / inf are left as they are and out of the buckets (a peer's stack may hold them;
    the rule leaves them out), and the permutation is drawn over the finite rows.
    """

    def __init__(self, s: int, seed: int, round: Optional[int] = None, node: Optional[int] = None) -> None:
        if int(s) != s or s < 1:
            raise ValueError(f"bucketing: the bucket size must be an integer >= 1, got {s!r}")
        self.s, self.seed, self.round, self.node = int(s), int(seed), round, node

    def for_call(self, context: Mapping[str, Any]) -> "Bucketing":
        """At a peer, this step for one call: bound to ``context["round"]`` and ``context["node"]`` (the
        rule's call state); a step already built with a round (a server's) is returned as it is."""
        if self.round is not None or context.get("round") is None:
            return self
        return Bucketing(self.s, self.seed, int(context["round"]), context.get("node"))

    def permutation(self, vectors: Tensor) -> Tensor:
        """The permutation of the rows of ``vectors`` (see the class docstring for its seed)."""
        if self.round is None:
            raise ValueError("bucketing: no round to seed the permutation with (a server builds the step with "
                             "its round; a peer rule gets it in state['round'] from the engine)")
        generator = torch.Generator().manual_seed(permutation_seed(self.seed, self.round, self.node))
        return torch.randperm(vectors.shape[0], generator=generator)

    def __call__(self, vectors: Tensor, /) -> Tensor:
        ok = finite_rows(vectors).to(vectors.device)
        count = int(ok.sum())
        if self.s == 1 or count == 0:
            return vectors
        if count == vectors.shape[0]:
            return bucketed_rows(vectors, self.permutation(vectors), self.s)
        out = vectors.clone()
        rows = vectors[ok]
        out[ok] = bucketed_rows(rows, self.permutation(rows), self.s)
        return out
