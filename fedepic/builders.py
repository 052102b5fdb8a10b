"""What every mode builds from a config, built in one place: the model and EPIC's schedule.

The EPIC schedule's keys (``defense.epic.warmup``, ``.interval``, ``.until``) count a different unit in
each mode, because each mode selects at a different step; :data:`EPIC_UNITS` names it, and the
hand-written key notes (docs/reference/config-notes.md) repeat it:

- centralized (and the federated ``centralized-epic`` reference): training epochs;
- federated local EPIC (``defense.local_epic``): rounds (a client selects after its round's local epochs);
- decentralized local EPIC (``gp_epic``, ``defense.local_epic``): the node's cumulative local epochs
  (round r's e-th local epoch is ``(r - 1) * clients.local_epochs + e``).

``until`` defaults to the last ``train.milestones`` entry where the schedule counts epochs (the
paper stops selecting at the last learning-rate drop); milestones are not in rounds, so the federated
local schedule has no such default.
"""

from __future__ import annotations

from typing import Optional

import torch

from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.epic import EpicSchedule
from fedepic.models import model_for_data
from fedepic.train import prepare_model

EPIC_UNITS = {"epochs": "training epochs", "rounds": "FL rounds", "local_epochs": "cumulative local epochs"}


def epic_schedule(cfg: RunConfig, unit: str = "epochs", fraction: Optional[float] = None) -> EpicSchedule:
    """``defense.epic`` as an EpicSchedule counted in ``unit`` (a key of :data:`EPIC_UNITS`);
    ``fraction`` overrides ``defense.epic.fraction`` (a centralized ``epic-F`` member)."""
    if unit not in EPIC_UNITS:
        raise ValueError(f"unknown EPIC schedule unit {unit!r}; choose one of {', '.join(EPIC_UNITS)}")
    epic = cfg.defense.epic
    until = epic.until
    if until is None and unit != "rounds" and cfg.train.milestones:
        until = max(cfg.train.milestones)
    return EpicSchedule(fraction=fraction or epic.fraction, warmup=epic.warmup, interval=epic.interval, until=until,
                        proxy=epic.proxy, threshold=epic.threshold)


def build_model(cfg: RunConfig, data: ImageData, seed: Optional[int] = None,
                device: Optional[torch.device] = None) -> torch.nn.Module:
    """``model.name`` for ``data``: initial weights from ``seed`` (None: the global RNG, for a model
    whose weights are loaded over), moved to ``device`` (and channels_last under CUDA autocast)."""
    model = model_for_data(cfg.model.name, data, seed=seed)
    return prepare_model(model, device, cfg.train.amp) if device is not None else model
