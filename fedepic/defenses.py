"""Control defenses for the centralized comparison with EPIC: filters that drop training rows.

Each function returns a bool drop mask over the rows it is given (the rows still kept by the
caller). `random_drop` and `highest_loss_drop` drop exactly `count` rows, so they can be matched to
the number of rows EPIC dropped; the two feature-space detectors decide their own count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_count(n: int, count: int) -> None:
    if not 0 <= count <= n:
        raise ValueError(f"count must be in 0..{n}, got {count}")


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def no_drop(n: int) -> torch.Tensor:
    """Drop nothing (the undefended baseline)."""
    return torch.zeros(n, dtype=torch.bool)


def random_drop(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Drop `count` of `n` rows uniformly at random: the control for "any removal helps"."""
    _check_count(n, count)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:count]] = True
    return mask


@torch.no_grad()
def per_sample_loss(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor,
    batch_size: int = 1024, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Cross-entropy of every row, eval mode, no augmentation; float [N] on the CPU."""
    device = _device_of(model, device)
    model.eval()
    losses = [
        F.cross_entropy(model(x_uint8[s:s + batch_size].to(device).float() / 255),
                        y[s:s + batch_size].to(device), reduction="none").cpu()
        for s in range(0, x_uint8.shape[0], batch_size)
    ]
    return torch.cat(losses) if losses else torch.zeros(0)


def highest_loss_drop(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, count: int,
    batch_size: int = 1024, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Drop the `count` rows with the highest loss under `model` (poisons are often hard examples)."""
    _check_count(x_uint8.shape[0], count)
    mask = torch.zeros(x_uint8.shape[0], dtype=torch.bool)
    if count:
        mask[torch.topk(per_sample_loss(model, x_uint8, y, batch_size, device), count).indices] = True
    return mask


@torch.no_grad()
def penultimate_features(
    model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 1024, device: torch.device | str | None = None,
) -> torch.Tensor:
    """`model.features` of every row (eval mode), float [N, D] on the CPU."""
    device = _device_of(model, device)
    model.eval()
    chunks = [model.features(x_uint8[s:s + batch_size].to(device).float() / 255).float().cpu()
              for s in range(0, x_uint8.shape[0], batch_size)]
    return torch.cat(chunks)


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Outlier score of each row: squared projection of the centred row on the top singular vector."""
    centred = features - features.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    return (centred.double() @ vh[0]).pow(2).float()


def spectral_signatures(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, budget: float, *,
    overestimation: float = 1.5, batch_size: int = 1024, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Spectral signatures (Tran, Li, Madry, NeurIPS 2018) on penultimate features.

    Per class: centre the features, take the top right singular vector, score rows by their
    squared projection and drop the `overestimation` x expected-poison highest. As in the Witches'
    Brew benchmark's filtering defense, the expected poisons of a class are budget * N (the whole
    budget, since the poisoned class is unknown), capped at half of the class.
    """
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    if overestimation <= 0:
        raise ValueError(f"overestimation must be > 0, got {overestimation}")
    features = penultimate_features(model, x_uint8, batch_size, device)
    y = y.cpu()
    per_class = math.ceil(overestimation * budget * y.numel())
    mask = torch.zeros(y.numel(), dtype=torch.bool)
    for label in torch.unique(y):
        rows = torch.nonzero(y == label).flatten()
        k = min(per_class, rows.numel() // 2)
        if k == 0:
            continue
        mask[rows[torch.topk(spectral_scores(features[rows]), k).indices]] = True
    return mask


def two_means(points: torch.Tensor, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k=2 and k-means++ seeding; returns the cluster id (0/1) of every row.

    Written by hand so the core needs no scikit-learn; k=2 on a few hundred dimensions is tiny.
    """
    first = points[torch.randint(points.shape[0], (1,), generator=generator)]
    dist = (points - first).pow(2).sum(1)
    if float(dist.sum()) == 0.0:
        return torch.zeros(points.shape[0], dtype=torch.long)
    second = points[torch.multinomial(dist / dist.sum(), 1, generator=generator)]
    centres = torch.cat([first, second])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        updated = torch.stack([
            points[assign == c].mean(0) if bool((assign == c).any()) else centres[c] for c in range(2)
        ])
        if torch.equal(updated, centres):
            break
        centres = updated
    return torch.cdist(points, centres).argmin(1)


def activation_clustering(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, seed: int,
    components: int = 10, max_fraction: float = 0.35, batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Activation clustering (Chen et al., "Detecting Backdoor Attacks ... by Activation Clustering", 2018).

    Per class: reduce the centred penultimate features to `components` dimensions, split them in
    two with k-means and drop the smaller cluster when it holds less than `max_fraction` of the
    class (the paper's relative-size test). PCA stands in for the paper's ICA: both keep the
    leading directions along which a poisoned sub-population separates, and PCA is deterministic.
    """
    if not 0.0 < max_fraction < 0.5:
        raise ValueError(f"max_fraction must be in (0, 0.5), got {max_fraction}")
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    features = penultimate_features(model, x_uint8, batch_size, device)
    y = y.cpu()
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(y.numel(), dtype=torch.bool)
    for label in torch.unique(y):
        rows = torch.nonzero(y == label).flatten()
        if rows.numel() < 4:
            continue
        centred = (features[rows] - features[rows].mean(0, keepdim=True)).double()
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        assign = two_means(centred @ vh[:components].T, generator)
        sizes = torch.bincount(assign, minlength=2)
        small = int(sizes.argmin())
        if int(sizes[small]) < max_fraction * rows.numel():
            mask[rows[assign == small]] = True
    return mask
