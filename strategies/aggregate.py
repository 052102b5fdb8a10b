"""One signature for every aggregation rule, server or peer, and the non-finite policy in one place.

A rule is a pure torch function over a stack of vectors (ByzFL's shape of an aggregator)::

    rule(stack: Tensor[n, D], own_index: int | None, weights: Tensor[n] | None, state: dict) -> Aggregate

- ``stack`` holds the n received vectors (a server: the sampled clients' updates or models; a peer:
  its own vector and its neighbours'). A server rule (``fedepic.extensions.SERVER_RULES``) reads the
  rows as updates (model - global model, or per-step momenta) and returns the aggregated update; every
  registered one is translation-equivariant, weighting included (``strategies/mean.py``), so a stack of
  models gives the aggregated model and the same report, except centered clipping, the geometric
  median and MoNNA (a centre from history or a start at zero: their docstrings).
- ``own_index`` is the receiver's own row at a peer, None at a server. Every peer rule
  (``fedepic.extensions.PEER_RULES``) needs it.
- ``weights`` are per-row weights (FedAvg's example counts, a peer's mixing weights), or None for
  equal weights. A rule that ignores them says so in its docstring.
- ``state`` is the rule's own memory across rounds (a plain dict the rule may update in place; it is
  what a checkpoint saves); stateless rules leave it alone. At a server the round engine also puts the
  round's inputs there for the call only (``fedepic.local_backend.RuleAggregation``, removed again
  after it, never checkpointed): ``state["round"]``, the server round (1-based), which seeded rules
  draw their randomness from (:func:`round_generator`), and ``state["server_update"]``, the server's
  own update on its root set for the rules that need one (FLTrust; ``fedepic.root_set``). At a peer
  the node's engine does the same (``fedepic.peer_node.rule_context``: ``round``, ``rounds``,
  ``node``, ``ids``, the sender of each row, ``loss`` for MOZI, ``tracking`` under gradient
  tracking) around the node's own memory (``fedepic.peer_node.NodeState.rule_state``), which holds
  the per-neighbour records of the stateful rules (GP, exclude: ``strategies/gradient_purification.py``)
  in plain form: ``{name: Tensor}`` groups and config values, checkpointed as they are.
  :func:`aggregate` itself adds ``state["rows"]`` for the call: the index in the given stack of each
  row the rule receives (all of them, or the finite ones in order; below), so that a rule which
  names its rows (GP, by ``state["ids"]``) knows whom it was given and whom the policy left out.

The rule reports what it did in its :class:`Aggregate`: the vector, who it kept whole, for
coordinate-wise rules the share of each row's coordinates it cut, and (filled in by
:func:`aggregate`) which rows were left out for holding NaN or inf. Nothing downstream re-derives it.

:func:`aggregate` is the only place the non-finite policy lives (a row "holds NaN or inf" if any of
its entries does). One policy, stated for both cases:

- **Rows other than own** (every row at a server) that hold NaN or inf are removed before the rule
  runs, like rejected inputs; the rule sees the finite rows only, in their order (``own_index`` and
  ``weights`` remapped, ``state["rows"]`` naming their original indices), and its report is mapped
  back onto the original rows (a removed row: not kept, share 1.0, ``nonfinite`` True).
- **Weights at a peer** (``own_index`` set, weights given): they are first checked (shape [n],
  non-negative, summing to 1; :func:`resolve_weights`), then the removed rows' weights are zeroed and
  the rest, the self weight always among them, rescaled to sum to 1 (:func:`renormalised_weights`);
  this runs on every call, also when every row is finite (it divides by the sum). At a server the
  weights of the finite rows are passed as they are (the rules normalise them).
- **Own at a peer**: a non-finite own row (the node's training diverged) cannot be a centre or a row;
  it is replaced by the coordinate-wise median of the finite other rows
  (``strategies.median.coordinate_median``), which then plays own's part at own's (remapped) index:
  self weight, centre of clipping and of updates. The report marks it ``nonfinite`` and not kept, and
  sets ``own_replaced``.
- **Nothing finite to aggregate**: at a server (no finite row) the vector is None and the receiver
  keeps what it had; at a peer with no finite other row and a non-finite own, the vector is the own
  row as given (non-finite), no rule runs and nothing is kept. A finite own with no finite other row
  is aggregated alone (the rule runs on the one row; every registered peer rule returns it, a
  pre-aggregation step such as clipping may change it).

Example::

    >>> import torch
    >>> def mean(stack, own_index, weights, state):
    ...     return Aggregate(stack.mean(dim=0), kept=torch.ones(len(stack), dtype=torch.bool))
    >>> out = aggregate(mean, torch.tensor([[1.0], [3.0], [float("nan")]]))
    >>> out.vector, out.kept.tolist(), out.nonfinite.tolist()
    (tensor([2.]), [True, True, False], [False, False, True])

At a peer (own at row 0, self weight 0.5; the NaN own is replaced by the median of rows 1 and 2)::

    >>> from strategies.gossip import Gossip
    >>> stack = torch.tensor([[float("nan")], [2.0], [4.0], [float("inf")]])
    >>> out = aggregate(Gossip(), stack, 0, torch.tensor([0.5, 0.2, 0.2, 0.1]))
    >>> out.vector, out.own_replaced, out.kept.tolist(), out.nonfinite.tolist()
    (tensor([3.]), True, [False, True, True, False], [True, False, False, True])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fedepic.seeds import rule_round_seed
from fedepic.vectors import finite_rows


@dataclass
class Aggregate:
    """What one aggregation produced.

    vector : [D], or None when no finite row was left at a server (the receiver keeps its model); at a
        peer with nothing finite, own as given.
    kept : bool [n], rows the rule used as a whole (a coordinate-wise rule keeps every finite row).
    shares : float [n] or None, per row the share of its coordinates a coordinate-wise rule cut.
    nonfinite : bool [n], rows left out for NaN / inf before the rule ran (set by :func:`aggregate`);
        at a peer the own row too when it held NaN / inf.
    info : anything else the rule reports (EPIC's medoids), plain data; row indices in it count the
        rows of the stack the rule ran on (the finite ones, when some were left out).
    own_replaced : at a peer, whether a non-finite own row was replaced by the coordinate median of the
        finite other rows before the rule ran (set by :func:`aggregate`; module docstring).
    """

    vector: Optional[Tensor]
    kept: Tensor
    shares: Optional[Tensor] = None
    nonfinite: Optional[Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)
    own_replaced: bool = False

    @property
    def excluded(self) -> list[bool]:
        return (~self.kept).tolist()

    @property
    def nonfinite_count(self) -> int:
        return 0 if self.nonfinite is None else int(self.nonfinite.sum())

    def server_notes(self) -> tuple[Optional[list[bool]], Optional[list[float]]]:
        """Whom a server round names as left out whole, and the shares of cut coordinates, from this
        report of :func:`aggregate` (both backends: ``fedepic.local_backend``, ``strategies.server``):
        the rows left out for NaN / inf always; otherwise nobody (None) when the rule skipped the round
        (Bulyan below 4f + 3 rows) or cut coordinates only (a median or trimmed mean keeps every finite
        row); else the rows the rule did not keep. With no finite row every row is named.

        >>> Aggregate(torch.tensor([1.0]), torch.tensor([True, False]), torch.tensor([0.0, 1.0]),
        ...           torch.tensor([False, True])).server_notes()
        ([False, True], [0.0, 1.0])
        """
        nonfinite = torch.zeros(len(self.kept), dtype=torch.bool) if self.nonfinite is None else self.nonfinite
        only_nonfinite = nonfinite.tolist() if bool(nonfinite.any()) else None
        if self.vector is None:
            return (self.excluded if bool(nonfinite.all()) else only_nonfinite), None
        shares = None if self.shares is None else self.shares.tolist()
        if shares is not None and bool((self.kept | nonfinite).all()):
            return only_nonfinite, shares
        return self.excluded, shares


Rule = Callable[[Tensor, Optional[int], Optional[Tensor], dict], Aggregate]


_WEIGHT_TOL = 1e-4


def resolve_weights(weights: Optional[Tensor], m: int, like: Tensor) -> Tensor:
    """Return a peer's [m+1] mixing weights, self first (uniform when None), checked to be >= 0 and to
    sum to 1."""
    if weights is None:
        return torch.full((m + 1,), 1.0 / (m + 1), dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if weights.shape != (m + 1,):
        raise ValueError(f"weights must have shape [{m + 1}] (self first), got {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    total = float(weights.sum())
    if abs(total - 1.0) > _WEIGHT_TOL:
        raise ValueError(f"weights must sum to 1, got {total:.6f}")
    return weights


def renormalised_weights(weights: Tensor, keep_mask: Tensor) -> Tensor:
    """Zero the weights of dropped neighbours and rescale self + kept ones to sum to 1.

    ``weights`` [m+1] are self first, ``keep_mask`` [m] the neighbours kept. The self weight (index 0)
    is always kept, so the result is well defined even when every neighbour is dropped (then the node
    keeps its own model). The dropped mass is shared among self and the kept neighbours in proportion
    to their weights, which keeps the rule a convex combination and never lets one remaining neighbour
    gain more than its proportional share.
    """
    keep = torch.as_tensor(keep_mask, dtype=torch.bool, device=weights.device)
    if keep.shape != (weights.shape[0] - 1,):
        raise ValueError(f"keep_mask must have shape [{weights.shape[0] - 1}], got {tuple(keep.shape)}")
    full = torch.cat([torch.ones(1, dtype=torch.bool, device=weights.device), keep])
    kept = torch.where(full, weights, torch.zeros_like(weights))
    total = kept.sum()
    if float(total) <= 0.0:
        # Self weight 0 and nothing kept: fall back to keeping the own model.
        kept = torch.zeros_like(weights)
        kept[0] = 1.0
        return kept
    return kept / total


def self_first(n: int, own_index: int) -> Tensor:
    """The row order [own_index, the other rows in stack order] of an n-row stack (int64 [n])."""
    return torch.cat([torch.tensor([own_index]), torch.arange(n)[torch.arange(n) != own_index]])


def peer_weights(weights: Tensor, own_index: int, finite_others: Tensor, like: Tensor) -> Tensor:
    """A peer's per-row ``weights`` [n] checked and renormalised over own and the rows of
    ``finite_others`` (bool [n], own False), in row order (module docstring); dropped rows get 0."""
    n = finite_others.shape[0]
    if own_index == 0:  # the usual layout: rows are already self first
        return renormalised_weights(resolve_weights(weights, n - 1, like), finite_others[1:])
    order = self_first(n, own_index)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape [{n}] (one per row), got {tuple(w.shape)}")
    ordered = renormalised_weights(resolve_weights(w[order], n - 1, like), finite_others[order[1:]])
    out = torch.empty_like(ordered)
    out[order.to(out.device)] = ordered
    return out


def aggregate(rule: Rule, stack: Tensor, own_index: Optional[int] = None, weights: Optional[Tensor] = None,
              state: Optional[dict] = None) -> Aggregate:
    """``rule`` on the finite rows of ``stack`` [n, D], its report mapped back to all n rows; at a peer
    (``own_index`` set) a non-finite own replaced and the weights renormalised (module docstring).
    Cost: one pass over the stack for the finiteness test, plus the rule (plus, at a peer with a
    non-finite own, a coordinate median of the other rows)."""
    n = stack.shape[0]
    state = {} if state is None else state
    if own_index is not None:
        return _peer_aggregate(rule, stack, int(own_index), weights, state)
    finite = finite_rows(stack) if n else torch.zeros(0, dtype=torch.bool)
    if n == 0 or not bool(finite.any()):
        return Aggregate(None, torch.zeros(n, dtype=torch.bool), torch.ones(n) if n else None, ~finite)
    if bool(finite.all()):
        out = _called(rule, stack, own_index, weights, state, list(range(n)))
        out.nonfinite = torch.zeros(n, dtype=torch.bool)
        return out
    rows = finite.nonzero().flatten()
    inner = _called(rule, stack[rows], None, None if weights is None else weights[rows], state, rows.tolist())
    return _mapped_back(inner, n, rows, ~finite)


ROWS = "rows"  # the state key through which aggregate() names the rows a rule receives (module docstring)


def _called(rule: Rule, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict,
            rows: list[int]) -> Aggregate:
    """``rule(stack, own_index, weights, state)`` with ``state["rows"]`` = ``rows`` (the index in the
    caller's stack of each row of ``stack``) for the call only."""
    state[ROWS] = rows
    try:
        return rule(stack, own_index, weights, state)
    finally:
        state.pop(ROWS, None)


def _mapped_back(inner: Aggregate, n: int, rows: Tensor, nonfinite: Tensor, replaced: Optional[int] = None
                 ) -> Aggregate:
    """``inner``'s report on ``stack[rows]`` as one on all n rows: rows not in ``rows``, and the row
    ``replaced``, are not kept and cut whole."""
    kept = torch.zeros(n, dtype=torch.bool)
    kept[rows] = inner.kept.cpu()
    shares = None
    if inner.shares is not None:
        shares = torch.ones(n, dtype=inner.shares.dtype)
        shares[rows] = inner.shares.cpu()
    if replaced is not None:
        kept[replaced] = False
        if shares is not None:
            shares[replaced] = 1.0
    return Aggregate(inner.vector, kept, shares, nonfinite, inner.info, replaced is not None)


def _peer_aggregate(rule: Rule, stack: Tensor, own_index: int, weights: Optional[Tensor], state: dict) -> Aggregate:
    """:func:`aggregate` at a peer (module docstring)."""
    if stack.dim() != 2:
        raise ValueError(f"stack must be [n, D], got shape {tuple(stack.shape)}")
    n = stack.shape[0]
    if not 0 <= own_index < n:
        raise ValueError(f"own_index {own_index} outside the {n} rows")
    finite = finite_rows(stack).cpu()
    others = finite.clone()
    others[own_index] = False
    own_ok = bool(finite[own_index])
    w = None if weights is None else peer_weights(weights, own_index, others, stack)
    if not own_ok and not bool(others.any()):  # nothing finite to aggregate: own as given
        return Aggregate(stack[own_index].clone(), torch.zeros(n, dtype=torch.bool), torch.ones(n), ~finite)
    if own_ok and bool(finite.all()):
        out = _called(rule, stack, own_index, w, state, list(range(n)))
        out.nonfinite = torch.zeros(n, dtype=torch.bool)
        return out
    used = others.clone()
    used[own_index] = True
    rows = used.nonzero().flatten()
    inner_own = int((rows < own_index).sum())
    inner_stack = stack[rows.to(stack.device)]  # a copy: own may be replaced in it
    if not own_ok:
        from strategies.median import coordinate_median  # median.py builds on this module

        inner_stack[inner_own] = coordinate_median(stack[others.to(stack.device)])
    inner = _called(rule, inner_stack, inner_own, None if w is None else w[rows.to(w.device)], state, rows.tolist())
    return _mapped_back(inner, n, rows, ~finite, None if own_ok else own_index)


def round_generator(seed: int, state: dict, rule: str) -> torch.Generator:
    """The CPU generator of a seeded server rule for this call: seeded by the run's ``seed`` and
    ``state["round"]`` (module docstring), so every round draws afresh and a rerun (or a resumed run)
    draws the same. Raises ValueError, naming ``rule``, when the caller gave no round."""
    rnd = state.get("round")
    if rnd is None:
        raise ValueError(f"{rule}: needs the server round in state['round'] (set by the round engine)")
    return torch.Generator().manual_seed(rule_round_seed(seed, rnd))


def saved_vector(state: dict, key: str, stack: Tensor, rule: str) -> Tensor:
    """A stateful server rule's vector from the previous round (``state[key]``: centered clipping's
    centre, MoNNA's reference), in ``stack``'s dtype and device, or zero before the first round. A
    saved vector of another length than the rows is refused: a checkpoint of another model."""
    saved = state.get(key)
    if saved is None:
        return torch.zeros(stack.shape[1], dtype=stack.dtype, device=stack.device)
    saved = torch.as_tensor(saved)
    if saved.shape != (stack.shape[1],):
        raise ValueError(f"{rule}: the saved {key} has shape {tuple(saved.shape)}, the rows {stack.shape[1]} entries")
    return saved.to(dtype=stack.dtype, device=stack.device)
