"""Metrics shared by every mode: attack success with its standard error, consensus distance,
and the precision / recall of a detector."""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional, Sequence

import torch


def success_rate(outcomes: Sequence[bool]) -> tuple[float, float]:
    """Fraction of successful trials and its binomial standard error sqrt(p(1-p)/n)."""
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(bool(o) for o in outcomes) / n
    return p, math.sqrt(p * (1 - p) / n)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error, sample std (ddof 1) / sqrt(n); NaN for a single value (one
    value shows no spread: a 0 would claim a certainty nobody measured)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def consensus_distance(models: torch.Tensor) -> float:
    """Mean squared distance of node models [n, D] to their average (Kong et al., ICML 2021)."""
    if len(models) == 0:
        return float("nan")
    centred = models - models.mean(0, keepdim=True)
    return centred.pow(2).sum(1).mean().item()


def detection_metrics(detected: Iterable[Hashable], malicious: Iterable[Hashable]) -> dict[str, float]:
    """Precision / recall / F1 of a detection against the ground truth.

    Items can be neighbour ids for one node, or ``(node, neighbour)`` pairs for a whole network
    (only pairs where the neighbour is actually adjacent should be in ``malicious``). Conventions
    for empty sets: precision is 1 when nothing was detected (no false alarm), recall is 1 when
    there was nothing to detect.
    """
    det, mal = set(detected), set(malicious)
    tp, fp, fn = len(det & mal), len(det - mal), len(mal - det)
    precision = tp / (tp + fp) if det else 1.0
    recall = tp / (tp + fn) if mal else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def poison_stats(dropped: torch.Tensor, poisoned: torch.Tensor) -> dict:
    """What a defense's drops (bool [n]) did to the poisons (bool [n]): poisons_dropped, poison_recall
    (0.0 without poisons), clean_dropped and clean_drop_rate (0.0 without clean rows), exact ratios of
    integer counts. Every mode reports its drops with it."""
    dropped, poisoned = dropped.bool().cpu(), poisoned.bool().cpu()
    poisons, clean = int(poisoned.sum()), int((~poisoned).sum())
    hit, miss = int((dropped & poisoned).sum()), int((dropped & ~poisoned).sum())
    return {"poisons_dropped": hit, "poison_recall": hit / poisons if poisons else 0.0,
            "clean_dropped": miss, "clean_drop_rate": miss / clean if clean else 0.0}


# The one wording of divergence in every mode's warnings and docs (fedepic.metrics.diverged).
DIVERGED_MEANS = "non-finite weights or loss, or every test image predicted as one class"


def nonfinite_model(weights_finite: bool, evaluation: Optional[Mapping[str, Any]] = None) -> bool:
    """Non-finite weights, or an evaluation (fedepic.train.logit_metrics) with a non-finite loss: a
    state no training step leaves again, so a run reports the first round it happened in."""
    if not weights_finite:
        return True
    loss = None if evaluation is None else evaluation.get("loss")
    return loss is not None and not math.isfinite(float(loss))


def diverged(weights_finite: bool, evaluation: Optional[Mapping[str, Any]] = None) -> bool:
    """A final model diverged: :func:`nonfinite_model`, or its evaluation says it collapsed to one
    predicted class (train.lr=1e6 can leave finite weights that predict one class for everything: 10%
    accuracy on MNIST, no NaN anywhere). A collapse counts at the end of a run only: a node trained on
    one label can predict one class for a while and recover."""
    return nonfinite_model(weights_finite, evaluation) or bool((evaluation or {}).get("collapsed"))


def diverged_members(rows: Sequence[Mapping[str, Any]], name_key: str,
                     when: Callable[[Mapping[str, Any]], Optional[str]]) -> list[str]:
    """The members whose rows say they diverged (``when(row)``: where, e.g. "from round 3", or None),
    each also a warning line on stderr in the one wording of every mode (:data:`DIVERGED_MEANS`)."""
    names = []
    for row in rows:
        where = when(row)
        if where:
            names.append(str(row[name_key]))
            print(f"fedepic: warning: {row[name_key]} diverged ({DIVERGED_MEANS}) {where}", file=sys.stderr)
    return names


def diverged_from_round(row: Mapping[str, Any]) -> Optional[str]:
    """:func:`diverged_members`'s ``when`` for the rows of federated and decentralized runs: non-finite
    from ``diverged_round``, or ``collapsed`` at the last evaluation."""
    first = row.get("diverged_round")
    if first is not None:
        return f"from round {first}"
    return "at the last evaluation" if row.get("collapsed") else None
