"""Server strategies by name: Flower's own robust aggregators (used as they are) and EPIC.

Every strategy is a `flwr.serverapp.strategy.Strategy`; `TrackedStrategy` runs its
`aggregate_train` for the arrays and also reports which clients it left out, because Flower does not
expose it. The report comes from the tensor server rule of the same name
(``fedepic.extensions.SERVER_RULES``, strategies/aggregate.py's signature), run on the same stack:
its ``kept`` gives ``Outcome.excluded``, its ``shares`` ``Outcome.trimmed_share``. The rules compute
what the Flower strategies compute (tests/test_server_rules.py), so the report is exact:

- krum, multikrum: the rows of lowest Krum score, Flower's score definition; Krum's aggregate equals
  the chosen client's model. The rule's distances are float64 from exact differences, Flower's float32
  ``|a|^2 + |b|^2 - 2ab``: where Flower's rounding exceeds the gaps between scores (models whose
  updates are tiny against the weights), its selection is rounding noise and may differ from the
  report. `TrackedStrategy` checks the rule's vector against Flower's arrays and logs a warning then.
- bulyan: the Multi-Krum selection (kept), and per selected client the share of coordinates where it
  is not among the beta values closest to the median (1.0 for clients the first step left out).
- fedtrimmedavg, fedmedian: per client the share of coordinates whose value falls in the cut tails
  (ranks below f or from n - f on; ties with a kept value count as kept; the median cuts (n - 1) // 2).
  `ExactTrimmedAvg` is Flower's FedTrimmedAvg with its beta set each round from the reply count n so
  that Flower's own `int(beta * n)` cuts exactly f values per side (`exact_trim_beta`); Flower's
  beta = f / n can round below f (e.g. n = 49, f = 1: 1 / 49 * 49 = 0.999..., nothing trimmed).
  No client is excluded as a whole (``excluded`` None).
- epic: EPIC's selection on the same stack (the strategy's ``dropped_history`` holds the same).
- every strategy: a reply whose model vector holds NaN or inf is left out before the strategy runs (one
  such reply would make FedAvg's, FedMedian's and the trimmed mean's coordinates NaN and Krum's
  distances NaN); it is reported excluded (trimmed share 1.0 where shares are reported) and flagged
  in `Outcome.nonfinite`. With no finite reply the round is skipped (arrays None).

Never hand the same replies to two strategies: FedMedian, FedTrimmedAvg and Bulyan pop the arrays
out of the replies they aggregate.

State across rounds (what a checkpoint must hold, `TrackedStrategy.state_dict`): none of the
registered rules carries any into its next aggregation. FedAvg, Krum, MultiKrum, Bulyan and FedMedian
keep only their parameters; ExactTrimmedAvg sets beta afresh before each aggregation; EpicServer's
`dropped_history` is never read back (saved anyway, so that a resumed strategy equals the uninterrupted
one). The tensor rules are stateless (each call gets an empty state). Flower's FedAvgM (server
momentum) and the FedOpt family (FedAdam, FedYogi, FedAdagrad: current_arrays, m_t, v_t) do carry
state; registering one of them needs its state in `state_dict` (tests/test_epic_server.py checks that
the registered ones need nothing else).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import logging
from typing import Any, Optional

import torch
from torch import Tensor

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedTrimmedAvg, Strategy
from strategies.aggregate import Rule, aggregate
from strategies.epic_server import EpicServer, record_vector

ID_KEYS = ("partition-id", "malicious")  # per-client labels, not quantities: never averaged


def mean_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the numeric client metrics, leaving out ids and negative "unknown" sentinels."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or key in ID_KEYS or isinstance(value, list) or value < 0:
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


def exact_trim_beta(n: int, f: int) -> float:
    """A beta in [0, 0.5) with ``int(beta * n) == f`` exactly, for Flower's ``trim_mean``.

    ``f / n`` does not do it: the float product ``(f / n) * n`` can fall just below f (368 of the
    valid (n, f) pairs with n <= 200, e.g. (49, 1)), and ``int`` then cuts f - 1. ``(f + 0.25) / n``
    puts the product a quarter away from every integer, far beyond float rounding, and stays below
    0.5 for every valid f (2f < n, so f + 0.25 < n / 2).

    >>> int(exact_trim_beta(49, 1) * 49)
    1
    """
    if not (n >= 1 and 0 <= f and 2 * f < n):
        raise ValueError(f"trimmed mean: needs 0 <= 2f < n, got n={n}, f={f}")
    return (f + 0.25) / n if f else 0.0


class ExactTrimmedAvg(FedTrimmedAvg):
    """Flower's FedTrimmedAvg cutting exactly ``num_trim`` values per side and coordinate.

    Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, "Byzantine-robust distributed
    learning: towards optimal statistical rates", ICML 2018): drop the f largest and f smallest values
    of the n replies, average the other n - 2f. Before each aggregation beta is set to
    ``exact_trim_beta(n, min(num_trim, (n - 1) // 2))`` for the round's n valid replies, so fewer
    replies than expected lower the cut instead of failing the round (behaviour change from a fixed beta).
    """

    def __init__(self, num_trim: int, **kwargs) -> None:
        if int(num_trim) != num_trim or num_trim < 0:
            raise ValueError(f"fedtrimmedavg: num_trim must be a non-negative integer, got {num_trim!r}")
        super().__init__(beta=0.0, **kwargs)
        self.num_trim = int(num_trim)

    def beta_for(self, n: int) -> float:
        return exact_trim_beta(max(n, 1), min(self.num_trim, (max(n, 1) - 1) // 2))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        self.beta = self.beta_for(sum(not m.has_error() for m in replies))
        return super().aggregate_train(server_round, replies)


@dataclass
class Outcome:
    """What one aggregation produced: arrays (None when the rule skipped the round) and per-reply notes."""

    arrays: Optional[ArrayRecord]
    metrics: Optional[MetricRecord]
    excluded: Optional[list[bool]]  # per valid reply (in reply order); None when the rule excludes nobody whole
    trimmed_share: Optional[list[float]] = None
    nonfinite: Optional[list[bool]] = None  # per valid reply: its vector held NaN / inf and was left out

    @property
    def nonfinite_count(self) -> int:
        return sum(self.nonfinite or [])


REPORT_RTOL = 1e-4  # the rule's vector against Flower's arrays: float32 summation orders differ far below this


@dataclass
class TrackedStrategy:
    """A named Flower strategy, and the tensor rule of the same name for the report of whom it left out
    (module docstring)."""

    name: str
    strategy: Strategy
    rule: Rule

    def state_dict(self) -> dict:
        """What the strategy carries from one round to the next, as plain data (module docstring)."""
        if isinstance(self.strategy, EpicServer):
            return {"dropped_history": {r: list(ids) for r, ids in self.strategy.dropped_history.items()}}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.strategy, EpicServer):
            self.strategy.dropped_history = {int(r): list(ids) for r, ids in state["dropped_history"].items()}

    def aggregate(self, server_round: int, replies: list[Message], stack: Tensor) -> Outcome:
        """`strategy.aggregate_train(replies)`; `stack` holds the valid replies' model vectors in reply order.

        The rule runs through ``strategies.aggregate.aggregate``, the one place of the non-finite policy:
        its report says which rows held NaN / inf, and the Flower strategy gets the other replies only
        (module docstring). The rule's report on all rows gives the outcome's notes."""
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return Outcome(*self.strategy.aggregate_train(server_round, replies), None, None, [])
        key = getattr(self.strategy, "weighted_by_key", "num-examples")
        weights = torch.tensor([float(next(iter(m.content.metric_records.values()))[key]) for m in valid],
                               dtype=torch.float64)
        report = aggregate(self.rule, stack, None, weights, {})
        nonfinite = report.nonfinite.tolist()
        excluded, shares = report.server_notes()
        if all(nonfinite):  # nothing finite: the round is skipped, every reply named
            return Outcome(None, None, excluded, None, nonfinite)
        left_out = {id(m) for m, bad in zip(valid, nonfinite) if bad}
        arrays, metrics = self.strategy.aggregate_train(server_round, [m for m in replies if id(m) not in left_out])
        if (report.vector is None) != (arrays is None):
            logging.getLogger("fedepic").warning(
                "%s, round %d: the server rule %s the round, Flower's strategy %s it", self.name, server_round,
                *(("skipped", "aggregated") if report.vector is None else ("aggregated", "skipped")))
        if arrays is None:  # Flower aggregated nothing: only the non-finite replies are named
            return Outcome(None, metrics, nonfinite if any(nonfinite) else None, None, nonfinite)
        if report.vector is not None:
            self._check(server_round, report.vector, record_vector(arrays))
        return Outcome(arrays, metrics, excluded, shares, nonfinite)

    def _check(self, server_round: int, vector: Tensor, flower: Tensor) -> None:
        """Warn when the rule's vector is not Flower's aggregate (its report may then not be Flower's choice)."""
        scale = float(flower.abs().max()) if flower.numel() else 0.0
        gap = float((vector - flower).abs().max()) if flower.numel() else 0.0
        if not gap <= REPORT_RTOL * max(scale, 1e-12):
            logging.getLogger("fedepic").warning(
                "%s, round %d: the server rule's vector differs from Flower's arrays by %.3g (largest value %.3g);"
                " its report of the excluded clients may not be Flower's selection", self.name, server_round,
                gap, scale)


def flower_settings(cfg: Any) -> dict[str, Any]:
    """The keyword arguments every Flower strategy of a run gets: sampling, no Flower-side evaluation
    (the server evaluates the global model itself) and the client-metric average."""
    return dict(fraction_train=cfg.clients.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                min_evaluate_nodes=0, min_available_nodes=cfg.clients.count, train_metrics_aggr_fn=mean_client_metrics)


def build_server_strategy(name: str, cfg: Any) -> TrackedStrategy:
    """A fresh strategy `name` of ``fedepic.extensions.SERVER_STRATEGIES`` and its rule of
    ``SERVER_RULES``, both bound from `cfg` by signature; never share one between runs or members."""
    from fedepic.extensions import SERVER_RULES, SERVER_STRATEGIES

    if SERVER_STRATEGIES.has(name, "reference"):
        raise ValueError(f"{name!r} is a reference trained in-process, not a Flower strategy")
    strategy = SERVER_STRATEGIES.build(name, cfg, flower_settings(cfg))
    return TrackedStrategy(name, strategy, SERVER_RULES.build(name, cfg))
