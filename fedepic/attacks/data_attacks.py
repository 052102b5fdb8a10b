"""Simple data poisoning attacks: label flipping and the BadNets backdoor patch.

Used by malicious clients in the federated and decentralized simulations (applied to their own
rows before local training) and by the centralized baselines. Images are uint8 [N,C,H,W].

The classes at the end (``NoDataAttack``, ``LabelFlip``, ``Backdoor``) are what the registry
``fedepic.extensions.DATA_ATTACKS`` builds: each poisons rows and measures its own success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

FLIP_MODES = ("pairs", "all", "map")
LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left")


def flip_mapping(num_classes: int, mode: str = "pairs", mapping: dict[int, int] | None = None) -> torch.Tensor:
    """Lookup table [C] of the new label of every class.

    pairs: c <-> C-1-c (0<->9, 1<->8, ... for C=10; with odd C the middle class keeps its label),
        the "reverse" flip of Fang et al. (USENIX Security 2020) and Tolpegin et al. (ESORICS 2020).
    all:   c -> (c+1) mod C, so that every class (none excepted) gets a wrong label.
    map:   an explicit {source: destination} dict, e.g. {6: 9, 9: 6}; unlisted classes are kept.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    classes = torch.arange(num_classes)
    if mode == "pairs":
        return num_classes - 1 - classes
    if mode == "all":
        return (classes + 1) % num_classes
    if mode == "map":
        if not mapping:
            raise ValueError("label_flip mode 'map' needs a non-empty mapping {source: destination}")
        table = classes.clone()
        for src, dst in mapping.items():
            if not (0 <= int(src) < num_classes and 0 <= int(dst) < num_classes):
                raise ValueError(f"label mapping {src}->{dst} outside classes 0..{num_classes - 1}")
            table[int(src)] = int(dst)
        return table
    raise ValueError(f"unknown label flip mode {mode!r}; choose one of {', '.join(FLIP_MODES)}")


def _random_subset(candidates: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """round(fraction * len) rows of `candidates` (bool mask), drawn without replacement."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rows = torch.nonzero(candidates).flatten()
    count = round(fraction * rows.numel())
    chosen = torch.zeros_like(candidates)
    if count == rows.numel():
        chosen[rows] = True
        return chosen
    if generator is None:
        raise ValueError("a torch.Generator is needed to pick a random fraction of the rows")
    chosen[rows[torch.randperm(rows.numel(), generator=generator)[:count]]] = True
    return chosen


def label_flip(
    y: torch.Tensor,
    num_classes: int,
    mode: str = "pairs",
    mapping: dict[int, int] | None = None,
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip labels with `flip_mapping(num_classes, mode, mapping)`.

    `fraction` is the share of the *flippable* rows (those whose label the mapping changes) that
    are flipped, drawn with `generator`. Returns (new labels, bool mask of the flipped rows).
    """
    y = torch.as_tensor(y, dtype=torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels outside classes 0..{num_classes - 1}")
    table = flip_mapping(num_classes, mode, mapping).to(y.device)
    target = table[y]
    flipped = _random_subset(target != y, fraction, generator)
    return torch.where(flipped, target, y), flipped


def _patch_slices(height: int, width: int, patch_size: int, location: str) -> tuple[slice, slice]:
    if location not in LOCATIONS:
        raise ValueError(f"unknown trigger location {location!r}; choose one of {', '.join(LOCATIONS)}")
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size must be in 1..{min(height, width)}, got {patch_size}")
    rows = slice(height - patch_size, height) if location.startswith("bottom") else slice(0, patch_size)
    cols = slice(width - patch_size, width) if location.endswith("right") else slice(0, patch_size)
    return rows, cols


def add_trigger(
    x_uint8: torch.Tensor, patch_size: int = 3, patch_value: int = 255, location: str = "bottom_right",
) -> torch.Tensor:
    """Copy of `x_uint8` [N,C,H,W] with a solid `patch_size` square of `patch_value` in a corner."""
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise ValueError(f"expected uint8 images [N,C,H,W], got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    if not 0 <= patch_value <= 255:
        raise ValueError(f"patch_value must be in 0..255, got {patch_value}")
    rows, cols = _patch_slices(x_uint8.shape[2], x_uint8.shape[3], patch_size, location)
    out = x_uint8.clone()
    out[:, :, rows, cols] = patch_value
    return out


def backdoor_patch(
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    target_label: int,
    fraction: float,
    patch_size: int = 3,
    patch_value: int = 255,
    location: str = "bottom_right",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BadNets all-to-one backdoor (Gu et al., "BadNets", 2017).

    Stamps the trigger on round(fraction * n_other) images drawn from the rows whose label is not
    `target_label` (a triggered image already of the target class teaches nothing) and relabels
    them `target_label`. Returns (new images, new labels, bool mask of the poisoned rows).
    """
    y = torch.as_tensor(y, dtype=torch.long)
    if x_uint8.shape[0] != y.shape[0]:
        raise ValueError(f"{x_uint8.shape[0]} images but {y.shape[0]} labels")
    poisoned = _random_subset(y != target_label, fraction, generator)
    triggered = add_trigger(x_uint8[poisoned], patch_size, patch_value, location)
    new_x, new_y = x_uint8.clone(), y.clone()
    new_x[poisoned] = triggered
    new_y[poisoned] = target_label
    return new_x, new_y, poisoned


@torch.no_grad()
def backdoor_success(
    model: nn.Module,
    x_test_uint8: torch.Tensor,
    y_test: torch.Tensor,
    target_label: int,
    patch_size: int = 3,
    patch_value: int = 255,
    location: str = "bottom_right",
    batch_size: int = 1024,
) -> float:
    """Attack success rate: share of triggered non-target test images classified as `target_label`."""
    keep = torch.as_tensor(y_test) != target_label
    if not bool(keep.any()):
        raise ValueError("the test set has no image outside the target class")
    triggered = add_trigger(x_test_uint8[keep], patch_size, patch_value, location)
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for start in range(0, triggered.shape[0], batch_size):
        batch = triggered[start:start + batch_size].to(device).float() / 255
        hits += int((model(batch).argmax(1) == target_label).sum())
    return hits / triggered.shape[0]


# --------------------------------------------------------------------------- registry entries


@dataclass
class PoisonedRows:
    x: torch.Tensor  # uint8 images after the attack
    y: torch.Tensor  # labels after the attack
    poisoned: torch.Tensor  # bool mask of the rows the attack changed


class NoDataAttack:
    """No data poisoning: rows unchanged, no success to measure.

    An attack that poisons drawn rows says how many: ``client_fraction``, the share a malicious FL client
    poisons of its own rows, and ``central_fraction``, the share of the training set in mode=centralized
    (``fraction`` of :meth:`poison`); None where it draws no rows (no attack; poison sets,
    ``fedepic.extensions`` flag ``poison_set``)."""

    client_fraction: Optional[float] = None
    central_fraction: Optional[float] = None

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, fraction: float,
               generator: torch.Generator) -> PoisonedRows:
        return PoisonedRows(x, y, torch.zeros(len(y), dtype=torch.bool))

    def flip_table(self, num_classes: int) -> Optional[torch.Tensor]:
        """The label each class is turned into, for attacks that change labels (None otherwise)."""
        return None

    def success(self, model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                target_x: Optional[torch.Tensor] = None, adversarial_class: Optional[int] = None) -> Optional[float]:
        return None

    def success_many(self, predict: Callable[[torch.Tensor], torch.Tensor], count: int, test_x: torch.Tensor,
                     test_y: torch.Tensor, num_classes: int, target_x: Optional[torch.Tensor] = None,
                     adversarial_class: Optional[int] = None) -> Optional[list[float]]:
        """``success`` of ``count`` models at once, where ``predict`` maps uint8 images [B, ...] to their
        logits [count, B, C] (the in-process engine scores all nodes in one vectorized pass). None
        when the attack has no success to measure. An attack class that defines only ``success`` is
        scored model by model instead (``batched_success``)."""
        return None


def batched_success(attack: NoDataAttack) -> bool:
    """Whether ``attack`` scores models through ``success_many`` (every built-in attack does), so that
    models can be scored together: a subclass that overrides ``success`` but not ``success_many`` is
    scored one model at a time, with its own ``success``."""
    cls = type(attack)

    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in vars(k))

    # the class that last defined success must have (re)defined success_many at its level or below:
    # a subclass of LabelFlip that overrides success alone is scored with its own success
    return issubclass(owner("success_many"), owner("success"))


class LabelFlip(NoDataAttack):
    """Label flipping with ``flip_mapping`` (modes pairs, all, map). Success: the share of test images of
    a flipped source class predicted as its flip destination.

    Papers: Minghong Fang, Xiaoyu Cao, Jinyuan Jia, Neil Zhenqiang Gong, "Local Model Poisoning Attacks
    to Byzantine-Robust Federated Learning", USENIX Security 2020, arXiv:1911.11815; Vale Tolpegin,
    Stacey Truex, Mehmet Emre Gursoy, Ling Liu, "Data Poisoning Attacks Against Federated Learning
    Systems", ESORICS 2020, arXiv:2007.08432.

    Parameters
    ----------
    flip : str
        ``pairs``, ``all`` or ``map`` (``attack.flip``).
    flip_map : list of [from, to]
        The explicit mapping of mode ``map`` (``attack.flip_map``).
    budget : float
        Share of the flippable rows flipped in mode=centralized (``attack.budget``).
    """

    client_fraction = 1.0  # a malicious FL client flips every flippable row it holds

    def __init__(self, flip: str, flip_map: Sequence[Sequence[int]], budget: float) -> None:
        self.mode, self.mapping = flip, ({int(a): int(b) for a, b in flip_map} if flip == "map" else None)
        self.central_fraction = budget

    def poison(self, x, y, num_classes, fraction, generator):
        new_y, flipped = label_flip(y, num_classes, self.mode, self.mapping, fraction, generator)
        return PoisonedRows(x, new_y, flipped)

    def flip_table(self, num_classes: int) -> torch.Tensor:
        return flip_mapping(num_classes, self.mode, self.mapping)

    @torch.no_grad()
    def success(self, model, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
        from fedepic.train import predict_logits  # train imports the config; this module stays light

        return self.success_many(lambda x: predict_logits(model, x)[None], 1, test_x, test_y, num_classes)[0]

    def success_many(self, predict, count, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
        table = self.flip_table(num_classes)
        rows = (table != torch.arange(len(table)))[test_y]
        if not bool(rows.any()):
            return [float("nan")] * count
        pred = predict(test_x[rows]).argmax(-1).cpu()
        return (pred == table[test_y[rows]]).float().mean(-1).tolist()


class Backdoor(NoDataAttack):
    """The BadNets all-to-one patch backdoor; success: the share of triggered non-target test images
    predicted as the backdoor label.

    Paper: Tianyu Gu, Brendan Dolan-Gavitt, Siddharth Garg, "BadNets: Identifying Vulnerabilities in the
    Machine Learning Model Supply Chain", arXiv:1708.06733, 2017.

    Parameters
    ----------
    label : int
        The backdoor's target label (``attack.backdoor_label``).
    patch_size : int
        Side of the white square trigger, bottom right (``attack.patch_size``).
    fraction : float
        Share of the non-target rows stamped, in every mode (``attack.backdoor_fraction``).
    """

    def __init__(self, label: int, patch_size: int, fraction: float) -> None:
        self.label, self.patch_size = label, patch_size
        self.client_fraction = self.central_fraction = fraction

    def poison(self, x, y, num_classes, fraction, generator):
        return PoisonedRows(*backdoor_patch(x, y, self.label, fraction, self.patch_size, generator=generator))

    def success(self, model, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
        return backdoor_success(model, test_x, test_y, self.label, self.patch_size)

    def success_many(self, predict, count, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
        keep = torch.as_tensor(test_y) != self.label
        if not bool(keep.any()):
            raise ValueError("the test set has no image outside the target class")
        triggered = add_trigger(test_x[keep], self.patch_size, 255, "bottom_right")
        return (predict(triggered).argmax(-1) == self.label).float().mean(-1).tolist()
