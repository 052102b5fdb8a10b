"""Metrics shared by every mode: attack success with its standard error, and consensus distance."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def success_rate(outcomes: Sequence[bool]) -> tuple[float, float]:
    """Fraction of successful trials and its binomial standard error sqrt(p(1-p)/n)."""
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(bool(o) for o in outcomes) / n
    return p, math.sqrt(p * (1 - p) / n)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def consensus_distance(models: torch.Tensor) -> float:
    """Mean squared distance of node models [n, D] to their average (Kong et al., ICML 2021)."""
    if len(models) == 0:
        return float("nan")
    centred = models - models.mean(0, keepdim=True)
    return centred.pow(2).sum(1).mean().item()
