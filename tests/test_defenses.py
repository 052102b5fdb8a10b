"""Control defenses: exact drop counts, determinism, and detection of planted feature outliers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedepic import defenses


class _PixelFeatures(nn.Module):
    """`features` = the flattened image, `classifier` a fixed linear map: lets tests plant outliers."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _planted(seed: int = 0):
    """Two classes of 100 noisy images; 6 rows of class 1 share a strong extra direction."""
    gen = torch.Generator().manual_seed(seed)
    x = (100 + torch.randn(200, 1, 4, 4, generator=gen) * 10).round().clamp(0, 255)
    y = torch.arange(200) % 2
    planted = torch.nonzero(y == 1).flatten()[:6]
    x[planted, 0, 0, :] += 80
    return x.clamp(0, 255).to(torch.uint8), y, planted


def test_random_drop_has_the_count_and_is_seeded():
    first = defenses.random_drop(100, 17, torch.Generator().manual_seed(3))
    assert first.dtype == torch.bool and int(first.sum()) == 17
    assert torch.equal(first, defenses.random_drop(100, 17, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, defenses.random_drop(100, 17, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="count"):
        defenses.random_drop(10, 11, torch.Generator())


def test_highest_loss_drop_picks_the_worst_fitted_rows():
    model = _PixelFeatures(16, 2)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([2.0, 0.0]))  # everything predicted as class 0
    x = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 1])
    mask = defenses.highest_loss_drop(model, x, y, count=3, batch_size=4)
    assert mask.tolist() == (y == 1).tolist()
    assert int(defenses.highest_loss_drop(model, x, y, count=0).sum()) == 0


def test_spectral_signatures_flags_planted_outliers():
    x, y, planted = _planted()
    mask = defenses.spectral_signatures(_PixelFeatures(16, 2), x, y, budget=0.03)
    per_class = 9  # ceil(1.5 * 0.03 * 200)
    assert int(mask.sum()) == 2 * per_class
    assert int(mask[y == 0].sum()) == per_class
    assert bool(mask[planted].all())


def test_spectral_signatures_caps_removal_at_half_a_class():
    x, y, _ = _planted()
    mask = defenses.spectral_signatures(_PixelFeatures(16, 2), x, y, budget=0.9)
    assert int(mask[y == 0].sum()) == 50 and int(mask[y == 1].sum()) == 50
    with pytest.raises(ValueError, match="budget"):
        defenses.spectral_signatures(_PixelFeatures(16, 2), x, y, budget=0.0)


def test_two_means_separates_two_blobs():
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(30, 3, generator=gen), torch.randn(10, 3, generator=gen) + 8])
    assign = defenses.two_means(points.double(), torch.Generator().manual_seed(1))
    assert len(set(assign[:30].tolist())) == 1 and len(set(assign[30:].tolist())) == 1
    assert assign[0] != assign[30]


def test_activation_clustering_drops_the_small_separated_cluster():
    x, y, planted = _planted()
    mask = defenses.activation_clustering(_PixelFeatures(16, 2), x, y, seed=0, components=4)
    assert torch.equal(torch.nonzero(mask).flatten(), planted)
    again = defenses.activation_clustering(_PixelFeatures(16, 2), x, y, seed=0, components=4)
    assert torch.equal(mask, again)
