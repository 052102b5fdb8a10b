"""What one decentralized-FL node does, free of Flower: its state, local training and peer aggregation.

The round engine (``fedepic.peer_rounds``) orders these steps; each algorithm's node step
(``fedepic.algorithms``, the target of its ``fedepic.extensions.ALGORITHMS`` entry) composes them, and
both backends call that step: in process (``fedepic.peer_local``; ``fedepic.peer_stacked`` for dsgd's
stacked rows) and in the Flower ClientApp of ``simulations/dfl_apps.py``, which only converts messages
and ``Context.state`` to and from the plain objects here. So every step of a node can be tested on
hand-made tensors.

Three algorithms (``decentralized.algorithm``): dpsgd, dsgd and dsgt. W = (w_ij) are the mixing weights
of the graph that ``topology.mixing`` names (``fedepic.topology.mixing_weights``: Metropolis-Hastings
by default and uniform_max_degree, both symmetric and doubly stochastic; uniform_degree, only
row-stochastic, which dsgt refuses), and R a peer rule (R = W for gossip).

**dpsgd** (Lian et al., "Can decentralized algorithms outperform centralized algorithms?", NeurIPS
2017, in its "train then gossip" form). A round at node i:
1. ``train_local``: start from the node's model, train ``clients.local_epochs`` epochs on its own rows
   (torch SGD with ``train.momentum``, ``train.nesterov`` and ``train.weight_decay``; optionally with
   local EPIC, Yang et al. ICML 2022, whose drops persist in the node state).
2. The router hands the node its neighbours' models of this round (possibly poisoned).
3. ``aggregate_models``: combine the node's trained model with them using its peer rule.

**dsgd**, one-step decentralized SGD with client momentum (the per-step protocol of the
Byzantine-robust literature, e.g. He, Karimireddy, Jaggi's ClippedGossip 2022 and ByzFL's benchmark):

    m_i <- beta m_i + (1 - beta) g_i(x_i),    m_i(0) = 0,   beta = train.client_momentum
    x_i <- R_i({x_j}) - eta m_i                                  (R = W for gossip)

That is the default ``decentralized.order=combine_then_adapt``. ``adapt_then_combine`` steps first and
combines the half-step models, as ClippedGossip's code does (codes/simulator.py:383-410: "Each worker
applies gradients to models and get (x_{t+1/2}) ... Each worker aggregates `flattened_model` of the
neighbors"; fedepic/reproduce/PROTOCOLS.md 1.4):

    x_i <- R_i({x_j - eta m_j})

so the node sends, and the model attacks act on, x_j - eta m_j. ``train.client_momentum_form=heavy_ball``
takes m_i <- beta m_i + g_i instead of the EMA; a malicious node under ``attack.momentum=false``
takes m_i <- g_i. A member of the ``mozi`` rule with ``defense.mozi.own_step`` takes MOZI's own step
instead (``fedepic.algorithms.dsgd.own_step``): m_i <- g_i(B_i) + g_i(B'_i), no momentum, combine
then adapt.

g_i on one minibatch of ``train.batch_size`` rows at the model the node sends, eta = ``train.lr``
(milestones in rounds), the L2 term ``train.weight_decay`` inside g_i (``train.momentum`` and
``train.nesterov``, the local optimiser's, are refused when set). Every peer rule applies as under
dpsgd (the node sends its model). In code: ``dsgd_momentum`` in the train phase, then
``aggregate_models`` and ``dsgd_step``.

**dsgt**, gradient tracking. Node i keeps its model x_i, a tracker y_i of the network's average
gradient and its last stochastic gradient g_i:

    x_i <- sum_j w_ij x_j - eta y_i
    y_i <- sum_j w_ij y_j + g_i(x_i new) - g_i(x_i old),        y_i(0) = g_i(x_i(0))

This is the combine-then-adapt form of DIGing (Nedic, Olshevsky, Shi, "Achieving geometric
convergence for distributed optimization over time-varying graphs", SIAM J. Optim. 2017) with
stochastic gradients; Pu & Nedic's DSGT ("Distributed stochastic gradient tracking methods",
Mathematical Programming 187, 2021) writes the model step adapt-then-combine,
``x_i <- sum_j w_ij (x_j - eta y_j)``, with the same tracker update. We keep the first form because
the model step then uses the node's own tracker only, so purifying it (GP) changes nothing but i's
own direction.

Each gradient takes one minibatch of ``train.batch_size`` rows (``node_batch``: drawn with replacement,
seeded by seed, round, node, or in order under ``train.sampler=in_order``), ``eta = train.lr``
(``train.milestones`` count rounds) and the L2 term
``train.weight_decay`` inside g_i; no momentum (``train.momentum``, ``train.nesterov`` and
``train.client_momentum`` are refused when set). A node sends (x_i, y_i) as one vector (the model's
entries, then ``TRACKER``), so the router, the model attacks and the message code see one vector
as under dpsgd, and a model attack perturbs both. The rule replaces both sums: it is called on the
y's, then on the x's (``tracking`` in its state says which); GP
(``strategies/gradient_purification.py``) screens on the trackers, purifies them and mixes the
models over the neighbours it kept. In code: ``dsgt_mix`` (the two sums), then the gradient at the new point
(``fedepic.stacked.stacked_gradients``, all nodes at once in process, one at a time on Ray), then
``dsgt_finish``.

Peer rules by strategy name (``strategies/`` holds the rules, ``fedepic.extensions.PEER_RULES`` builds them).
Every one has the one rule signature of ``strategies/aggregate.py`` and is called the same way,
through ``strategies.aggregate.aggregate`` (``aggregate_vectors``, ``dsgt_mix``), with the node's
``NodeState.rule_state`` as its state and the call's inputs (:func:`rule_context`) in it:
- gossip, median, trimmed_mean, krum, scclip, epic, ...: stateless rules over the stacked models.
- gp: Gradient Purification (Li, Miao, Zhang, Yin, FCS 2025), with its per-neighbour recording
  variables kept in the rule state (and so in the node's checkpoint).
- gp_epic: the same GP rule; the node also runs EPIC on its own rows during local training.
- exclude: GP's detector WITHOUT recording or purification: a neighbour flagged suspicious in a round is
  left out of that round's aggregation, and once the consistency rule confirms it, of every later one.
  This is the "reject suspicious gradients per iteration" family that the GP paper sets itself
  against (``strategies/exclude.py``).
- upper: plain gossip; the router runs it on the graph without the malicious nodes, with the
  ``topology.mixing`` weights recomputed on that benign subgraph (the paper's upper bound).
Malicious nodes do not defend: whatever the strategy, they gossip honestly over the honest models of
their neighbours (so their own model tracks the benign ones and their attacks stay hard to spot).

Exchanged models are state dicts without the model's input-normalisation buffers (``mean``, ``std``):
those are fixed statistics of the training set that every node builds identically, so they are
neither sent nor attacked.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fedepic.config import RunConfig
from fedepic.dropout import has_dropout, mask_seed
from fedepic.models import FIXED_BUFFERS
from fedepic.stacked import stacked_gradients
from fedepic.stacked_fit import NodeRows, stacked_fit
from fedepic.data import ImageData
from fedepic.builders import build_model, epic_schedule
from fedepic.epic import EpicState
from fedepic.train import client_momentum_, fit, float_images, round_lr  # noqa: F401 (round_lr re-exported)
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.seeds import derive_seed
from fedepic.client_work import minibatch_rows
from fedepic.minibatches import minibatch_positions
from fedepic.extensions import PEER_RULES, algorithm_has
from strategies.aggregate import Aggregate, aggregate
from strategies.gossip import check_stack
from strategies.gradient_purification import STATE as GP_STATE, PurificationState

TRACKER = "dsgt.tracker"  # DSGT: the tracker's entry in the exchanged vector, after the model's
STATEFUL = PEER_RULES.names("stateful")  # rules with per-neighbour state (records, suspicion history)
BatchLoss = Callable[[Tensor], Tensor]  # flat models [k, D] -> their losses [k] on a node's own minibatch


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


class PurificationView:
    """``NodeState.gp``: the GP / exclude memory held in ``NodeState.rule_state``, as a
    ``PurificationState`` (a copy: None when the rule state holds none); assigning one writes it into
    ``rule_state`` (None changes nothing). A view for tests and benchmarks that read GP's records: the
    engine itself hands the rule ``rule_state`` as it is (``aggregate_vectors``)."""

    def __get__(self, node: Optional["NodeState"], owner: Optional[type] = None) -> Any:
        if node is None:
            return self
        if not node.rule_state.get(f"{GP_STATE}.present"):
            return None
        return PurificationState.from_rule_state(node.rule_state)

    def __set__(self, node: "NodeState", value: Optional[PurificationState]) -> None:
        if isinstance(value, PurificationState):  # None, or this view as the field's default: nothing to write
            value.store(node.rule_state)


OWN_ARRAYS = frozenset({"model", "trained", "epic", "dsgt", "dsgd", "meta"})  # "meta": simulations/dfl_apps.py's
OWN_CONFIG = frozenset({"member", "round", "epic_selections"})


@dataclass
class NodeState:
    """Everything a node keeps between messages (stored in its Flower ``Context.state``).

    ``member`` names the strategy run the state belongs to: a message of another run resets it.
    ``model`` is the node's model at the start of the next round; ``trained`` its model after this
    round's local training (the "own" row of the aggregation); ``epic_keep`` the rows local EPIC
    still keeps; ``rule_state`` the peer rule's own state, the ``state`` of the one rule signature
    (``strategies/aggregate.py``) without the call's inputs: plain data, ``{name: Tensor}`` groups and
    config values (GP's and exclude's records and suspicion history,
    ``strategies/gradient_purification.py``; empty for the other rules), checkpointed as it is by
    ``to_plain``. ``gp`` reads GP's part of it (:class:`PurificationView`).
    """

    member: str
    round: int = 0
    model: Optional[dict[str, Tensor]] = None
    trained: Optional[dict[str, Tensor]] = None
    epic_keep: Optional[Tensor] = None
    epic_selections: int = 0
    tracker: Optional[Tensor] = None  # dsgt: y_i (flat)
    gradient: Optional[Tensor] = None  # dsgt: g_i at the current model (flat)
    momentum: Optional[Tensor] = None  # dsgd: the client momentum m_i (flat)
    rule_state: dict[str, Any] = field(default_factory=dict)
    gp: Optional[PurificationState] = field(default=PurificationView(), repr=False, compare=False)  # after rule_state

    def to_plain(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """(array groups, config values): tensors grouped by record name, and scalars / lists; the rule
        state's groups and values among them under their own names (which must not be the node's)."""
        arrays: dict[str, dict[str, Tensor]] = {}
        config: dict[str, Any] = {"member": self.member, "round": self.round,
                                  "epic_selections": self.epic_selections}
        if self.model is not None:
            arrays["model"] = self.model
        if self.trained is not None:
            arrays["trained"] = self.trained
        if self.epic_keep is not None:
            arrays["epic"] = {"keep": self.epic_keep.to(torch.uint8)}
        if self.tracker is not None:
            arrays["dsgt"] = {"tracker": self.tracker, "gradient": self.gradient}
        if self.momentum is not None:
            arrays["dsgd"] = {"momentum": self.momentum}
        for key, value in self.rule_state.items():
            if key in OWN_ARRAYS or key in OWN_CONFIG:
                raise ValueError(f"the peer rule's state key {key!r} is one of the node state's own")
            if isinstance(value, Mapping):
                arrays[key] = dict(value)
            else:
                config[key] = value
        return arrays, config

    @classmethod
    def from_plain(cls, arrays: Mapping[str, Mapping[str, Tensor]], config: Mapping[str, Any]) -> "NodeState":
        """Inverse of ``to_plain``: the groups and values that are not the node's own are the rule state."""
        rule_state: dict[str, Any] = {k: dict(v) for k, v in arrays.items() if k not in OWN_ARRAYS}
        rule_state.update({k: v for k, v in config.items() if k not in OWN_CONFIG})
        keep = arrays.get("epic", {}).get("keep")
        dsgt = arrays.get("dsgt", {})
        return cls(
            member=str(config["member"]),
            round=int(config.get("round", 0)),
            model=dict(arrays["model"]) if "model" in arrays else None,
            trained=dict(arrays["trained"]) if "trained" in arrays else None,
            epic_keep=None if keep is None else torch.as_tensor(keep).bool(),
            epic_selections=int(config.get("epic_selections", 0)),
            tracker=None if "tracker" not in dsgt else torch.as_tensor(dsgt["tracker"]),
            gradient=None if "gradient" not in dsgt else torch.as_tensor(dsgt["gradient"]),
            momentum=None if "momentum" not in arrays.get("dsgd", {}) else torch.as_tensor(arrays["dsgd"]["momentum"]),
            rule_state=rule_state,
        )


# ----------------------------------------------------------------------------------- local training


def uses_local_epic(strategy: str, cfg: RunConfig, malicious: bool) -> bool:
    """Benign nodes run EPIC on their own rows under gp_epic, or for any strategy with defense.local_epic."""
    return not malicious and (PEER_RULES.has(strategy, "local_epic") or cfg.defense.local_epic)


def _local_selector(cfg: RunConfig, rows: int, state: NodeState, device: torch.device) -> EpicState:
    """The node's local EPIC, its drops and selection count carried over from earlier rounds."""
    keep = state.epic_keep if state.epic_keep is not None else torch.ones(rows, dtype=torch.bool)
    selector = EpicState(rows, epic_schedule(cfg, "local_epochs"), device=device)
    selector.keep, selector.selections = keep, state.epic_selections
    return selector


def _local_rows(cfg: RunConfig, rows: int, state: NodeState, device: torch.device,
                epic: bool) -> tuple[Optional[EpicState], Tensor]:
    """The node's local EPIC selector (None without ``epic``) and the mask of the rows it trains on:
    the selector's, else the drops carried in ``state``, else every row."""
    selector = _local_selector(cfg, rows, state, device) if epic else None
    if selector is not None:
        return selector, selector.keep
    return None, state.epic_keep if state.epic_keep is not None else torch.ones(rows, dtype=torch.bool)


def _keep_selections(state: NodeState, selector: Optional[EpicState]) -> None:
    """Carry the selector's drops and selection count to the next round."""
    if selector is not None:
        state.epic_keep, state.epic_selections = selector.keep, selector.selections


def _local_stats(loss: float, keep: Tensor, selections: list[dict]) -> dict:
    stats = {"train_loss": loss, "rows": int(keep.sum())}
    if selections:
        stats["epic_dropped_total"] = selections[-1]["dropped_total"]
        stats["epic_skipped_nonfinite"] = sum(sel["skipped_nonfinite"] for sel in selections)
        if "poison_recall" in selections[-1]:
            stats["epic_poison_recall"] = selections[-1]["poison_recall"]
    return stats


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
    selector, keep = _local_rows(cfg, len(y), state, device, epic)
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
    _keep_selections(state, selector)
    return _local_stats(history[-1]["loss"], keep, selections)


@dataclass
class LocalJob:
    """One node's share of :func:`train_local_stacked`: its state, its data, its round seed, whether
    it runs local EPIC (and its poison mask, for EPIC's recall), and its model, into which its row is
    loaded when an EPIC selection needs a module."""

    state: NodeState
    x: Tensor
    y: Tensor
    seed: int
    epic: bool
    net: nn.Module
    poison_mask: Optional[Tensor] = None


def train_local_stacked(model: nn.Module, starts: Tensor, jobs: Sequence[LocalJob], cfg: RunConfig, *,
                        round_: int, device: torch.device) -> tuple[Tensor, list[dict]]:
    """:func:`train_local` for many nodes at once (``fedepic.stacked_fit``): row k of ``starts`` [n, D]
    (flat exchanged states) trains on ``jobs[k]``'s rows with its seed, EPIC selections and drops
    included. Returns the trained rows [n, D] and each node's statistics, as ``train_local`` gives
    them. Every job must hold rows (a node without any takes ``train_local``'s early return)."""
    epochs = cfg.clients.local_epochs
    first = (round_ - 1) * epochs
    rows = [_local_rows(cfg, len(job.y), job.state, device, job.epic) for job in jobs]
    selectors, keeps = [selector for selector, _ in rows], [keep for _, keep in rows]
    selections: list[list[dict]] = [[] for _ in jobs]

    def epoch_end(k: int, epoch: int, params: Mapping[str, Tensor]) -> Optional[dict]:
        selector = selectors[k]
        if selector is None or not selector.schedule.is_selection_epoch(first + epoch):
            return None
        net = load_exchanged(jobs[k].net, params)  # a stackable model's exchanged entries are its parameters
        stats = selector.maybe_select(first + epoch, net, jobs[k].x, jobs[k].y, jobs[k].poison_mask)
        selections[k].append(stats)
        return stats

    nodes = [NodeRows(job.x, job.y, keep, job.seed) for job, keep in zip(jobs, keeps)]
    trained, histories = stacked_fit(model, starts, nodes, dataclasses.replace(cfg.train, milestones=[]),
                                     epochs=epochs, lr=round_lr(cfg, round_), epoch_end=epoch_end)
    for job, selector in zip(jobs, selectors):
        _keep_selections(job.state, selector)
    return trained, [_local_stats(h[-1]["loss"], keep, sel) for h, keep, sel in zip(histories, keeps, selections)]


# ----------------------------------------------------------------------------------- aggregation


HONEST = "honest gossip"  # the key of the malicious nodes' own aggregation in a ``rules`` cache


def peer_rule(strategy: str, cfg: RunConfig, defended: bool = True) -> Any:
    """The rule of ``strategy`` (``fedepic.extensions.PEER_RULES``), its parameters bound from ``cfg``.
    Rules adapt to the neighbourhood themselves (trimmed mean's b, Krum's f), since node degrees differ
    and a rule that refused to run at a low-degree node would stop the network. With
    ``defense.pre_aggregation`` a stateless rule of a ``defended`` (benign) node gets those steps first
    (``strategies/preaggregation.py``, NNM's f from ``defense.byzantine``)."""
    rule = PEER_RULES.build(strategy, cfg)
    steps = cfg.defense.pre_aggregation
    if not defended or not steps or strategy in STATEFUL:
        return rule
    from fedepic.extensions import pre_aggregation_steps
    from strategies.preaggregation import PreAggregated

    return PreAggregated(rule, pre_aggregation_steps(cfg))


@dataclass
class AggregationReport:
    """What the peer rule did at one node this round (neighbour ids; :func:`node_report` builds it from
    the rule's ``Aggregate``). ``flagged``, ``purified``, ``confirmed``: the verdicts of a rule that
    screens its neighbours (GP and exclude report them in ``Aggregate.info``; empty for the others).
    ``kept``: for such a rule the neighbours aggregated this round, for the others the neighbours the
    rule received (every neighbour but the non-finite ones; which of them a selecting rule such as
    Krum chose is in the rule's ``Aggregate.kept``, not here). ``nonfinite``: neighbours whose vector
    held NaN / inf and was left out (under dsgt: model or tracker); ``own_nonfinite``: the node's own
    did (and was replaced when a neighbour was finite; ``strategies.aggregate.aggregate``)."""

    flagged: list[int] = field(default_factory=list)
    purified: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    own_nonfinite: bool = False


def needs_loss(strategy: str, malicious: bool = False) -> bool:
    """Whether a (benign) node hands ``strategy``'s rule its own-batch loss (registry flag ``needs_loss``:
    MOZI); malicious nodes gossip and need none."""
    return not malicious and strategy in PEER_RULES and PEER_RULES.has(strategy, "needs_loss")


@torch.no_grad()
def minibatch_losses(model: nn.Module, rows: Tensor, images: Tensor, labels: Tensor) -> Tensor:
    """The cross-entropy [k] (float32, CPU) of every flat exchanged model in ``rows`` [k, D] on one
    minibatch, each loaded into ``model`` in turn (left holding the last row) and run in eval mode."""
    like = {k: v for k, v in model.state_dict().items() if k not in FIXED_BUFFERS}
    device = next(model.parameters()).device
    xb, yb = float_images(images).to(device), labels.to(device)
    was_training = model.training
    model.eval()
    try:
        losses = []
        for row in rows:
            load_exchanged(model, unflatten_like(row, like))
            losses.append(nn.functional.cross_entropy(model(xb).float(), yb).cpu())
    finally:
        model.train(was_training)
    return torch.stack(losses)


def own_batch_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: RunConfig, round_: int, node: int,
                   draw: int = 0) -> BatchLoss:
    """Node ``node``'s loss on its own minibatch of ``round_`` (``train.batch_size`` of its rows ``x``,
    ``y``: under dsgd the batch of its gradient, :func:`node_batch` under ``train.sampler``; with ``draw``
    1 MOZI's second minibatch under its own step, drawn with replacement seeded (seed, round, node, 1):
    ``fedepic.algorithms.dsgd``) as a callable over flat models [k, D] (:func:`minibatch_losses` with
    ``model`` as the scratch module): MOZI's score (``strategies/mozi.py``), the same on both engines."""
    images, labels = numbered_batch(x, y, cfg, round_, node, draw)
    return lambda rows: minibatch_losses(model, rows, images, labels)


def numbered_batch(x: Tensor, y: Tensor, cfg: RunConfig, round_: int, node: int, draw: int = 0
                   ) -> tuple[Tensor, Tensor]:
    """Node ``node``'s minibatch number ``draw`` of ``round_`` from its rows ``x``, ``y``: the first
    (``draw`` 0) is :func:`node_batch`, under ``train.sampler``, the one every algorithm's gradient takes;
    the others (MOZI's B'_i under its own step) are drawn with replacement, seeded (seed, round, node,
    draw) (:func:`batch_seed`)."""
    if draw == 0:
        return node_batch(x, y, cfg, round_, node)
    return dsgt_batch(x, y, cfg, batch_seed(cfg, round_, node, draw))


def batch_seed(cfg: RunConfig, round_: int, node: int, draw: int = 0) -> int:
    """The seed of node ``node``'s minibatch number ``draw`` in ``round_``: (seed, round, node) for the
    first, the one every algorithm's gradient takes; (seed, round, node, draw) for the others."""
    return derive_seed(cfg.seed, round_, node) if draw == 0 else derive_seed(cfg.seed, round_, node, draw)


def rule_context(cfg: RunConfig, state: NodeState, node: Optional[int], loss: Optional[BatchLoss] = None
                 ) -> dict[str, Any]:
    """The round's inputs a peer rule finds in its ``state`` for one call, around the node's own rule
    state and removed after the call (:func:`call_inputs`, so nothing outlives it or reaches a
    checkpoint), as the server engine puts the round there (``fedepic.local_backend.RuleAggregation``):
    ``round``, the round t the node trained in (``state.round``, 1-based; left out before the first),
    ``rounds``, T (``cfg.rounds``), ``node``, the receiving node's id (when the caller gives it), and
    ``loss``, the node's own-batch loss (:func:`own_batch_loss`, for rules flagged ``needs_loss``).
    :func:`aggregate_vectors` and :func:`dsgt_mix` add ``ids``, the sender of each row (own's entry:
    ``node``), and under dsgt ``tracking``. Both engines build it here.

    >>> rule_context(RunConfig(rounds=9), NodeState("m", round=4), 2)
    {'rounds': 9, 'round': 4, 'node': 2}
    """
    context: dict[str, Any] = {"rounds": int(cfg.rounds)}
    if state.round:
        context["round"] = int(state.round)
    if node is not None:
        context["node"] = int(node)
    if loss is not None:
        context["loss"] = loss
    return context


def aggregate_vectors(strategy: str, cfg: RunConfig, own: Tensor, neighbours: Tensor, ids: list[int],
                      weights: Optional[Tensor], state: NodeState, malicious: bool = False,
                      rules: Optional[Mapping[str, Any]] = None, stack: Optional[Tensor] = None,
                      node: Optional[int] = None, loss: Optional[BatchLoss] = None
                      ) -> tuple[Tensor, AggregationReport]:
    """One aggregation at a node over flat vectors: ``own`` [D], ``neighbours`` [m, D] with node ids
    ``ids`` and mixing weights ``weights`` [m+1] (self first), by the node's peer rule (plain gossip at
    a malicious node), whatever the rule: one call of the one signature with ``state.rule_state`` as
    its state, which a stateful rule (GP, exclude) updates. ``rules`` may hold the rule objects already
    built ({name: rule}), which saves a build per call. ``stack``: the caller's ``[own; neighbours]``,
    ``[m+1, D]`` when it built one (``own`` and ``neighbours`` are then its rows), which saves a copy.
    ``node`` (the node's id) and ``loss`` (its own-batch loss) go into the call's inputs
    (:func:`rule_context`), with ``ids``."""
    if len(ids) != neighbours.shape[0]:
        raise ValueError(f"{len(ids)} neighbour ids for {neighbours.shape[0]} neighbour models")
    if neighbours.shape[0] == 0:
        return own.clone(), AggregationReport()
    context = {**rule_context(cfg, state, node, loss), "ids": [node, *ids]}
    out = peer_aggregate(built_rule(strategy, cfg, rules, malicious), own, neighbours, weights, stack, context,
                         state.rule_state)
    return out.vector, node_report([out], ids)


def peer_aggregate(rule: Any, own: Tensor, neighbours: Tensor, weights: Optional[Tensor],
                   stack: Optional[Tensor] = None, context: Optional[Mapping[str, Any]] = None,
                   memory: Optional[dict[str, Any]] = None) -> Aggregate:
    """A peer ``rule`` over the stack [own; neighbours] (own at row 0, ``weights`` [m+1] self first;
    ``stack`` that stack when the caller has it), through ``strategies.aggregate.aggregate`` (the
    non-finite policy). The rule's ``state`` is ``memory`` (the node's ``rule_state``; a fresh dict
    when None) with ``context`` (:func:`rule_context`) in it for this call."""
    check_stack(own, neighbours)
    if stack is None:
        stack = torch.cat([own.unsqueeze(0), neighbours])
    state = {} if memory is None else memory
    with call_inputs(state, context or {}):
        return aggregate(rule, stack, 0, weights, state)


@contextmanager
def call_inputs(state: dict[str, Any], inputs: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """``state`` with ``inputs`` in it while the block runs, and without them after (a rule state that
    already holds one of their keys is refused: they are the call's, never the rule's)."""
    taken = sorted(state.keys() & inputs.keys())
    if taken:
        raise ValueError(f"the peer rule's state holds {taken}, names of the call's inputs")
    state.update(inputs)
    try:
        yield state
    finally:
        for key in inputs:
            state.pop(key, None)


def node_report(outs: Sequence[Aggregate], ids: list[int]) -> AggregationReport:
    """The node's :class:`AggregationReport` from the rule's report of each call of the round (one; under
    dsgt the trackers' and the models'), own at row 0 and the neighbours ``ids`` after it: a neighbour
    or own non-finite in any call counts; the detector's verdicts (``flagged``, ``purified``,
    ``confirmed`` in ``Aggregate.info``) and, with them, ``kept`` come from the call that screened."""
    bad, own_bad = outs[0].nonfinite[1:].clone(), bool(outs[0].nonfinite[0])
    for out in outs[1:]:
        bad |= out.nonfinite[1:]
        own_bad = own_bad or bool(out.nonfinite[0])
    flags = bad.tolist()
    nonfinite = [j for j, b in zip(ids, flags) if b]
    screened = next((out for out in outs if "confirmed" in out.info), None)
    if screened is None:
        return AggregationReport(kept=[j for j, b in zip(ids, flags) if not b], nonfinite=nonfinite,
                                 own_nonfinite=own_bad)
    info = screened.info
    return AggregationReport(list(info["flagged"]), list(info["purified"]), list(info["confirmed"]),
                             [j for j, k in zip(ids, screened.kept[1:].tolist()) if k], nonfinite, own_bad)


def built_rule(strategy: str, cfg: RunConfig, rules: Optional[Mapping[str, Any]], malicious: bool = False) -> Any:
    """The rule a node aggregates with: ``strategy``'s, or plain gossip at a malicious node (which does
    not defend), from the ``rules`` cache when it holds it (keys: rule names and ``HONEST``)."""
    key = HONEST if malicious else strategy
    if rules is not None and key in rules:
        return rules[key]
    return peer_rule("gossip", cfg, defended=False) if malicious else peer_rule(strategy, cfg)


def aggregate_models(strategy: str, cfg: RunConfig, state: NodeState,
                     neighbour_models: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float],
                     self_weight: float, malicious: bool = False,
                     rules: Optional[Mapping[str, Any]] = None, node: Optional[int] = None,
                     loss: Optional[BatchLoss] = None) -> AggregationReport:
    """Aggregate ``state.trained`` with the neighbours' state dicts; the result becomes ``state.model``.

    ``weights`` maps neighbour id to its mixing weight and ``self_weight`` is the node's own (they sum
    to 1). Vectors are float32 (``fedepic.vectors``); integer buffers keep the node's own values.
    """
    if state.trained is None:
        raise ValueError("aggregate before train: the node has no trained model this round")
    vectors = {int(j): flatten_state(model) for j, model in neighbour_models.items()}
    return aggregate_flat(strategy, cfg, state, flatten_state(state.trained), vectors, weights, self_weight,
                          malicious, rules, node, loss)


def aggregate_flat(strategy: str, cfg: RunConfig, state: NodeState, own: Tensor,
                   neighbours: Mapping[int, Tensor], weights: Mapping[int, float], self_weight: float,
                   malicious: bool = False, rules: Optional[Mapping[str, Any]] = None, node: Optional[int] = None,
                   loss: Optional[BatchLoss] = None) -> AggregationReport:
    """:func:`aggregate_models` with the node's trained model and the neighbours' already flat
    (``own`` = ``flatten_state(state.trained)``): the in-process engine holds them as vectors."""
    if state.trained is None:
        raise ValueError("aggregate before train: the node has no trained model this round")
    ids = sorted(int(j) for j in neighbours)
    stack = torch.stack([own, *(neighbours[j].to(own.dtype) for j in ids)])  # own first, the rules' layout
    w = torch.tensor([self_weight, *(weights[j] for j in ids)], dtype=own.dtype)
    new, report = aggregate_vectors(strategy, cfg, stack[0], stack[1:], ids, w, state, malicious, rules, stack,
                                    node, loss)
    state.model = unflatten_like(new, state.trained)
    state.trained = None
    return report


# ----------------------------------------------------------------------------------- dsgt


# What an algorithm's flags (``fedepic.extensions.ALGORITHMS``) say; the engines call its node step
# (``fedepic.algorithms``) and never ask its name.
def is_dsgt(cfg: RunConfig) -> bool:
    """Whether nodes exchange (model, tracker) vectors and keep a gradient state (flag ``tracks_gradient``:
    dsgt's ``dsgt_*`` steps)."""
    return algorithm_has(cfg, "tracks_gradient")


def is_dsgd(cfg: RunConfig) -> bool:
    """Whether nodes fold their gradient into the client momentum and step after the aggregation (flag
    ``client_momentum``: dsgd's ``dsgd_momentum`` and ``dsgd_step``)."""
    return algorithm_has(cfg, "client_momentum")


def one_step(cfg: RunConfig) -> bool:
    """Whether nodes take one minibatch step per round (flag ``one_step``: no local epochs, no training
    loss to report; dsgd and dsgt)."""
    return algorithm_has(cfg, "one_step")


def dsgd_momentum(state: NodeState, gradient: Tensor, beta: float, form: str = "ema", memory: bool = True) -> None:
    """m_i <- beta m_i + (1 - beta) g_i (``form`` ema) or beta m_i + g_i (heavy_ball), m_i starting at 0
    (``fedepic.train.client_momentum_``), into a new tensor: the old one may be a read-only buffer of a
    Flower record. Without ``memory`` (a malicious node under ``attack.momentum=false``): m_i <- g_i."""
    if not memory:
        state.momentum = gradient.clone()
        return
    previous = torch.zeros_like(gradient) if state.momentum is None else state.momentum.clone()
    state.momentum = client_momentum_(previous, gradient, beta, form)


def keeps_momentum(cfg: RunConfig, malicious: bool) -> bool:
    """Whether a node keeps its client momentum: benign nodes do; malicious ones unless ``attack.momentum=false``."""
    return cfg.attack.momentum or not malicious


def adapts_first(cfg: RunConfig) -> bool:
    """``decentralized.order=adapt_then_combine``: a dsgd node steps before it sends (module docstring)."""
    return cfg.decentralized.order == "adapt_then_combine"


def dsgd_step(cfg: RunConfig, state: NodeState, round_: int) -> None:
    """x_i <- x_i - eta m_i on ``state.model``: after the aggregation (``state.model`` = R_i) under
    combine_then_adapt, before sending (the half-step model) under adapt_then_combine."""
    point = flatten_state(state.model) - round_lr(cfg, round_) * state.momentum
    state.model = unflatten_like(point, state.model)


def dsgt_gradients(model: nn.Module, points: Tensor, batches: list[tuple[Tensor, Tensor]], cfg: RunConfig,
                   mask_seeds: Optional[Sequence[int]] = None) -> Tensor:
    """g_k at every row of ``points`` [n, D] on its minibatch ``batches[k]`` (images, labels): one
    vectorized call (``fedepic.stacked``). A model with dropout needs ``mask_seeds``
    (:func:`dropout_seeds`, one per row)."""
    xb = torch.stack([b[0] for b in batches])
    xb = float_images(xb)
    yb = torch.stack([b[1] for b in batches])
    return stacked_gradients(model, points, xb, yb, cfg.train.weight_decay, mask_seeds)


def dropout_seeds(cfg: RunConfig, model: nn.Module, round_: int, nodes: Sequence[int], draw: int = 0
                  ) -> Optional[list[int]]:
    """The dropout seed of each of ``nodes``' gradient on its minibatch number ``draw`` of ``round_``
    (``fedepic.dropout.mask_seed`` of (seed, round, node, draw): the minibatch's own coordinates, so
    the in-process engines and a Ray node draw the same masks), or None for a model without dropout."""
    if not has_dropout(model):
        return None
    return [mask_seed(cfg.seed, round_, node, draw) for node in nodes]


def dsgt_batch(x: Tensor, y: Tensor, cfg: RunConfig, seed: int) -> tuple[Tensor, Tensor]:
    """``train.batch_size`` rows of (x, y) drawn with replacement, seeded by ``seed``
    (``train.sampler=replacement``); the algorithms call :func:`node_batch`, which honours ``train.sampler``."""
    rows = minibatch_rows(len(y), cfg.train.batch_size, seed)
    return x[rows], y[rows]


def node_batch(x: Tensor, y: Tensor, cfg: RunConfig, round_: int, node: int, first_round: int = 1
               ) -> tuple[Tensor, Tensor]:
    """Node ``node``'s minibatch of ``round_`` among its rows (x, y) under ``train.sampler``
    (``fedepic.minibatches``): drawn with replacement seeded by (seed, round, node), or its in-order
    batch number ``round_ - first_round`` (``first_round``: the round of the node's first gradient, 1 for
    dsgd, 0 for dsgt's y_i(0)). Both engines, and MOZI's own-batch loss, take their batches here."""
    train = cfg.train
    rows = minibatch_positions(train.sampler, len(y), train.batch_size, derive_seed(cfg.seed, round_, node),
                               round_ - first_round, train.batches_per_epoch)
    return x[rows], y[rows]


def dsgt_message(state: NodeState) -> dict[str, Tensor]:
    """What the node sends: its model's exchanged entries, then ``TRACKER`` (one flat vector)."""
    if state.model is None or state.tracker is None:
        raise ValueError("a DSGT node sends after its first gradient: model and tracker must be set")
    return {**state.model, TRACKER: state.tracker}


def dsgt_mix(rule: str, cfg: RunConfig, state: NodeState, received: Mapping[int, Tensor],
             weights: Mapping[int, float], self_weight: float, malicious: bool = False,
             rules: Optional[Mapping[str, Any]] = None, own: Optional[Tensor] = None,
             node: Optional[int] = None) -> tuple[Tensor, Tensor, AggregationReport]:
    """The two sums of a DSGT round at a node, ``(sum_j w_ij x_j, sum_j w_ij y_j)`` with the node's rule
    in place of W, over the flat (x, y) vectors ``received`` ({neighbour: vector}). Malicious nodes
    gossip honestly. Every rule is called twice through the one signature with ``state.rule_state``:
    first on the trackers (``tracking`` = "trackers" among the call's inputs), then on the models
    ("models"), so that a rule that screens (GP) screens on the trackers and mixes the models over the
    same neighbours. ``own``: the node's flat (x, y) when the caller has it (what it sent this round),
    else built from the state. ``node``: the node's id, for the call's inputs (:func:`rule_context`; no
    ``loss`` there: the tracker rows are no model, so a ``needs_loss`` rule runs without its loss stage
    under dsgt)."""
    if own is None:
        own = torch.cat([flatten_state(state.model), state.tracker.float()])
    split = own.numel() - state.tracker.numel()
    ids = sorted(int(j) for j in received)
    stack = torch.stack([received[j].float() for j in ids]) if ids else own.new_zeros(0, own.numel())
    w = torch.tensor([self_weight, *(weights[j] for j in ids)], dtype=own.dtype)
    if not ids:
        return own[:split].clone(), own[split:].clone(), AggregationReport()
    applied = built_rule(rule, cfg, rules, malicious)
    context = {**rule_context(cfg, state, node), "ids": [node, *ids]}
    out_y = peer_aggregate(applied, own[split:], stack[:, split:], w, context={**context, "tracking": "trackers"},
                           memory=state.rule_state)
    out_x = peer_aggregate(applied, own[:split], stack[:, :split], w, context={**context, "tracking": "models"},
                           memory=state.rule_state)
    return out_x.vector, out_y.vector, node_report([out_y, out_x], ids)


def dsgt_point(cfg: RunConfig, state: NodeState, mixed_x: Tensor, round_: int) -> Tensor:
    """x_i new = sum_j w_ij x_j - eta y_i (y_i: the tracker the node sent this round)."""
    return mixed_x - round_lr(cfg, round_) * state.tracker.float()


def dsgt_finish(state: NodeState, point: Tensor, mixed_y: Tensor, gradient: Tensor) -> None:
    """y_i <- sum_j w_ij y_j + g_i(new) - g_i(old); the new model and gradient become the state."""
    state.tracker = mixed_y + gradient - state.gradient
    state.gradient = gradient.clone()
    state.model = unflatten_like(point, state.model)
    state.trained = None


def dsgt_start(state: NodeState, model: nn.Module, gradient: Tensor) -> None:
    """Round 1: the initial model, and y_i(0) = g_i(x_i(0))."""
    state.model = exchanged_state(model)
    state.tracker, state.gradient = gradient.clone(), gradient.clone()


def eval_due(cfg: RunConfig, round_: int) -> bool:
    """Whether the benign nodes evaluate after ``round_``: every ``train.eval_every`` rounds, the last
    round, and (oracle detection, ``cfg`` a member's) after rounds T_d - 1, T_d and T_d + 1: before the
    confirmation, after it (a weights purification shows here), and after the first step taken with a
    purified tracker (a gradient purification shows only here: round T_d's step used the tracker sent
    before it)."""
    from fedepic.extensions import oracle_round

    oracle = oracle_round(cfg)
    return (round_ % cfg.train.eval_every == 0 or round_ == cfg.rounds
            or (oracle is not None and oracle - 1 <= round_ <= oracle + 1))
