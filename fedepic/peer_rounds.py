"""The round engine of the decentralized mode: one loop, whatever runs the nodes.

A member (one entry of ``strategies:``) plays ``rounds`` rounds over the communication graph of its
``Routing``; each round is
1. node work: every active node computes what it sends (:meth:`PeerBackend.send`): under dpsgd its
   model after ``clients.local_epochs`` of local training, under dsgd its model (its gradient there
   already folded into its client momentum), under dsgt its (model, tracker) vector;
2. outgoing messages: the engine decides what travels over each edge, the model attacks included
   (``fedepic.peer_routing.outgoing``: benign nodes send their vector, malicious nodes a poisoned one
   crafted from the round's honest vectors, as an omniscient attacker);
3. each receiver's aggregation with its peer rule, then its step (dsgd: x_i <- R_i - eta m_i, or under
   ``decentralized.order=adapt_then_combine`` none, the step x_i - eta m_i having come before sending in
   step 1; dsgt: the tracker update), then, when ``peer_node.eval_due`` says so, every benign node's evaluation
   (:meth:`PeerBackend.receive`);
4. one metrics record (:func:`round_record`), over the BENIGN nodes.

The backends decide where steps 1 and 3 run: ``fedepic.peer_local`` (``LocalMember``, and
``fedepic.peer_stacked.StackedDsgdMember``: the nodes in this process) and
``simulations.dfl_apps.FlowerPeers`` (Flower ClientApps on Ray, one node per SuperNode; the Flower
ServerApp only routes); what a node computes in them is its algorithm's node step
(``fedepic.algorithms``), the same class on both. Everything else, the member loop (:func:`run_peer_member`: begin or resume
from the sink, then ``fedepic.member_loop.play_rounds``, the loop the server mode shares: rounds,
failure checks, checkpoints when due, the stop event; end) included, is written once, here. The engine imports neither Flower nor Ray (tests/test_layers.py).

Algorithms (``fedepic.peer_node`` has their equations and papers): dpsgd (Lian, Zhang, Zhang, Hsieh,
Zhang, Liu, "Can decentralized algorithms outperform centralized algorithms? A case study for
decentralized parallel stochastic gradient descent", NeurIPS 2017, https://arxiv.org/abs/1705.09056),
dsgd with client momentum, and dsgt (gradient tracking). With W the mixing weights of ``topology.mixing``
(Metropolis-Hastings by default) and R_i node i's peer rule (R = W for gossip), a dpsgd round is

    x_i <- R_i({train(x_j)}_{j in N(i) + i}),

the others are in ``peer_node``. No deviation from those modules: the engine only orders their steps.

Example: a member of a 2-node graph with one benign node (the record's figures are its own)::

    >>> import networkx as nx, torch
    >>> from fedepic.peer_routing import Routing
    >>> graph = nx.path_graph(2)
    >>> setting = PeerSetting(name="gossip", cfg=None, rule="gossip", routing=Routing(graph, {0: {0: .5, 1: .5},
    ...                       1: {0: .5, 1: .5}}), malicious=[1], benign=[0], active=[0, 1],
    ...                       roles={}, truth=None)
    >>> work = Sent({0: torch.ones(3), 1: torch.zeros(3)}, {0: {"train_loss": 0.5}}, [])
    >>> got = Received({0: {"accuracy": 0.75, "per_class": [1.0, 0.5]}}, {0: torch.full((3,), .5)},
    ...                {0: [], 1: []}, 0, {}, [])
    >>> record = round_record(setting, 1, work, got, 0, evaluated=True, one_step=False)
    >>> record["mean_accuracy"], record["per_class"], record["train_loss"], record["failures"]
    (0.75, [1.0, 0.5], 0.5, [])

Cost per round: what the backend's node work and rules cost, plus the attacks of
``peer_routing.outgoing`` (one attack per malicious node, per receiver under ``attack.per_neighbour``)
and the record (O(benign nodes x D) for the consensus distance).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from torch import Tensor

from fedepic.config import RunConfig, malicious_ids, member_config
from fedepic.errors import RunFailed
from fedepic.extensions import MODEL_ATTACKS, PEER_RULES
from fedepic.failures import check_failures, last_line
from fedepic.member_loop import PlayedRound, play_rounds
from fedepic.peer_node import STATEFUL, eval_due, one_step
from fedepic.peer_routing import (
    AttackTally, Routing, detection_record, detection_truth, divergence_counts, outgoing, receiver_defense,
    round_metrics,
)

Messages = Mapping[int, Mapping[int, Tensor]]  # {sender: {receiver: vector}}: what travels over each edge


# --------------------------------------------------------------------------- members and where they report


@dataclass
class Member:
    """One strategy run inside the simulation: its name (folder) and its peer strategy."""

    name: str
    strategy: str
    routing: Routing


@dataclass
class MemberStart:
    """Where a member's rounds begin: after round ``round`` (0: from the start), with ``states``
    (node id -> ``{"arrays", "config"}``, ``NodeState.to_plain``'s two parts) for the nodes to restore
    first, and ``attack``, a stateful model attack's memory (mimic's; ``peer_routing.poisoned_models``)."""

    round: int = 0
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    attack: dict[str, Any] = field(default_factory=dict)


class RunSink:
    """Where the engine reports; the runner implements it with run folders
    (``simulations.decentralized.FolderSink``)."""

    def finished(self, member: Member) -> bool:
        """True for a member a resumed run found completed: the engine skips it."""
        return False

    def begin(self, member: Member) -> MemberStart:
        return MemberStart()

    def round(self, member: Member, record: Mapping[str, Any]) -> None: ...

    def checkpoint(self, member: Member, round_: int, states: Mapping[int, Mapping[str, Any]], **extra: Any) -> None:
        """Round ``round_``'s metrics line is logged; ``states`` are the nodes' states after it; ``extra``
        holds ``attack``, a stateful model attack's memory (only when it has one: plain tensors and
        containers), which ``begin`` hands back in ``MemberStart.attack``."""

    def end(self, member: Member) -> None: ...


@dataclass(frozen=True)
class PeerSetting:
    """What a member's rounds are played over: its name, config (a variant's keys merged), rule, graph and
    weights, the malicious and benign nodes, the nodes that take part (``active``: under a rule with
    ``benign_graph``, ``upper``, the malicious nodes are cut off and sit out), the label roles the
    record scores, and the detection truth of a stateful rule (None for the others)."""

    name: str
    cfg: RunConfig
    rule: str
    routing: Routing
    malicious: list[int]
    benign: list[int]
    active: list[int]
    roles: Mapping[str, Sequence[int]]
    truth: Optional[set[tuple[int, int]]]


def peer_setting(cfg: RunConfig, member: Member, roles: Mapping[str, Sequence[int]]) -> PeerSetting:
    """The setting of ``member`` in the run of ``cfg`` (malicious nodes are the run's)."""
    rule, member_cfg = member_config(cfg, member.strategy)
    bad = sorted(malicious_ids(cfg))
    benign = [i for i in range(cfg.clients.count) if i not in set(bad)]
    active = list(benign) if PEER_RULES.has(rule, "benign_graph") else list(range(cfg.clients.count))
    truth = detection_truth(member.routing.graph, bad) if rule in STATEFUL else None
    return PeerSetting(member.name, member_cfg, rule, member.routing, bad, benign, active, roles, truth)


# --------------------------------------------------------------------------- what a round exchanges


@dataclass
class Sent:
    """A backend's node work: each node's outgoing vector (``flatten_state`` layout; dsgt: model, then
    tracker), its statistics (``train_loss``; ``train_seconds`` where the backend times its nodes) and
    the failures (each ``{"node", "phase", "reason"}``). A failed node is missing from ``vectors``: it
    sends nothing this round and keeps its model."""

    vectors: dict[int, Tensor]
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)


@dataclass
class Received:
    """What the nodes reported after aggregating: the benign nodes' evaluations and models when due
    (``evals[i]``: ``accuracy``, ``per_class``, ``collapsed``, ``attack_success``), every reporting
    node's confirmed neighbours (its detector's; empty for stateless rules), how many messages the
    rules left out or replaced as non-finite, the nodes' states (when a checkpoint is due) and the
    failures."""

    evals: dict[int, dict]
    models: dict[int, Tensor]
    confirmed: dict[int, list[int]]
    nonfinite: int
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    average: dict[str, float] = field(default_factory=dict)  # train.eval_average_model: peer_eval.average_record


class PeerBackend(Protocol):
    """How a member's nodes work and aggregate: in this process or as Flower apps on Ray."""

    setting: PeerSetting

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        """Checkpointed node states (``MemberStart.states``) the next round starts from."""

    def send(self, round_: int) -> Sent:
        """Phase 1: every active node's work of ``round_`` and the vector it sends."""

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        """Phase 2: every node that sent aggregates what ``messages`` hold for it ({sender: {receiver:
        vector}}, the attacks applied), steps, evaluates when due; with ``collect`` the nodes' states
        after the round come back too."""


# --------------------------------------------------------------------------- one round


def round_messages(setting: PeerSetting, work: Sent, round_: int, memory: Optional[dict] = None
                   ) -> tuple[dict[int, dict[int, Tensor]], int]:
    """What travels over each edge between the nodes that sent, with the model attacks
    (``peer_routing.outgoing``), and how many non-finite inputs the attacks left out or replaced. A
    benign sender's messages are its vector itself (the same tensor: backends may rely on it). An attack
    flagged ``needs_rule`` gets the receivers' defense (``peer_routing.receiver_defense``, built from the
    registry with the member's rule); a stateful one keeps ``memory`` (None: none across rounds)."""
    tally = AttackTally()
    graph = setting.routing.graph.subgraph(work.vectors.keys())
    cfg = setting.cfg
    defense = receiver_defense(cfg, setting.rule, round_) if MODEL_ATTACKS.has(cfg.attack.model, "needs_rule") else None
    sent = outgoing(cfg.attack, work.vectors, graph, setting.malicious, seed=cfg.seed, round_=round_, tally=tally,
                    defense=defense, memory=memory, weights=setting.routing.weights)
    return sent, tally.nonfinite_inputs


def round_record(setting: PeerSetting, round_: int, work: Sent, got: Received, attack_nonfinite: int, *,
                 evaluated: bool, one_step: bool) -> dict[str, Any]:
    """One round's metrics record, over the benign nodes (``peer_routing.round_metrics``): in rounds
    with evaluation the accuracies, per-class accuracy, consensus distance, attack success and
    divergence counts, in the others the detector's figures only; then the failures, the non-finite
    models the rules left out, the attacks' non-finite inputs, and the benign nodes' mean training
    loss (under dpsgd; NaN when none reported one; dsgd and dsgt report none, and their records have
    no ``train_loss``). The timings are the caller's (:func:`play_round`). Raises RunFailed when no
    benign node reported."""
    benign = setting.benign
    failures = work.failures + got.failures
    reported = [i for i in benign if i in got.confirmed]
    if not (any(i in got.evals for i in benign) if evaluated else reported):
        raise RunFailed(f"{setting.name}, round {round_}: no benign node reported "
                        f"({len(failures)} failures; first: {last_line(failures[0]['reason']) if failures else '?'})")
    truth = setting.truth
    confirmed = got.confirmed if truth is not None else None
    if evaluated:
        record = {"round": round_, **round_metrics(got.evals, got.models, benign, setting.roles, confirmed, truth)}
        record.update(divergence_counts(got.evals, got.models, benign))
        record.update(got.average)  # the average model's accuracies (train.eval_average_model)
    else:  # train.eval_every: the detector's figures only
        record = {"round": round_, **detection_record(reported, confirmed, truth)}
    record["failures"] = failures
    record["nonfinite_models"] = got.nonfinite  # left out (or replaced) by the nodes' rules
    record["attack_nonfinite_inputs"] = attack_nonfinite
    losses = [work.stats[i]["train_loss"] for i in benign if "train_loss" in work.stats.get(i, {})]
    if losses or not one_step:
        record["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
    return record


def play_round(backend: PeerBackend, round_: int, collect: bool = False, memory: Optional[dict] = None
               ) -> tuple[dict[str, Any], dict[int, dict]]:
    """One round of the member ``backend`` plays (module docstring): (its metrics record, the nodes'
    states after it when ``collect``); ``memory``: the member's attack memory (:func:`round_messages`). The record ends with the timings: ``node_train_seconds`` (the
    sum of the nodes' own training times) and ``train_phase_seconds`` (the node work's wall time) where
    the backend times its nodes, and ``seconds`` (the round's wall time)."""
    setting = backend.setting
    started = time.perf_counter()
    work = backend.send(round_)
    trained_at = time.perf_counter()
    if not work.vectors:  # every node failed: the check raises (it says how many, and why)
        check_failures(setting.cfg, f"{setting.name}, round {round_}", work.failures, len(setting.active))
    messages, attack_nonfinite = round_messages(setting, work, round_, memory)
    got = backend.receive(round_, work, messages, collect)
    record = round_record(setting, round_, work, got, attack_nonfinite,
                          evaluated=eval_due(setting.cfg, round_), one_step=one_step(setting.cfg))
    if any("train_seconds" in stats for stats in work.stats.values()):
        record["node_train_seconds"] = sum(float(stats.get("train_seconds", 0.0)) for stats in work.stats.values())
        record["train_phase_seconds"] = trained_at - started
    record["seconds"] = time.perf_counter() - started
    return record, got.states


# --------------------------------------------------------------------------- one member


def run_peer_member(cfg: RunConfig, member: Member, sink: RunSink, backend_for: Callable[[], PeerBackend],
                    stop: Optional[threading.Event] = None) -> None:
    """``member``'s ``cfg.rounds`` rounds (``cfg``: the run's) through ``sink``: skipped when the sink
    has it finished; else begin (maybe
    from a checkpoint, whose node states the backend restores), one ``round`` report per round (then
    the failure check: more than ``clients.max_failed_fraction`` failed nodes stop the run), a
    checkpoint after every ``checkpoint_every``-th round but the last, ``end``. ``backend_for`` builds
    the member's backend (after the finished check: a skipped member builds nothing). Raises
    RunInterrupted at the next round once ``stop`` is set.

    The checkpoint holds, per node, the state it reported last: a node that failed a checkpoint round
    keeps the one of the previous checkpoint (a resume restores that one, so after node failures a
    resumed run may differ from an uninterrupted one)."""
    if sink.finished(member):
        return
    backend = backend_for()
    start = sink.begin(member)
    backend.restore(start.states)
    saved = dict(start.states)
    memory = dict(start.attack)  # a stateful attack's memory across rounds (mimic), checkpointed with the states

    def play(round_: int, due: bool) -> PlayedRound:
        record, states = play_round(backend, round_, collect=due, memory=memory)
        return PlayedRound(record, len(backend.setting.active), states)

    def checkpoint(round_: int, played: PlayedRound) -> None:
        saved.update(played.states)
        sink.checkpoint(member, round_, saved, **({"attack": memory} if memory else {}))

    play_rounds(cfg, member.name, start.round + 1, play, lambda played: sink.round(member, played.record),
                checkpoint, stop)
    sink.end(member)
