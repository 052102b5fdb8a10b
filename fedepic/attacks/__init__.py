"""Data and model poisoning attacks, plus the glue every mode shares: apply the configured data attack
to a set of training rows, and measure the attack's success on a model.

Attack success per attack:
- label_flip: share of test images of a flipped source class predicted as its flip destination;
- backdoor: share of triggered non-target test images predicted as the backdoor label (BadNets);
- gradient_matching: whether the target image is predicted as the adversarial class (one trial).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import nn

from fedepic.attacks.data_attacks import NoDataAttack, PoisonedRows
from fedepic.config import AttackConfig
from fedepic.extensions import DATA_ATTACKS

__all__ = ["PoisonedRows", "attack_success", "data_attack", "flip_table", "poison_rows"]


def data_attack(attack: AttackConfig) -> NoDataAttack:
    """The configured data attack of ``fedepic.extensions.DATA_ATTACKS``, its parameters bound from ``attack``."""
    return DATA_ATTACKS.build(attack.data, SimpleNamespace(attack=attack))


def flip_table(attack: AttackConfig, num_classes: int) -> Optional[torch.Tensor]:
    """The label every class becomes under the configured attack (None when it changes no label)."""
    return data_attack(attack).flip_table(num_classes)


def poison_rows(attack: AttackConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                fraction: float, seed: int) -> PoisonedRows:
    """Apply the configured data attack to `fraction` of the eligible rows (seeded)."""
    return data_attack(attack).poison(x, y, num_classes, fraction, torch.Generator().manual_seed(seed))


def attack_success(model: nn.Module, attack: AttackConfig, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, target_x: Optional[torch.Tensor] = None,
                   adversarial_class: Optional[int] = None) -> Optional[float]:
    """Success of the configured data attack on `model`; None when no data attack is in force."""
    return data_attack(attack).success(model, test_x, test_y, num_classes, target_x, adversarial_class)


def attack_success_many(predict: Callable[[torch.Tensor], torch.Tensor], count: int, attack: AttackConfig,
                        test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int) -> Optional[list[float]]:
    """:func:`attack_success` of ``count`` models scored together: ``predict`` maps uint8 images
    [B, ...] to logits [count, B, C] (``NoDataAttack.success_many``); None without a data attack.
    Raises TypeError for an attack that scores one model at a time (``batched_success``)."""
    from fedepic.attacks.data_attacks import batched_success

    built = data_attack(attack)
    if not batched_success(built):
        raise TypeError(f"data attack {attack.data!r} defines success() only: score its models one at a time")
    return built.success_many(predict, count, test_x, test_y, num_classes)
