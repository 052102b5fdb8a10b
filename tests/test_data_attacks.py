"""Label flipping and BadNets: exact formulas, fractions, determinism and the success metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedepic.attacks.data_attacks import add_trigger, backdoor_patch, backdoor_success, flip_mapping, label_flip


def test_pairs_mode_swaps_c_with_c_minus_one_minus_c():
    y = torch.arange(10)
    new_y, flipped = label_flip(y, 10, mode="pairs")
    assert new_y.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert bool(flipped.all())
    odd, odd_flipped = label_flip(torch.arange(5), 5, mode="pairs")
    assert odd.tolist() == [4, 3, 2, 1, 0]
    assert odd_flipped.tolist() == [True, True, False, True, True]  # the middle class cannot flip


def test_all_mode_shifts_every_label():
    new_y, flipped = label_flip(torch.tensor([0, 1, 2, 2]), 3, mode="all")
    assert new_y.tolist() == [1, 2, 0, 0]
    assert bool(flipped.all())


def test_map_mode_only_touches_listed_classes():
    y = torch.tensor([6, 9, 1, 6, 0])
    new_y, flipped = label_flip(y, 10, mode="map", mapping={6: 9, 9: 6})
    assert new_y.tolist() == [9, 6, 1, 9, 0]
    assert flipped.tolist() == [True, True, False, True, False]
    assert flip_mapping(10, "map", {6: 9})[6] == 9


def test_fraction_flips_that_share_of_flippable_rows_deterministically():
    y = torch.arange(200) % 10
    new_y, flipped = label_flip(y, 10, mode="map", mapping={3: 5}, fraction=0.5,
                                generator=torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 10  # half of the 20 rows of class 3
    assert torch.all(y[flipped] == 3) and torch.all(new_y[flipped] == 5)
    assert torch.equal(new_y[~flipped], y[~flipped])
    again, _ = label_flip(y, 10, mode="map", mapping={3: 5}, fraction=0.5,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, new_y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="bogus"), "mode"),
    (dict(mode="map"), "mapping"),
    (dict(mode="map", mapping={1: 12}), "outside"),
    (dict(fraction=1.5), "fraction"),
    (dict(fraction=0.5), "Generator"),
])
def test_label_flip_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_flip(torch.arange(10), 10, **kwargs)


def test_trigger_is_a_corner_square():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    triggered = add_trigger(x, patch_size=3, patch_value=200)
    assert torch.all(triggered[:, :, 5:, 5:] == 200)
    assert int(triggered.sum()) == 2 * 3 * 9 * 200
    top_left = add_trigger(x, patch_size=2, location="top_left")
    assert torch.all(top_left[:, :, :2, :2] == 255) and int(top_left[:, :, 2:, :].sum()) == 0
    assert int(x.sum()) == 0  # the input is not modified
    with pytest.raises(ValueError, match="location"):
        add_trigger(x, location="middle")
    with pytest.raises(ValueError, match="patch_size"):
        add_trigger(x, patch_size=9)


def test_backdoor_patch_poisons_a_fraction_of_non_target_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 200, (100, 1, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.arange(100) % 4
    new_x, new_y, poisoned = backdoor_patch(x, y, target_label=2, fraction=0.2,
                                            generator=torch.Generator().manual_seed(0))
    assert int(poisoned.sum()) == 15  # 20% of the 75 rows outside class 2
    assert torch.all(y[poisoned] != 2) and torch.all(new_y[poisoned] == 2)
    assert torch.all(new_x[poisoned][:, :, 5:, 5:] == 255)
    assert torch.equal(new_x[~poisoned], x[~poisoned]) and torch.equal(new_y[~poisoned], y[~poisoned])
    assert torch.equal(new_x[poisoned][:, :, :5, :], x[poisoned][:, :, :5, :])


class _TriggerDetector(nn.Module):
    """Predicts class 1 when the bottom-right pixel is bright, class 0 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0, -1, -1] > 0.9).float()
        return torch.stack([1 - bright, bright], 1) + 0 * self.anchor


def test_backdoor_success_counts_triggered_non_target_images():
    x = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert backdoor_success(_TriggerDetector(), x, y, target_label=1, batch_size=4) == 1.0
    assert backdoor_success(_TriggerDetector(), x, y, target_label=1, patch_value=100) == 0.0
    assert backdoor_success(_TriggerDetector(), x, y, target_label=0) == 0.0
