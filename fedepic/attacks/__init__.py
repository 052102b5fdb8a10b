"""Data and model poisoning attacks, plus the glue every mode shares: apply the configured data attack
to a set of training rows, and measure the attack's success on a model.

Attack success per attack:
- label_flip: share of test images of a flipped source class predicted as its flip destination;
- backdoor: share of triggered non-target test images predicted as the backdoor label (BadNets);
- gradient_matching: whether the target image is predicted as the adversarial class (one trial).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fedepic.attacks.data_attacks import backdoor_patch, backdoor_success, flip_mapping, label_flip
from fedepic.config import AttackConfig
from fedepic.train import predict_logits


@dataclass
class PoisonedRows:
    x: torch.Tensor  # uint8 images after the attack
    y: torch.Tensor  # labels after the attack
    poisoned: torch.Tensor  # bool mask of the rows the attack changed


def flip_table(attack: AttackConfig, num_classes: int) -> torch.Tensor:
    mapping = {int(a): int(b) for a, b in attack.flip_map} if attack.flip == "map" else None
    return flip_mapping(num_classes, attack.flip, mapping)


def poison_rows(attack: AttackConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                fraction: float, seed: int) -> PoisonedRows:
    """Apply a label-flip or backdoor attack to `fraction` of the eligible rows (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    if attack.data == "label_flip":
        mapping = {int(a): int(b) for a, b in attack.flip_map} if attack.flip == "map" else None
        new_y, flipped = label_flip(y, num_classes, attack.flip, mapping, fraction, gen)
        return PoisonedRows(x, new_y, flipped)
    if attack.data == "backdoor":
        new_x, new_y, mask = backdoor_patch(x, y, attack.backdoor_label, fraction, attack.patch_size, generator=gen)
        return PoisonedRows(new_x, new_y, mask)
    return PoisonedRows(x, y, torch.zeros(len(y), dtype=torch.bool))


@torch.no_grad()
def label_flip_success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, table: torch.Tensor,
                       batch_size: int = 1024) -> float:
    sources = table != torch.arange(len(table))
    rows = sources[y]
    if not bool(rows.any()):
        return float("nan")
    pred = predict_logits(model, x[rows], batch_size).argmax(1).cpu()
    return (pred == table[y[rows]]).float().mean().item()


def attack_success(model: nn.Module, attack: AttackConfig, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, target_x: Optional[torch.Tensor] = None,
                   adversarial_class: Optional[int] = None) -> Optional[float]:
    """Success of the configured data attack on `model`; None when no data attack is in force."""
    if attack.data == "label_flip":
        return label_flip_success(model, test_x, test_y, flip_table(attack, num_classes))
    if attack.data == "backdoor":
        return backdoor_success(model, test_x, test_y, attack.backdoor_label, attack.patch_size)
    if attack.data == "gradient_matching" and target_x is not None:
        pred = predict_logits(model, target_x).argmax(1)[0].item()
        return float(pred == adversarial_class)
    return None
