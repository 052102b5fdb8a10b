"""ByzFL's optimized ALIE and IPM: the attack factor tau chosen by a line search that maximises how far
the defense's aggregate lands from the honest mean.

Paper: Youssef Allouah, Sadegh Farhadkhani, Rachid Guerraoui, Nirupam Gupta, Rafael Pinot, John
Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023
(PMLR 206), https://proceedings.mlr.press/v206/allouah23a.html, arXiv:2302.01772, whose experiments use
these attacks; the implementation they cite is ByzFL's (``byzfl.Optimal_ALittleIsEnough`` and
``byzfl.Optimal_InnerProductManipulation``, https://github.com/LPD-EPFL/byzfl, "developed by the
ByzFL team"). The base attacks: Moran Baruch, Gilad Baruch, Yoav Goldberg, "A Little Is Enough:
Circumventing Defenses For Distributed Learning", NeurIPS 2019, arXiv:1902.06156; Cong Xie, Oluwasanmi
Koyejo, Indranil Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
Manipulation", UAI 2019, arXiv:1903.03936.

With h_1..h_m the honest vectors, mu their mean and sigma their coordinate-wise unbiased std, the
Byzantine vector for a factor tau is ByzFL's

    ALIE_tau = mu + tau * sigma,        IPM_tau = -tau * mu,

and f copies of it join the honest vectors; the objective is

    F(tau) = || agg(pre(h_1, ..., h_m, b_tau, ..., b_tau)) - mu ||_2

with ``pre`` the defense's pre-aggregation steps and ``agg`` its rule (``aggregator``, built from the
registries by :func:`defense_aggregator`). The search is ByzFL's, ``evals`` evaluations of F in all:
start at tau = 0 (one evaluation); expansion: with step delta = 10, try tau + delta, and while it
improves move there and double delta; at the first failure multiply delta by 0.8 and contract: try
tau + delta, move there if it improves, multiply delta by 0.8, until the evaluations are spent. The
attack sends b_tau at the best tau found.

Example (the mean as the rule: F grows with |tau|, so the search keeps expanding)::

    >>> import torch
    >>> honest = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    >>> best_factor(honest, lambda tau: -tau * honest.mean(dim=0), f=1, evals=3,
    ...             aggregator=lambda s: s.mean(dim=0))
    30.0

Cost: ``evals`` runs of the pre-aggregation and the rule on m + f vectors. Deviations: the rule is
called on equal weights (FedAvg's example weights are not passed; ByzFL's aggregators are unweighted
too); a stateful rule (centered clipping's centre, MoNNA's reference) sees a copy of the member's rule
state as the server holds it before the round (``state`` of :func:`defense_aggregator`: the previous
aggregate), every evaluation the same copy, so the search neither sees a zero centre nor moves the
server's; ``start``, ``delta`` and the ratio are ByzFL's defaults (0, 10, 0.8) and not configurable.
At a peer the router crafts one model per receiver against that receiver's defense
(``fedepic.peer_routing.receiver_defense``: its peer rule after pre-aggregation, built from the
registry, with its mixing weights and the round's call context), over its own model and its finite
benign neighbours' with f = its malicious neighbours (``peer_routing.defended_view``); there the rule
gets the receiver's weights and a fresh state, and a stateful rule (gp, exclude) is stood in for by
gossip. Called with no ``aggregator`` the objective uses the plain mean (ByzFL's default aggregator is
the mean too, though with its ``Clipping`` default as pre-aggregation, which fedepic does not add).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fedepic.attacks.model_attacks import column_std, finite_inputs, honest_rows

Aggregator = Callable[[Tensor], Tensor]
START, DELTA, RATIO = 0.0, 10.0, 0.8  # ByzFL's defaults


def mean_aggregator(stack: Tensor) -> Tensor:
    """The plain mean: the objective's rule when the caller passes none."""
    return stack.mean(dim=0)


def deviation(honest: Tensor, byzantine: Tensor, f: int, aggregator: Aggregator) -> float:
    """F: the distance from the honest mean of the aggregate of the honest rows and f copies of ``byzantine``."""
    stack = torch.cat([honest, byzantine.expand(f, -1)]) if f > 0 else honest
    return float(torch.dist(aggregator(stack), honest.mean(dim=0)))


def best_factor(honest: Tensor, attack: Callable[[float], Tensor], *, f: int, evals: int,
                aggregator: Aggregator) -> float:
    """ByzFL's expansion-then-contraction line search over tau (module docstring)."""
    if int(evals) != evals or evals < 1:
        raise ValueError(f"optimized attack: evals must be an integer >= 1, got {evals!r}")
    score = lambda tau: deviation(honest, attack(tau), f, aggregator)  # noqa: E731
    best, best_score, delta, left = START, score(START), DELTA, evals - 1
    while left > 0:  # expansion
        trial = best + delta
        trial_score = score(trial)
        left -= 1
        if trial_score > best_score:
            best, best_score, delta = trial, trial_score, delta * 2
        else:
            delta *= RATIO
            break
    while left > 0:  # contraction
        trial = best + delta
        trial_score = score(trial)
        left -= 1
        if trial_score > best_score:
            best, best_score = trial, trial_score
        delta *= RATIO
    return best


@finite_inputs
@honest_rows(2)
def optimal_alie(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, f: int,
                 evals: int, aggregator: Optional[Aggregator] = None) -> Tensor:
    """``mu + tau * sigma`` at ByzFL's searched tau (module docstring); ``f`` copies are assumed."""
    mu, sigma = honest.mean(dim=0), column_std(honest)
    tau = best_factor(honest, lambda t: mu + t * sigma, f=int(f), evals=evals,
                      aggregator=aggregator or mean_aggregator)
    return mu + tau * sigma


@finite_inputs
@honest_rows(1)
def optimal_ipm(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, f: int,
                evals: int, aggregator: Optional[Aggregator] = None) -> Tensor:
    """``-tau * mu`` at ByzFL's searched tau (module docstring); ``f`` copies are assumed."""
    mu = honest.mean(dim=0)
    tau = best_factor(honest, lambda t: -t * mu, f=int(f), evals=evals, aggregator=aggregator or mean_aggregator)
    return -tau * mu


def defense_aggregator(cfg: Any, rule: str, state: Optional[dict] = None,
                       round_: Optional[int] = None) -> Aggregator:
    """The server's defense as the objective's ``agg(pre(.))``: ``defense.pre_aggregation``'s steps
    then the tensor rule ``rule`` of ``SERVER_RULES``, bound from ``cfg`` as the round engine binds
    them (non-finite rows left out by ``strategies.aggregate.aggregate``). ``state``: the rule's state as
    the server holds it this round, with the round's inputs for the call (``round``, FLTrust's
    ``server_update``) (None: empty); each evaluation gets its own deep copy of it. ``round_``: the
    round the pre-aggregation steps are built for (bucketing's permutation), as the engine builds them."""
    from fedepic.extensions import SERVER_RULES, expected_clients, pre_aggregation_steps
    from strategies.aggregate import aggregate

    built = SERVER_RULES.build(rule, cfg, {"expected": expected_clients(cfg)})
    steps = pre_aggregation_steps(cfg, round_) if round_ is not None else pre_aggregation_steps(cfg)
    snapshot = copy.deepcopy(state or {})

    def defended(stack: Tensor) -> Tensor:
        for step in steps:
            stack = step(stack)
        return aggregate(built, stack, None, None, copy.deepcopy(snapshot)).vector

    return defended
