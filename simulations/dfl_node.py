"""What one decentralized-FL node does, free of Flower: its state, local training and peer aggregation.

The Flower ClientApp in ``simulations/dfl_apps.py`` only converts messages and ``Context.state`` to and
from the plain objects here, so every step of a node can be tested on hand-made tensors.

A round at node i (Lian et al., D-PSGD, NeurIPS 2017, in its "train then gossip" form):
1. ``train_local``: start from the node's model, train ``clients.local_epochs`` epochs on its own rows
   (optionally with local EPIC, Yang et al. ICML 2022, whose drops persist in the node state).
2. The router hands the node its neighbours' models of this round (possibly poisoned).
3. ``aggregate_models``: combine the node's trained model with them using its peer rule.

Peer rules by strategy name (``strategies/`` holds the rules, ``fedepic.extensions.PEER_RULES`` builds them):
- gossip, median, trimmed_mean, krum, scclip, epic: stateless rules over the stacked models.
- gp: Gradient Purification (Li, Miao, Zhang, Yin, FCS 2025), with its per-neighbour recording
  variables kept in the node state.
- gp_epic: the same GP rule; the node also runs EPIC on its own rows during local training.
- exclude: GP's detector WITHOUT recording or purification: a neighbour flagged suspicious in a round is
  left out of that round's aggregation, and once the consistency rule confirms it, of every later one.
  This is the "reject suspicious gradients per iteration" family that the GP paper sets itself
  against (``strategies/exclude.py``).
- upper: plain gossip; the router runs it on the graph without the malicious nodes, with
  Metropolis-Hastings weights recomputed on that benign subgraph (the paper's upper bound).
Malicious nodes do not defend: whatever the strategy, they gossip honestly over the honest models of
their neighbours (so their own model tracks the benign ones and their attacks stay hard to spot).

Exchanged models are state dicts without the model's input-normalisation buffers (``mean``, ``std``):
those are fixed statistics of the training set that every node builds identically, so they are
neither sent nor attacked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from fedepic.config import RunConfig
from fedepic.data import ImageData
from fedepic.builders import build_model, epic_schedule
from fedepic.epic import EpicState
from fedepic.train import fit
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.extensions import PEER_RULES
from strategies.gradient_purification import PurificationState

STATEFUL = PEER_RULES.names("stateful")  # rules with per-neighbour state (records, suspicion history)
FIXED_BUFFERS = ("mean", "std")  # ImageClassifier's normalisation buffers: identical everywhere


def derive_seed(base: int, *parts: int) -> int:
    """A deterministic 63-bit seed from non-negative integers (numpy SeedSequence mixing)."""
    words = [int(base) & 0xFFFFFFFF, *(int(p) & 0xFFFFFFFF for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------- models


def new_model(cfg: RunConfig, data: ImageData) -> nn.Module:
    """The initial model, identical at every node (seeded by ``cfg.seed`` without touching the global RNG)."""
    return build_model(cfg, data, seed=cfg.seed)


def exchanged_state(model: nn.Module) -> dict[str, Tensor]:
    """The part of the state dict that nodes exchange (CPU copies, normalisation buffers left out)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in FIXED_BUFFERS}


def load_exchanged(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    full = model.state_dict()
    missing = [k for k in full if k not in FIXED_BUFFERS and k not in state]
    if missing:
        raise ValueError(f"model state lacks {missing[:3]}")
    full.update({k: torch.as_tensor(v).to(full[k].device, full[k].dtype) for k, v in state.items()})
    model.load_state_dict(full)
    return model


# ----------------------------------------------------------------------------------- state


@dataclass
class NodeState:
    """Everything a node keeps between messages (stored in its Flower ``Context.state``).

    ``member`` names the strategy run the state belongs to: a message of another run resets it.
    ``model`` is the node's model at the start of the next round; ``trained`` its model after this
    round's local training (the "own" row of the aggregation); ``gp`` GP's recording variables and
    suspicion history; ``epic_keep`` the rows local EPIC still keeps.
    """

    member: str
    round: int = 0
    model: Optional[dict[str, Tensor]] = None
    trained: Optional[dict[str, Tensor]] = None
    gp: Optional[PurificationState] = None
    epic_keep: Optional[Tensor] = None
    epic_selections: int = 0

    def to_plain(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """(array groups, config values): tensors grouped by record name, and scalars / lists."""
        arrays: dict[str, dict[str, Tensor]] = {}
        config: dict[str, Any] = {"member": self.member, "round": self.round,
                                  "epic_selections": self.epic_selections}
        if self.model is not None:
            arrays["model"] = self.model
        if self.trained is not None:
            arrays["trained"] = self.trained
        if self.epic_keep is not None:
            arrays["epic"] = {"keep": self.epic_keep.to(torch.uint8)}
        if self.gp is not None:
            gp = self.gp.state_dict()
            arrays["gp"] = gp["records"]
            config.update({f"gp.{k}": v for k, v in gp["meta"].items()})
            config["gp.present"] = True
        return arrays, config

    @classmethod
    def from_plain(cls, arrays: Mapping[str, Mapping[str, Tensor]], config: Mapping[str, Any]) -> "NodeState":
        gp = None
        if config.get("gp.present"):
            meta = {k[3:]: v for k, v in config.items() if k.startswith("gp.") and k != "gp.present"}
            gp = PurificationState.from_state_dict({"records": dict(arrays.get("gp", {})), "meta": meta})
        keep = arrays.get("epic", {}).get("keep")
        return cls(
            member=str(config["member"]),
            round=int(config.get("round", 0)),
            model=dict(arrays["model"]) if "model" in arrays else None,
            trained=dict(arrays["trained"]) if "trained" in arrays else None,
            gp=gp,
            epic_keep=None if keep is None else torch.as_tensor(keep).bool(),
            epic_selections=int(config.get("epic_selections", 0)),
        )


# ----------------------------------------------------------------------------------- local training


def uses_local_epic(strategy: str, cfg: RunConfig, malicious: bool) -> bool:
    """Benign nodes run EPIC on their own rows under gp_epic, or for any strategy with defense.local_epic."""
    return not malicious and (PEER_RULES.has(strategy, "local_epic") or cfg.defense.local_epic)


def round_lr(cfg: RunConfig, round_: int) -> float:
    """The step schedule of ``train.milestones`` read in cumulative local epochs, fixed within a round."""
    done = (round_ - 1) * cfg.clients.local_epochs
    return cfg.train.lr * cfg.train.gamma ** sum(1 for m in cfg.train.milestones if done >= m)


def train_local(model: nn.Module, x: Tensor, y: Tensor, cfg: RunConfig, state: NodeState, *, round_: int,
                seed: int, device: torch.device, epic: bool, poison_mask: Optional[Tensor] = None) -> dict:
    """Train ``model`` in place for ``clients.local_epochs`` epochs on the node's rows; returns statistics.

    With ``epic``, EPIC selections run at the scheduled cumulative epochs and the drops persist in
    ``state.epic_keep``. The optimizer (SGD with momentum) starts afresh every round, as in FedAvg-style
    local training; the learning rate follows the milestone schedule across rounds.
    """
    if len(y) == 0:
        return {"train_loss": float("nan"), "rows": 0}
    epochs = cfg.clients.local_epochs
    train_cfg = dataclasses.replace(cfg.train, milestones=[])
    keep = state.epic_keep if state.epic_keep is not None else torch.ones(len(y), dtype=torch.bool)
    selector = None
    if epic:
        selector = EpicState(len(y), epic_schedule(cfg, "local_epochs"), device=device)
        selector.keep, selector.selections = keep, state.epic_selections
    first = (round_ - 1) * epochs
    selections: list[dict] = []

    def epoch_end(epoch: int, net: nn.Module) -> Optional[dict]:
        if selector is None:
            return None
        stats = selector.maybe_select(first + epoch, net, x, y, poison_mask)
        if stats:
            selections.append(stats)
        return stats

    history = fit(model, x, y, train_cfg, seed=seed, device=device, epochs=epochs, lr=round_lr(cfg, round_),
                  keep=keep, epoch_end=epoch_end)
    if selector is not None:
        state.epic_keep, state.epic_selections = selector.keep, selector.selections
    stats = {"train_loss": history[-1]["loss"], "rows": int(keep.sum())}
    if selections:
        stats["epic_dropped_total"] = selections[-1]["dropped_total"]
        stats["epic_skipped_nonfinite"] = sum(sel["skipped_nonfinite"] for sel in selections)
        if "poison_recall" in selections[-1]:
            stats["epic_poison_recall"] = selections[-1]["poison_recall"]
    return stats


# ----------------------------------------------------------------------------------- aggregation


def peer_rule(strategy: str, cfg: RunConfig) -> Any:
    """The rule of ``strategy`` (``fedepic.extensions.PEER_RULES``), its parameters bound from ``cfg``.
    Rules adapt to the neighbourhood themselves (trimmed mean's b, Krum's f), since node degrees differ
    and a rule that refused to run at a low-degree node would stop the network."""
    return PEER_RULES.build(strategy, cfg)


@dataclass
class AggregationReport:
    """What the peer rule did at one node this round (neighbour ids). ``nonfinite``: neighbours whose
    model held NaN / inf and was left out; ``own_nonfinite``: the node's own model did and was replaced
    (``strategies/finite.py``)."""

    flagged: list[int] = field(default_factory=list)
    purified: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    own_nonfinite: bool = False


def aggregate_vectors(strategy: str, cfg: RunConfig, own: Tensor, neighbours: Tensor, ids: list[int],
                      weights: Optional[Tensor], state: NodeState, malicious: bool = False
                      ) -> tuple[Tensor, AggregationReport]:
    """One aggregation at a node over flat vectors: ``own`` [D], ``neighbours`` [m, D] with node ids
    ``ids`` and mixing weights ``weights`` [m+1] (self first). Mutates ``state.gp`` for GP rules."""
    if len(ids) != neighbours.shape[0]:
        raise ValueError(f"{len(ids)} neighbour ids for {neighbours.shape[0]} neighbour models")
    if malicious:
        strategy = "gossip"
    if neighbours.shape[0] == 0:
        return own.clone(), AggregationReport()
    if strategy in STATEFUL:
        if state.gp is None:
            state.gp = PurificationState()
        new, report = peer_rule(strategy, cfg).aggregate(own, neighbours, ids, weights, state.gp)
        return new, AggregationReport(report.flagged, report.purified, report.confirmed, report.kept,
                                      report.nonfinite, report.own_nonfinite)
    new, bad = peer_rule(strategy, cfg).apply(own, neighbours, weights)
    dropped = set(bad.rows)
    return new, AggregationReport(kept=[j for r, j in enumerate(ids) if r not in dropped],
                                  nonfinite=[ids[r] for r in bad.rows], own_nonfinite=bad.own)


def aggregate_models(strategy: str, cfg: RunConfig, state: NodeState,
                     neighbour_models: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float],
                     self_weight: float, malicious: bool = False) -> AggregationReport:
    """Aggregate ``state.trained`` with the neighbours' state dicts; the result becomes ``state.model``.

    ``weights`` maps neighbour id to its mixing weight and ``self_weight`` is the node's own (they sum
    to 1). Vectors are float32 (``fedepic.vectors``); integer buffers keep the node's own values.
    """
    if state.trained is None:
        raise ValueError("aggregate before train: the node has no trained model this round")
    ids = sorted(int(j) for j in neighbour_models)
    own = flatten_state(state.trained)
    stack = torch.stack([flatten_state(neighbour_models[j]) for j in ids]) if ids else own.new_zeros(0, own.numel())
    w = torch.tensor([self_weight, *(weights[j] for j in ids)], dtype=own.dtype)
    new, report = aggregate_vectors(strategy, cfg, own, stack, ids, w, state, malicious)
    state.model = unflatten_like(new, state.trained)
    state.trained = None
    return report
