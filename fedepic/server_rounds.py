"""The round engine of the server-based mode: one loop, whatever runs the clients' work.

A member (one strategy of ``strategies:``) plays ``rounds`` rounds; each round is
1. sampling: the engine draws the round's clients (:func:`sample_clients`);
2. node work: the backend runs the sampled clients' local work and returns their vectors
   (``fedepic.local_backend`` in this process, ``simulations.flower_backend`` as Flower ClientApps on Ray);
3. outgoing vectors: the omniscient model attacks (ALIE, IPM, min-max) replace the malicious rows,
   on parameters only (:func:`inject_model_attack`);
4. pre-aggregation (``defense.pre_aggregation``) of the updates;
5. aggregation: the backend's rule (tensor rules in process, Flower's strategies on Ray; tested equal);
6. the server step: under ``server.protocol=per_step`` w <- w - eta (agg + lambda w), else w <- agg;
7. evaluation of the global model, then one metrics record.

The backends decide how steps 2 and 5 run; everything else is written once, here, and the member
loop around the rounds (stop, report, failure check, checkpoint) is ``fedepic.member_loop.play_rounds``,
the decentralized mode's too. The engine imports
neither Flower nor Ray (tests/test_layers.py).

Per-step protocol (Karimireddy, He, Jaggi, "Learning from history for Byzantine robust optimization",
ICML 2021; Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by mixing: a recipe for
optimal Byzantine ML under heterogeneity", AISTATS 2023). Every sampled client sends its momentum
m_i <- beta m_i + (1 - beta) g_i (``fedepic.client_work.per_step_results``); the attacks replace the
malicious vectors, the optional pre-aggregation and the rule aggregate the momenta, and the server steps
    w_{t+1} = w_t - eta_t (agg(m_1, ..., m_n) + lambda w_t),   eta_t = server.lr (else train.lr),
                                                                  lambda = server.weight_decay,
on every float entry but the fixed normalisation buffers (no server momentum; beta =
``train.client_momentum`` is an average's weight: a step moves by about eta times the gradient; the
clients' gradients carry no L2, and ``train.momentum``, ``train.nesterov`` and ``train.weight_decay``,
which act on local training, are refused when set). The momenta are the "updates" there:
the attacks, NNM, clipping and the reported norms see m_i itself. The server keeps each m_i between
rounds (``Progress.momentum``), as it keeps local EPIC's drops, and checkpoints it: clients are stateless.

Attack injector (ALIE, IPM, min-max): each malicious row becomes w_global + attack(benign updates) (under
per_step: attack(benign momenta)): omniscient, colluding attackers, as in the papers. sign_flip,
gaussian and scaling act where the attacker trains (``fedepic.client_work``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch

from fedepic.attacks import attack_success
from fedepic.attacks.model_attacks import (
    AttackOutcome, honest_rows_needed, model_attack_arguments, needs_honest, run_model_attack,
)
from fedepic.client_work import model_for, pack_epic_state, state_parameters, unpack_epic_state
from fedepic.config import RunConfig, malicious_ids
from fedepic.data import ImageData
from fedepic.member_loop import PlayedRound, play_rounds
from fedepic.metrics import nonfinite_model
from fedepic.models import FIXED_BUFFERS
from fedepic.outputs import RunWriter
from fedepic.seeds import server_attack_seed, server_round_seed
from fedepic.server_checkpoints import elapsed, save_member_checkpoint
from fedepic.attacks.optimized import defense_aggregator
from fedepic.extensions import MODEL_ATTACKS, SERVER_RULES, pre_aggregation_steps, protocol_has
from fedepic.root_set import server_update
from fedepic.train import evaluate, resolve_device, round_lr
from fedepic.vectors import (
    finite_rows, flatten_state, float_keys, selector, unflatten_like,
)


# --------------------------------------------------------------------------- what a round exchanges


@dataclass
class ClientReply:
    """One client's answer: its id, the vector it sends (``flatten_state`` layout: its model, or its
    momentum under per_step) and its metrics (the keys of ``fedepic.client_work.local_train``)."""

    client: int
    vector: torch.Tensor
    metrics: dict[str, Any]


@dataclass
class NodeWork:
    """What a backend's node work returned for one round: the valid replies in client order, the
    failures (each ``{"node", "client", "reason"}``) and how many clients were asked."""

    replies: list[ClientReply]
    failures: list[dict] = field(default_factory=list)
    asked: int = 0
    server_update: Optional[torch.Tensor] = None  # the server's own update [P] (FLTrust's root set), or None


@dataclass
class Aggregated:
    """A backend's aggregation: the aggregated parameter update [P] (None: the round is skipped)
    and per valid reply whom the rule left out whole, the share of coordinates it cut, and whether the
    reply was left out for holding NaN / inf."""

    vector: Optional[torch.Tensor]
    excluded: Optional[list[bool]]
    trimmed_share: Optional[list[float]] = None
    nonfinite: Optional[list[bool]] = None

    @property
    def nonfinite_count(self) -> int:
        return sum(self.nonfinite or [])


class ServerBackend(Protocol):
    """How node work and aggregation run: in process (tensors) or as Flower apps on Ray."""

    def train(self, rnd: int, clients: Sequence[int], progress: "Progress") -> NodeWork:
        """The sampled clients' (positions in client order) work at ``progress.like``; reads and updates
        their server-held state (``progress.epic``, ``progress.momentum``)."""

    def aggregate(self, rnd: int, work: NodeWork, updates: torch.Tensor) -> Aggregated:
        """The rule over ``updates`` [n, P]: the replies' parameter updates after attacks and
        pre-aggregation (rows all NaN for a reply that held NaN / inf); its vector is the aggregated
        update [P]."""

    def state_dict(self) -> dict:
        """The rule's memory across rounds (plain data, for checkpoints)."""

    def load_state_dict(self, state: dict) -> None: ...


# --------------------------------------------------------------------------- member state


@dataclass
class Tally:
    """Replies left out whole, by malicious / benign sender, and failures, over all rounds of a member."""

    malicious: int = 0
    malicious_excluded: int = 0
    benign: int = 0
    benign_excluded: int = 0
    failures: int = 0

    def add(self, malicious: list[bool], excluded: Optional[list[bool]], failures: int) -> None:
        self.failures += failures
        for bad, out in zip(malicious, excluded or []):
            if bad:
                self.malicious, self.malicious_excluded = self.malicious + 1, self.malicious_excluded + int(out)
            else:
                self.benign, self.benign_excluded = self.benign + 1, self.benign_excluded + int(out)

    def rates(self) -> dict:
        rate = lambda hit, total: hit / total if total else None  # noqa: E731
        return {"malicious_excluded": rate(self.malicious_excluded, self.malicious),
                "benign_excluded": rate(self.benign_excluded, self.benign), "failures": self.failures}


@dataclass
class Progress:
    """What decides a member's next rounds besides the config and the rule (its checkpoint)."""

    like: dict[str, torch.Tensor]  # the global model
    tally: Tally = field(default_factory=Tally)
    recalls: list[float] = field(default_factory=list)  # the last round's local EPIC recalls
    diverged_round: Optional[int] = None  # the first round whose global model is non-finite
    nonfinite: int = 0  # replies left out because their vectors held NaN / inf (they never reach the model)
    epic: dict[int, dict] = field(default_factory=dict)  # client id -> its packed local EPIC state
    momentum: dict[int, torch.Tensor] = field(default_factory=dict)  # per_step: client id -> m_i
    attack: dict = field(default_factory=dict)  # a stateful model attack's memory (mimic's warm-up)

    def state_dict(self) -> dict:
        """The checkpoint's part (fedepic.checkpoint's format): each client's local EPIC state as
        ``{"keep": bool tensor [rows], "selections": int}``, as centralized-epic saves its own, not the
        bit-packed bytes its messages carry."""
        return {"like": self.like, "tally": dataclasses.asdict(self.tally), "recalls": list(self.recalls),
                "diverged_round": self.diverged_round, "nonfinite": self.nonfinite,
                "epic": {pid: epic_tensors(state) for pid, state in self.epic.items()},
                "momentum": dict(self.momentum), "attack": dict(self.attack)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Progress":
        return cls(dict(state["like"]), Tally(**state["tally"]), list(state["recalls"]), state["diverged_round"],
                   int(state["nonfinite"]), {int(pid): epic_packed(s) for pid, s in state["epic"].items()},
                   {int(pid): m for pid, m in state.get("momentum", {}).items()}, dict(state.get("attack", {})))


def epic_tensors(packed: dict) -> dict:
    """A client's packed local EPIC state (``fedepic.client_work.pack_epic_state``) as checkpoint data."""
    state = unpack_epic_state(packed)
    return {"keep": torch.tensor(state["keep"], dtype=torch.bool), "selections": int(state["selections"])}


def epic_packed(saved: dict) -> dict:
    """:func:`epic_tensors` packed again; a checkpoint of an earlier version holds the packed state itself."""
    if isinstance(saved["keep"], bytes):
        return dict(saved)
    return pack_epic_state({"keep": saved["keep"].tolist(), "selections": int(saved["selections"])})


@dataclass
class Target:
    """What measures the attack: the gradient-matching target image (None for the other attacks)."""

    x: Optional[torch.Tensor] = None
    adversarial_class: Optional[int] = None


@dataclass
class MemberResult:
    """One member's comparison row and per-round curves; filled in place, so an interrupted member
    still has its finished rounds."""

    row: dict = field(default_factory=dict)
    # with train.eval_every > 1 the rounds evaluated are a subset: "accuracy@x" holds them (fedepic.plots)
    curves: dict[str, list[float]] = field(default_factory=lambda: {
        "accuracy": [], "attack_success": [], "accuracy@x": [], "attack_success@x": []})


class Evaluator:
    """Test accuracy, per-class accuracy and attack success of a global model (one model reused)."""

    def __init__(self, cfg: RunConfig, data: ImageData, target: Target) -> None:
        self.cfg, self.data, self.target = cfg, data, target
        self.device = resolve_device(cfg.train.device)
        self.model = model_for(cfg, data).to(self.device)
        # which entries of a flatten_state of the global model are parameters: one layout per run
        self.parameters = state_parameters(self.model)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict:
        self.model.load_state_dict(state)
        return self.measure(self.model)

    def measure(self, model: torch.nn.Module) -> dict:
        cfg, data = self.cfg, self.data
        ev = evaluate(model, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes, cfg.train.amp)
        success = attack_success(model, cfg.attack, data.test_x, data.test_y, data.num_classes, self.target.x,
                                 self.target.adversarial_class)
        return {"accuracy": ev["accuracy"], "loss": ev["loss"], "per_class": ev["per_class"],
                "collapsed": ev["collapsed"], "attack_success": success}


def fixed_mask(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which entries of ``flatten_state(state)`` are the fixed normalisation buffers (never trained)."""
    keys = float_keys(state)
    return torch.cat([torch.full((state[k].numel(),), k in FIXED_BUFFERS, dtype=torch.bool) for k in keys]) \
        if keys else torch.zeros(0, dtype=torch.bool)


# --------------------------------------------------------------------------- the steps of a round


def per_step(cfg: RunConfig) -> bool:
    """Whether the run's server protocol takes one step per round (flag ``one_step``: per_step): clients
    send their momenta, the server steps (module docstring); else clients train local epochs."""
    return protocol_has(cfg, "one_step")


def sample_clients(cfg: RunConfig, rnd: int) -> list[int]:
    """The round's clients, as positions in client order: ``max(int(count * fraction_train), 1)`` of them,
    drawn by ``random.Random(seed * 7919 + rnd).sample`` and sorted. The same draw as Flower's
    ``sample_nodes`` after ``random.seed(seed * 7919 + rnd)`` over nodes listed in client order, so both
    backends train the same clients, and every member sees the same ones."""
    count = cfg.clients.count
    size = max(int(count * cfg.clients.fraction_train), 1)
    return sorted(random.Random(server_round_seed(cfg.seed, rnd)).sample(list(range(count)), size))


def server_lr(cfg: RunConfig, rnd: int) -> float:
    """eta_t of the per-step server step: server.lr (else train.lr), with the milestone schedule."""
    return round_lr(cfg, rnd, cfg.server.lr)


def server_step(like: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], lr: float,
                weight_decay: float) -> dict[str, torch.Tensor]:
    """w - lr (d + weight_decay w) on every float entry but the fixed normalisation buffers."""
    out = {}
    for key, value in like.items():
        if torch.is_floating_point(value) and key not in FIXED_BUFFERS:
            out[key] = value - lr * (direction[key].to(value.dtype) + weight_decay * value)
        else:
            out[key] = value.clone()
    return out


def inject_model_attack(cfg: RunConfig, malicious: list[bool], stack: torch.Tensor, global_vec: torch.Tensor,
                        seed: int, mask: Optional[torch.Tensor] = None, rule: Optional[str] = None,
                        memory: Optional[dict] = None, clients: Optional[list[int]] = None,
                        rule_state: Optional[dict] = None, round_: Optional[int] = None) -> Optional[AttackOutcome]:
    """Omniscient ALIE / IPM / min-max: the attack vector (``update`` = global model + attack) built
    from the round's benign updates (rows of `stack` minus `global_vec`), with the count of non-finite
    inputs it left out; None when it does not apply this round. Only the entries ``mask`` selects (the
    model's parameters) are attacked; the others (buffers) are the first malicious reply's own.

    ALIE uses n = replies, f = malicious replies (z from Baruch et al. unless attack.alie_z is set). An
    attack flagged ``needs_rule`` (the optimized ALIE / IPM) gets the member's defense, ``rule`` with the
    pre-aggregation steps, as its ``aggregator``, with a copy of the rule's state the server holds now
    (``rule_state``: the previous round's centre of centered clipping, MoNNA's reference, and the round's
    inputs to the rule: ``round``, FLTrust's ``server_update``) and the pre-aggregation steps of round
    ``round_`` (bucketing's permutation); a stateful one (mimic) keeps its memory in ``memory``
    (the member's ``Progress.attack``) and gets the benign replies' client ids (``clients``: every reply's).
    """
    n_bad = sum(malicious)
    if not needs_honest(cfg.attack.model) or n_bad == 0:
        return None
    entries = slice(None) if mask is None else selector(mask)
    origin = global_vec[..., entries]
    benign = stack[[i for i, bad in enumerate(malicious) if not bad]][..., entries] - origin
    first_bad = stack[malicious.index(True)]
    own = first_bad[..., entries] - origin
    defense = defense_aggregator(cfg, rule, rule_state, round_) \
        if rule and MODEL_ATTACKS.has(cfg.attack.model, "needs_rule") else None
    ids = None if clients is None else [c for c, bad in zip(clients, malicious) if not bad]
    params = model_attack_arguments(cfg.attack, n=len(malicious), f=n_bad, aggregator=defense, state=memory, ids=ids)
    if len(benign) < honest_rows_needed(cfg.attack.model, params):
        return None
    outcome = run_model_attack(cfg.attack.model, benign, own, torch.Generator().manual_seed(seed), **params)
    update = first_bad.clone()
    update[..., entries] = origin + outcome.update
    return AttackOutcome(update, outcome.nonfinite)


def rule_memory(backend: ServerBackend) -> dict:
    """The tensor rule's state the backend holds across rounds (``RuleAggregation.rule_state``: the
    ``"rule"`` entry of its state_dict, on both backends; empty for a Flower strategy, whose tensor twin
    is stateless), for an attack that searches against the defense (``defense_aggregator`` copies it)."""
    return backend.state_dict().get("rule", {})


def pre_aggregate_updates(updates: torch.Tensor, steps: Sequence) -> torch.Tensor:
    """The steps applied in order to the finite rows of ``updates`` [n, P]; a non-finite row is left as
    it is (the rule leaves it out), and the steps never see it."""
    ok = finite_rows(updates)
    if not steps or int(ok.sum()) == 0:
        return updates
    rows = updates[ok]
    for step in steps:
        rows = step(rows)
    out = updates.clone()
    out[ok] = rows
    return out


def _known(value: Any) -> Optional[float]:
    return None if value is None or value < 0 else float(value)


def client_records(replies: list[ClientReply], malicious: list[bool], norms: list[float],
                   outcome: Aggregated) -> list[dict]:
    records = []
    for i, reply in enumerate(replies):
        info = reply.metrics
        records.append({
            "id": reply.client, "malicious": malicious[i],
            "examples": int(info.get("trained-rows", info["num-examples"])),
            "train_loss": _known(info["train-loss"]), "train_seconds": float(info["train-seconds"]),
            "update_norm": norms[i],
            "excluded": None if outcome.excluded is None else bool(outcome.excluded[i]),
            "trimmed_share": None if outcome.trimmed_share is None else outcome.trimmed_share[i],
            "nonfinite": bool(outcome.nonfinite[i]) if outcome.nonfinite else False,  # NaN/inf: left out
            "epic_dropped_rows": int(info["epic-dropped"]), "epic_selections": int(info["epic-selections"]),
            "epic_skipped_nonfinite": int(info.get("epic-skipped-nonfinite", 0)),
            "attack_nonfinite": int(info.get("attack-nonfinite", 0)),
            "poison_recall": _known(info["epic-poison-recall"]),
        })
    return records


def parameter_updates(stack: torch.Tensor, origin: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """The rows' updates on the model's parameters, ``stack - origin`` on the ``parameters`` entries
    [n, P]: what pre-aggregation and every rule see, on both backends. Buffers never enter a rule. A row
    holding NaN / inf anywhere (a diverged client's BatchNorm statistics included) is all NaN here, so
    that every rule leaves it out whole."""
    entries = selector(parameters)
    updates = stack[..., entries] - origin[..., entries]
    finite = finite_rows(stack)
    if not bool(finite.all()):
        updates[~finite] = float("nan")
    return updates


def new_vector(origin: torch.Tensor, outcome: Aggregated, stack: torch.Tensor, parameters: torch.Tensor,
               fixed: torch.Tensor, work: NodeWork) -> torch.Tensor:
    """The aggregate in the ``flatten_state`` layout: the parameters are ``origin`` plus the rule's
    aggregated update; the fixed normalisation buffers stay ``origin``'s; other buffers (BatchNorm
    running statistics) are the example-weighted mean of the rows the rule used whole (every finite
    row for a coordinate-wise rule), the same on both backends."""
    vector = origin.clone()
    entries = selector(parameters)
    vector[..., entries] = origin[..., entries] + outcome.vector.to(vector.dtype)
    statistics = ~parameters & ~fixed
    if bool(statistics.any()):
        out = [bool(x) for x in (outcome.excluded or [False] * len(work.replies))]
        bad = [bool(x) for x in (outcome.nonfinite or [False] * len(work.replies))]
        rows = [i for i in range(len(work.replies)) if not out[i] and not bad[i]]
        if rows:
            w = torch.tensor([float(work.replies[i].metrics["num-examples"]) for i in rows], dtype=torch.float64)
            vector[statistics] = ((w / w.sum())[:, None] * stack[rows][:, statistics].double()).sum(dim=0).float()
    return vector


# --------------------------------------------------------------------------- one round, one member


def play_round(cfg: RunConfig, name: str, backend: ServerBackend, rnd: int, evaluator: Evaluator,
               progress: Progress) -> tuple[dict, int]:
    """One round of member ``name`` (module docstring). Updates ``progress``; returns the round's
    metrics record and the number of clients asked."""
    t0 = time.perf_counter()
    work = backend.train(rnd, sample_clients(cfg, rnd), progress)
    replies = work.replies
    bad_ids = set(malicious_ids(cfg))
    malicious = [r.client in bad_ids for r in replies]
    like = progress.like
    # the vectors' origin: per_step clients send momenta, the others models (updates are model - global)
    global_vec = torch.zeros(flatten_state(like).numel()) if per_step(cfg) else flatten_state(like)
    stack = torch.stack([r.vector for r in replies]) if replies else torch.zeros(0)
    parameters = evaluator.parameters
    if replies and name in SERVER_RULES and SERVER_RULES.has(name, "server_update"):  # FLTrust's root set
        work.server_update = server_update(cfg, evaluator.data, like, rnd, parameters)
    # the rule's state as the backend will hand it to the rule this round (its memory and this call's inputs)
    call_state = {**rule_memory(backend), "round": rnd,
                  **({"server_update": work.server_update} if work.server_update is not None else {})}
    injected = inject_model_attack(cfg, malicious, stack, global_vec, server_attack_seed(cfg.seed, rnd),
                                   parameters, rule=name, memory=progress.attack,
                                   clients=[r.client for r in replies],
                                   rule_state=call_state, round_=rnd) if replies else None
    for i in (i for i, bad in enumerate(malicious) if bad and injected is not None):
        stack[i] = injected.update
    updates = parameter_updates(stack, global_vec, parameters) if replies else torch.zeros(0)
    if cfg.defense.pre_aggregation and replies:  # NNM / clipping of the updates, then the rule
        updates = pre_aggregate_updates(updates, pre_aggregation_steps(cfg, rnd))
    outcome = backend.aggregate(rnd, work, updates) if replies else Aggregated(None, [], None, [])
    progress.nonfinite += outcome.nonfinite_count
    if outcome.vector is not None:
        vector = new_vector(global_vec, outcome, stack, parameters, fixed_mask(like), work)
        if per_step(cfg):
            progress.like = server_step(like, unflatten_like(vector, like), server_lr(cfg, rnd),
                                        cfg.server.weight_decay)
        else:
            progress.like = unflatten_like(vector, like)
    evaluated = rnd % cfg.train.eval_every == 0 or rnd == cfg.rounds
    ev = evaluator(progress.like) if evaluated else dict.fromkeys(("accuracy", "loss", "per_class", "attack_success"))
    diverged = nonfinite_model(bool(torch.isfinite(flatten_state(progress.like)).all()), ev if evaluated else None)
    if diverged and progress.diverged_round is None:
        progress.diverged_round = rnd
    clients = client_records(replies, malicious, updates.norm(dim=1).tolist() if replies else [], outcome)
    progress.tally.add(malicious, outcome.excluded, len(work.failures))
    progress.recalls = [c["poison_recall"] for c in clients if c["poison_recall"] is not None]
    return {
        "round": rnd, "strategy": name, "accuracy": ev["accuracy"], "loss": ev["loss"],
        "attack_success": ev["attack_success"], "per_class": ev["per_class"],
        "excluded": None if outcome.excluded is None else sorted(c["id"] for c in clients if c["excluded"]),
        "malicious_replies": sum(malicious), "aggregated": outcome.vector is not None,
        "attack_injected": cfg.attack.model if injected is not None else None,
        # NaN / inf vectors a model attack left out (server side) or replaced (the attackers' own updates)
        "attack_nonfinite_inputs": (injected.nonfinite if injected is not None else 0)
        + sum(c["attack_nonfinite"] for c in clients),
        "failures": work.failures, "clients": clients, "diverged": diverged,
        "collapsed": bool(ev["collapsed"]) if evaluated else None,  # one class predicted for every test image
        "seconds": time.perf_counter() - t0,
    }, work.asked


def with_x(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """Saved curves, with the "@x" rounds a checkpoint of an earlier version lacks (then every round)."""
    out = {k: list(v) for k, v in curves.items()}
    for key in ("accuracy", "attack_success"):
        out.setdefault(f"{key}@x", list(range(1, len(out.get(key, [])) + 1)))
    return out


def append_point(curves: dict[str, list[float]], rnd: int, accuracy: float, success: Optional[float]) -> None:
    curves["accuracy"].append(accuracy)
    curves["attack_success"].append(math.nan if success is None else success)
    for key in ("accuracy@x", "attack_success@x"):
        curves.setdefault(key, []).append(rnd)


def member_row(name: str, curves: dict[str, list[float]], seconds: float) -> dict:
    acc = curves["accuracy"]
    asr = curves["attack_success"]
    final_asr = asr[-1] if asr and not math.isnan(asr[-1]) else None
    return {"strategy": name, "final_accuracy": acc[-1] if acc else None, "best_accuracy": max(acc) if acc else None,
            "attack_success": final_asr, "seconds": seconds}


def run_member(cfg: RunConfig, name: str, backend: ServerBackend, initial: dict[str, torch.Tensor],
               evaluator: Evaluator, member: RunWriter, stop: threading.Event, result: MemberResult,
               check_failures: Any, saved: Optional[dict] = None) -> None:
    """``cfg.rounds`` rounds of member ``name``: one record per round to the member's metrics.jsonl and
    a checkpoint after every ``checkpoint_every``-th (fedepic/server_checkpoints.py). With ``saved``
    (such a checkpoint) the member continues after the round it was written in; ``initial`` is the
    global model of a fresh member. ``check_failures(cfg, where, failures, asked)`` raises past
    ``max_failed_fraction``.

    poison_recall in the row: the mean over clients with poisoned rows of local EPIC's cumulative
    recall after the last round (None without local EPIC or poisons).
    """
    started = time.perf_counter() - elapsed(saved)
    if saved is None:
        progress, first = Progress(initial), 1
    else:
        progress, first = Progress.from_state_dict(saved["progress"]), int(saved["round"]) + 1
        backend.load_state_dict(saved["strategy"])
        result.curves = with_x(saved["curves"])

    def play(rnd: int, due: bool) -> PlayedRound:
        return PlayedRound(*play_round(cfg, name, backend, rnd, evaluator, progress))

    def report(played: PlayedRound) -> None:
        record = played.record
        member.log(record)
        if record["accuracy"] is not None:
            append_point(result.curves, record["round"], record["accuracy"], record["attack_success"])

    def checkpoint(rnd: int, played: PlayedRound) -> None:
        save_member_checkpoint(member, {"member": name, "round": rnd, "progress": progress.state_dict(),
                                        "strategy": backend.state_dict(), "curves": result.curves}, started)

    last = play_rounds(cfg, name, first, play, report, checkpoint, stop, check_failures)
    record = last.record if last is not None else {}
    recalls = progress.recalls
    result.row = {**member_row(name, result.curves, time.perf_counter() - started), **progress.tally.rates(),
                  "poison_recall": sum(recalls) / len(recalls) if recalls else None,
                  "diverged_round": progress.diverged_round, "nonfinite_replies": progress.nonfinite,
                  "collapsed": bool(record["collapsed"]) if record else None}  # the last round is always evaluated
