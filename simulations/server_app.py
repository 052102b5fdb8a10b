"""The Flower ServerApp of the server-based simulation: every strategy of `strategies:` in turn over the
same nodes, data, partition, attack and seed, then one comparison table and plot.

Per member (strategy) and round: the strategy's own `configure_train` samples the clients; replies
are collected with `messaging.exchange` (Ctrl-C aware); the attack injector replaces the arrays of
malicious replies for the omniscient model attacks; the strategy's own `aggregate_train`
aggregates (through `strategies.server.TrackedStrategy`, which also reports whom it left out); the
server evaluates the global model on the test set (accuracy, per-class accuracy, attack success).
A reply that carries an error (the client raised or died) is recorded in that round's `failures`
and the round goes on with the others.

Clients are stateless: the server holds each client's local EPIC state (per member), takes it out of
the client's train reply before aggregating and sends it back with the client's next train message
(client_app.py). Nodes are listed to Flower's samplers in partition order (`PartitionGrid`), so the
clients drawn in a round depend on the seed and the round only, not on the random node ids of a run.
Each member checkpoints everything that decides its next rounds after every `checkpoint_every`-th
round, and a resumed run (`open_run(cfg, resume=...)`) continues from there: see server_checkpoints.py.

Per-step protocol (``server.protocol=per_step``; Karimireddy, He, Jaggi, "Learning from history for
Byzantine robust optimization", ICML 2021; Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
"Fixing by mixing: a recipe for optimal Byzantine ML under heterogeneity", AISTATS 2023). In round t
every sampled client sends its momentum m_i (client_app.py: one minibatch gradient g_i at w_t,
m_i <- beta m_i + (1 - beta) g_i), the attacks replace the malicious vectors, the optional
pre-aggregation and the strategy aggregate the momenta, and the server steps

    w_{t+1} = w_t - eta_t (agg(m_1, ..., m_n) + lambda w_t),   eta_t = server.lr (else train.lr),
                                                                  lambda = train.weight_decay,

on every float entry but the fixed normalisation buffers (no server momentum; ``train.nesterov`` does not
apply, and ``train.momentum`` is an average's weight: a step moves by about eta times the gradient,
not eta / (1 - beta) as heavy-ball momentum would). The momenta are the "updates" there: the
attacks, NNM, clipping (radius on m_i) and the reported norms see m_i itself, not w_t + m_i.
Translation-equivariant rules (mean, median, trimmed mean, Krum, Bulyan) aggregate m_i exactly as
they would the models w_t - eta m_i. The server keeps each m_i between rounds, as it keeps local
EPIC's drops, and checkpoints it.

Attack injector (ALIE, IPM, min-max): these attacks need the round's benign updates, so they are
applied here, after the replies arrive and before aggregation. This simulates omniscient, colluding
attackers, as in the papers: each malicious reply's model becomes w_global + attack(benign updates)
(under per_step: its momentum becomes attack(benign momenta)).
sign_flip, gaussian and scaling are applied by the clients themselves (client_app.py).

`centralized-epic` is a reference row without Flower: all clients' (attacked) rows pooled and
trained centrally with EPIC for rounds * local_epochs epochs (defense.epic warmup / interval in
epochs, as in mode=centralized), evaluated every local_epochs epochs so that its curve lines up
with the rounds.

The same ServerApp runs under `run_simulation` (simulations/federated.py passes the config, the run's
lifecycle and the stop event) and under `flwr run` (module-level `app`: the config file name comes from
run_config["fedepic-config"], optional overrides from run_config["fedepic-overrides"]). Either way the
run folder's statuses, comparison and summary are written by fedepic.lifecycle when the run ends.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from fedepic.attacks import attack_success
from fedepic.attacks.model_attacks import (
    AttackOutcome, honest_rows_needed, model_attack_arguments, needs_honest, run_model_attack,
)
from fedepic.builders import build_model, epic_schedule
from fedepic.metrics import diverged_from_round, diverged_members, nonfinite_model, poison_stats
from fedepic.models import FIXED_BUFFERS
from fedepic.checkpoint import Resume, checkpoint_due
from fedepic.config import RunConfig, load_config, malicious_ids, to_yaml
from fedepic.data import ImageData, load_dataset
from fedepic.epic import EpicState
from fedepic.interrupts import Interrupts
from fedepic.columns import FEDERATED
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle
from fedepic.outputs import RunWriter
from fedepic.report import setting_title
from fedepic.train import evaluate, fit, resolve_device, torch_threads
from fedepic.errors import RunInterrupted
from fedepic.vectors import flatten_state, parameter_mask, unflatten_like
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from simulations.client_app import CONFIG_KEY, EPIC_KEY, MEMBER_KEY, MOMENTUM_KEY, model_for
from simulations.dfl_node import round_lr
from simulations.client_data import build_client_data, client_partition, partition_report, poison_set, worker_config
from simulations.flower_runtime import interrupted_quietly, quiet_flower
from simulations.messaging import check_failures, exchange, wait_for_nodes
from simulations.server_checkpoints import (
    elapsed, kept_row_and_curves, restore_root, save_member_checkpoint,
)
from strategies.epic_server import record_vector
from strategies.preaggregation import build_steps, pre_aggregate_updates
from strategies.server import TrackedStrategy, build_server_strategy

ROUND_TIMEOUT_S = 3600.0
NODE_WAIT_S = 300.0
COMPARISON_COLUMNS, PANELS = FEDERATED.columns, FEDERATED.panels


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

    def __call__(self, state: dict[str, torch.Tensor]) -> dict:
        self.model.load_state_dict(state)
        return self.measure(self.model)

    def parameter_mask(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Which entries of ``flatten_state(state)`` are the model's parameters (not its buffers)."""
        return parameter_mask(self.model, state)

    def measure(self, model: torch.nn.Module) -> dict:
        cfg, data = self.cfg, self.data
        ev = evaluate(model, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes, cfg.train.amp)
        success = attack_success(model, cfg.attack, data.test_x, data.test_y, data.num_classes, self.target.x,
                                 self.target.adversarial_class)
        return {"accuracy": ev["accuracy"], "loss": ev["loss"], "per_class": ev["per_class"],
                "collapsed": ev["collapsed"], "attack_success": success}


# --------------------------------------------------------------------------- attack injector


def inject_model_attack(cfg: RunConfig, malicious: list[bool], stack: torch.Tensor, global_vec: torch.Tensor,
                        seed: int, mask: Optional[torch.Tensor] = None) -> Optional[AttackOutcome]:
    """Omniscient ALIE / IPM / min-max: the attack vector (``update`` = global model + attack) built
    from the round's benign updates (rows of `stack` minus `global_vec`), with the count of non-finite
    inputs it left out; None when it does not apply this round. Only the entries ``mask`` selects (the
    model's parameters, fedepic.vectors.parameter_mask) are attacked; the others (buffers) are the
    first malicious reply's own.

    ALIE uses n = replies, f = malicious replies (z from Baruch et al. unless attack.alie_z is set).
    """
    n_bad = sum(malicious)
    if not needs_honest(cfg.attack.model) or n_bad == 0:
        return None
    mask = torch.ones(stack.shape[1], dtype=torch.bool) if mask is None else mask
    benign = (stack[[i for i, bad in enumerate(malicious) if not bad]] - global_vec)[:, mask]
    first_bad = stack[malicious.index(True)]
    own = (first_bad - global_vec)[mask]
    params = model_attack_arguments(cfg.attack, n=len(malicious), f=n_bad)
    if len(benign) < honest_rows_needed(cfg.attack.model, params):
        return None
    outcome = run_model_attack(cfg.attack.model, benign, own, torch.Generator().manual_seed(seed), **params)
    update = first_bad.clone()
    update[mask] = global_vec[mask] + outcome.update
    return AttackOutcome(update, outcome.nonfinite)


def _array_key(msg: Message) -> str:
    return next(iter(msg.content.array_records.keys()))


def _client_metrics(msg: Message) -> dict:
    return dict(next(iter(msg.content.metric_records.values())))


def _reply_order(msg: Message) -> tuple[int, int]:
    """Replies arrive in any order; aggregating them by client id makes float sums (and Krum's ties)
    reproducible from run to run."""
    if msg.has_error():
        return (1, int(msg.metadata.src_node_id))
    return (0, int(_client_metrics(msg)["partition-id"]))


def _known(value: Any) -> Optional[float]:
    return None if value is None or value < 0 else float(value)


# --------------------------------------------------------------------------- one Flower strategy


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


def _failures(messages: list[Message], replies: list[Message], partitions: Mapping[int, int]) -> list[dict]:
    """The round's failed clients: an error reply (a raising client, a killed worker) or none before the
    timeout; each names Flower's node and the client id (its partition) where known."""
    def failure(node: int, reason: str) -> dict:
        return {"node": node, "client": partitions.get(node), "reason": reason}

    answered = {int(m.metadata.src_node_id) for m in replies}
    out = [failure(int(m.metadata.src_node_id), m.error.reason) for m in replies if m.has_error()]
    return out + [failure(int(m.metadata.dst_node_id), "no reply before the timeout") for m in messages
                  if int(m.metadata.dst_node_id) not in answered]


def _client_records(valid: list[Message], malicious: list[bool], norms: list[float], outcome: Any) -> list[dict]:
    records = []
    for i, msg in enumerate(valid):
        info = _client_metrics(msg)
        records.append({
            "id": int(info["partition-id"]), "malicious": malicious[i],
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


@dataclass
class Progress:
    """What decides a member's next rounds besides the config and the strategy (its checkpoint)."""

    like: dict[str, torch.Tensor]  # the global model
    tally: Tally = field(default_factory=Tally)
    recalls: list[float] = field(default_factory=list)  # the last round's local EPIC recalls
    diverged_round: Optional[int] = None  # the first round whose global model is non-finite
    nonfinite: int = 0  # replies left out because their vectors held NaN / inf (they never reach the model)
    epic: dict[int, dict] = field(default_factory=dict)  # partition id -> its packed local EPIC state
    # per_step: partition id -> its m_i as the ArrayRecord the client's reply carried, sent back as it
    # came: deserialising and serialising every m_i each step cost about 10 ms of a 12-client step of
    # cnn_mnist here, for bytes that go back unchanged (checkpoints hold tensors)
    momentum: dict[int, ArrayRecord] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"like": self.like, "tally": dataclasses.asdict(self.tally), "recalls": list(self.recalls),
                "diverged_round": self.diverged_round, "nonfinite": self.nonfinite,
                "epic": {pid: dict(state) for pid, state in self.epic.items()},
                "momentum": {pid: m.to_torch_state_dict()["m"] for pid, m in self.momentum.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Progress":
        return cls(dict(state["like"]), Tally(**state["tally"]), list(state["recalls"]), state["diverged_round"],
                   int(state["nonfinite"]), {int(pid): dict(s) for pid, s in state["epic"].items()},
                   {int(pid): ArrayRecord({"m": m}) for pid, m in state.get("momentum", {}).items()})


class PartitionGrid:
    """The run's Grid, listing its nodes in partition-id order.

    Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)``, and simulated nodes
    get random ids in every run (a set, in no set order): after ``random.seed`` the same positions are
    drawn, but they held other clients in another run, or in a resumed one (whose nodes are new).
    Listed by partition, the sample depends on the seed and the round alone. ``partitions`` (node id
    -> partition id) is filled from the warm-up replies and every train reply; nodes of unknown
    partition (a failed warm-up) come last, by id.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.partitions: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        known = self.partitions
        return sorted(self.grid.get_node_ids(), key=lambda n: (n not in known, known.get(n, 0), n))

    def __getattr__(self, name: str) -> Any:  # everything else is the Grid's
        return getattr(self.grid, name)


def _with_client_state(msg: Message, grid: PartitionGrid, progress: Progress) -> Message:
    """``msg`` carrying the receiving client's local EPIC state and momentum, where the server holds
    them (a new Message: Flower's strategies give all messages of a round one content)."""
    partition = grid.partitions.get(int(msg.metadata.dst_node_id))
    if partition is None or (partition not in progress.epic and partition not in progress.momentum):
        return msg
    extra: dict[str, Any] = {}
    if partition in progress.epic:
        extra[EPIC_KEY] = ConfigRecord(dict(progress.epic[partition]))
    if partition in progress.momentum:
        extra[MOMENTUM_KEY] = progress.momentum[partition]
    content = RecordDict({**msg.content, **extra})
    return Message(content=content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


def _take_client_states(valid: list[Message], grid: PartitionGrid, progress: Progress) -> None:
    """Keep each reply's local EPIC state and momentum (and its node's partition) and take them out of
    the reply, so that the strategy aggregates exactly the ArrayRecord and MetricRecord Flower validates."""
    for msg in valid:
        partition = int(_client_metrics(msg)["partition-id"])
        grid.partitions[int(msg.metadata.src_node_id)] = partition
        if EPIC_KEY in msg.content.config_records:
            progress.epic[partition] = dict(msg.content.pop(EPIC_KEY))
        if MOMENTUM_KEY in msg.content.array_records:
            progress.momentum[partition] = msg.content.pop(MOMENTUM_KEY)


def per_step(cfg: RunConfig) -> bool:
    return cfg.server.protocol == "per_step"


def server_lr(cfg: RunConfig, rnd: int) -> float:
    """eta_t of the per-step server step: server.lr (else train.lr), times train.gamma per passed
    milestone of train.milestones (in rounds)."""
    return round_lr(cfg, rnd, cfg.server.lr)  # the one milestone schedule (clients.local_epochs is 1 here)


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


def server_steps(cfg: RunConfig) -> list:
    """``defense.pre_aggregation``'s steps (NNM's f from ``defense.byzantine``; each step caps it at
    the rows it gets minus one)."""
    from fedepic.extensions import assumed_byzantine

    return build_steps(cfg.defense.pre_aggregation, f=assumed_byzantine(cfg, {}), clip_c=cfg.defense.clip_radius)


def _train_round(grid: PartitionGrid, cfg: RunConfig, tracked: TrackedStrategy, rnd: int, config: ConfigRecord,
                 evaluator: Evaluator, stop: threading.Event, progress: Progress) -> tuple[dict, int]:
    """One round of ``tracked``: sample, exchange, inject the server-side attack, aggregate, evaluate.
    Updates ``progress``; returns the round's metrics record and the number of clients asked."""
    t0 = time.perf_counter()
    random.seed(cfg.seed * 7919 + rnd)  # Flower samples with `random`: every member sees the same clients
    messages = [_with_client_state(m, grid, progress) for m in tracked.strategy.configure_train(
        rnd, ArrayRecord(progress.like), ConfigRecord(dict(config)), grid)]
    replies = sorted(exchange(grid, messages, ROUND_TIMEOUT_S, stop), key=_reply_order)
    valid = [m for m in replies if not m.has_error()]
    _take_client_states(valid, grid, progress)
    bad_ids = set(malicious_ids(cfg))
    malicious = [int(_client_metrics(m)["partition-id"]) in bad_ids for m in valid]
    like = progress.like
    # the vectors' origin: per_step clients send momenta, the others models (updates are model - global)
    global_vec = torch.zeros(flatten_state(like).numel()) if per_step(cfg) else flatten_state(like)
    stack = torch.stack([record_vector(m.content[_array_key(m)]) for m in valid]) if valid else torch.zeros(0)
    injected = inject_model_attack(cfg, malicious, stack, global_vec, cfg.seed * 7919 + rnd,
                                   evaluator.parameter_mask(like)) if valid else None
    for i in (i for i, bad in enumerate(malicious) if bad and injected is not None):
        valid[i].content[_array_key(valid[i])] = ArrayRecord(unflatten_like(injected.update, like))
        stack[i] = injected.update
    if cfg.defense.pre_aggregation and valid:  # NNM / clipping of the updates, then Flower's strategy
        stack = pre_aggregate_updates(stack, global_vec, server_steps(cfg))
        for i, m in enumerate(valid):
            m.content[_array_key(m)] = ArrayRecord(unflatten_like(stack[i], like))
    outcome = tracked.aggregate(rnd, replies, stack)
    progress.nonfinite += outcome.nonfinite_count
    if outcome.arrays is not None and per_step(cfg):
        progress.like = server_step(like, outcome.arrays.to_torch_state_dict(), server_lr(cfg, rnd),
                                    cfg.train.weight_decay)
    elif outcome.arrays is not None:
        progress.like = outcome.arrays.to_torch_state_dict()
    evaluated = rnd % cfg.train.eval_every == 0 or rnd == cfg.rounds
    ev = evaluator(progress.like) if evaluated else dict.fromkeys(("accuracy", "loss", "per_class", "attack_success"))
    diverged = nonfinite_model(bool(torch.isfinite(flatten_state(progress.like)).all()), ev if evaluated else None)
    if diverged and progress.diverged_round is None:
        progress.diverged_round = rnd
    clients = _client_records(valid, malicious, (stack - global_vec).norm(dim=1).tolist() if valid else [], outcome)
    failures = _failures(messages, replies, grid.partitions)
    progress.tally.add(malicious, outcome.excluded, len(failures))
    progress.recalls = [c["poison_recall"] for c in clients if c["poison_recall"] is not None]
    return {
        "round": rnd, "strategy": tracked.name, "accuracy": ev["accuracy"], "loss": ev["loss"],
        "attack_success": ev["attack_success"], "per_class": ev["per_class"],
        "excluded": None if outcome.excluded is None else sorted(c["id"] for c in clients if c["excluded"]),
        "malicious_replies": sum(malicious), "aggregated": outcome.arrays is not None,
        "attack_injected": cfg.attack.model if injected is not None else None,
        # NaN / inf vectors a model attack left out (server side) or replaced (the attackers' own updates)
        "attack_nonfinite_inputs": (injected.nonfinite if injected is not None else 0)
        + sum(c["attack_nonfinite"] for c in clients),
        "failures": failures, "clients": clients, "diverged": diverged,
        "collapsed": bool(ev["collapsed"]) if evaluated else None,  # one class predicted for every test image
        "seconds": time.perf_counter() - t0,
    }, len(messages)


def run_strategy(grid: PartitionGrid, cfg: RunConfig, name: str, data: ImageData, evaluator: Evaluator,
                 member: RunWriter, stop: threading.Event, result: MemberResult,
                 saved: Optional[dict] = None) -> None:
    """`cfg.rounds` rounds of strategy `name`; logs one record per round to the member's metrics.jsonl
    and checkpoints after every `checkpoint_every`-th (simulations/server_checkpoints.py). With
    ``saved`` (such a checkpoint) the member continues after the round it was written in.

    poison_recall in the row: the mean over clients with poisoned rows of local EPIC's cumulative
    recall after the last round (None without local EPIC or poisons).
    """
    started = time.perf_counter() - elapsed(saved)
    tracked = build_server_strategy(name, cfg)
    if saved is None:
        model = build_model(cfg, data, cfg.seed, torch.device("cpu"))
        progress, first = Progress({k: v.detach().cpu() for k, v in model.state_dict().items()}), 1
    else:
        progress, first = Progress.from_state_dict(saved["progress"]), int(saved["round"]) + 1
        tracked.load_state_dict(saved["strategy"])
        result.curves = _with_x(saved["curves"])
    config = ConfigRecord({CONFIG_KEY: to_yaml(worker_config(cfg)), MEMBER_KEY: name})
    for rnd in range(first, cfg.rounds + 1):
        record, asked = _train_round(grid, cfg, tracked, rnd, config, evaluator, stop, progress)
        member.log(record)
        if record["accuracy"] is not None:
            _append_point(result.curves, rnd, record["accuracy"], record["attack_success"])
        check_failures(cfg, f"{name}, round {rnd}", record["failures"], asked)
        if checkpoint_due(cfg.checkpoint_every, rnd, cfg.rounds):
            save_member_checkpoint(member, {"member": name, "round": rnd, "progress": progress.state_dict(),
                                            "strategy": tracked.state_dict(), "curves": result.curves}, started)
    recalls = progress.recalls
    result.row = {**_row(name, result.curves, time.perf_counter() - started), **progress.tally.rates(),
                  "poison_recall": sum(recalls) / len(recalls) if recalls else None,
                  "diverged_round": progress.diverged_round, "nonfinite_replies": progress.nonfinite,
                  "collapsed": bool(record["collapsed"])}  # at the last round, always evaluated


def _with_x(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """Saved curves, with the "@x" rounds a checkpoint of an earlier version lacks (then every round)."""
    out = {k: list(v) for k, v in curves.items()}
    for key in ("accuracy", "attack_success"):
        out.setdefault(f"{key}@x", list(range(1, len(out.get(key, [])) + 1)))
    return out


def _append_point(curves: dict[str, list[float]], rnd: int, accuracy: float, success: Optional[float]) -> None:
    curves["accuracy"].append(accuracy)
    curves["attack_success"].append(math.nan if success is None else success)
    for key in ("accuracy@x", "attack_success@x"):
        curves.setdefault(key, []).append(rnd)


def _row(name: str, curves: dict[str, list[float]], seconds: float) -> dict:
    acc = curves["accuracy"]
    asr = curves["attack_success"]
    final_asr = asr[-1] if asr and not math.isnan(asr[-1]) else None
    return {"strategy": name, "final_accuracy": acc[-1] if acc else None, "best_accuracy": max(acc) if acc else None,
            "attack_success": final_asr, "seconds": seconds}


# --------------------------------------------------------------------------- centralized reference


def run_centralized_epic(cfg: RunConfig, data: ImageData, evaluator: Evaluator, member: RunWriter,
                         stop: threading.Event, result: MemberResult, saved: Optional[dict] = None) -> None:
    """Pool every client's (attacked) rows and train one model with EPIC for rounds * local_epochs epochs.

    Checkpoints (model, EPIC mask, `fit`'s state, curves) after every `checkpoint_every`-th round; with
    ``saved`` the training continues after that round's last epoch.
    """
    started = time.perf_counter() - elapsed(saved)
    parts = client_partition(cfg, data)
    clients = [build_client_data(cfg, data, c, parts) for c in range(cfg.clients.count)]
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    poisoned = torch.cat([c.poisoned for c in clients])
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, data, cfg.seed, device)
    epochs = cfg.rounds * cfg.clients.local_epochs
    state = EpicState(len(y), epic_schedule(cfg, "epochs"), device=device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        state.load_state_dict(saved["epic"])
        result.curves = _with_x(saved["curves"])
    curves = result.curves

    def epoch_end(epoch: int, net: torch.nn.Module) -> dict:
        if stop.is_set():
            raise RunInterrupted("interrupted")
        stats = state.maybe_select(epoch, net, x, y, poisoned) or {}
        if epoch % cfg.clients.local_epochs == 0:
            ev = evaluator.measure(net)
            _append_point(curves, epoch // cfg.clients.local_epochs, ev["accuracy"], ev["attack_success"])
            member.log({"round": epoch // cfg.clients.local_epochs, "epoch": epoch, "strategy": "centralized-epic",
                        **ev, "epic": stats or None, "dropped_total": int((~state.keep).sum())})
        return {}

    def on_state(epoch: int, fit_state: dict) -> None:
        rnd, within = divmod(epoch, cfg.clients.local_epochs)
        if within == 0 and checkpoint_due(cfg.checkpoint_every, rnd, cfg.rounds):
            save_member_checkpoint(member, {
                "member": "centralized-epic", "round": rnd, "fit": fit_state, "curves": curves,
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "epic": {"keep": state.keep.clone(), "selections": state.selections}}, started)

    fit(model, x, y, cfg.train, seed=cfg.seed, device=device, epochs=epochs, keep=state.keep, epoch_end=epoch_end,
        resume=saved["fit"] if saved is not None else None, on_state=on_state)
    dropped = ~state.keep
    row = _row("centralized-epic", curves, time.perf_counter() - started)
    row["poison_recall"] = poison_stats(dropped, poisoned)["poison_recall"] if poisoned.any() else None
    row["failures"] = 0
    result.row = row


# --------------------------------------------------------------------------- the whole comparison


def _target(cfg: RunConfig, data: ImageData) -> Target:
    poisons = poison_set(cfg)
    if poisons is None:
        return Target()
    x = data.test_x[poisons.target_index:poisons.target_index + 1].float() / 255
    return Target(x, poisons.adversarial_class)


def _wait_for_clients(grid: PartitionGrid, cfg: RunConfig, stop: threading.Event) -> dict:
    """One SuperNode per client: wait until all registered (the registration race), refuse extra ones,
    then warm every node up with a query message (actors start, import, load their rows), so that the
    first member's round times do not include the start-up; the replies name each node's partition
    (``grid.partitions``). A node that fails the warm-up is only noted here: its failures are recorded
    again, round by round, in training."""
    started = time.perf_counter()
    try:
        nodes = wait_for_nodes(grid, cfg.clients.count, NODE_WAIT_S, stop)
    except TimeoutError as err:
        raise TimeoutError(f"{err}; start one SuperNode per client (clients.count={cfg.clients.count}; "
                           "with `flwr run`: --federation-config num-supernodes=N)") from None
    if len(nodes) != cfg.clients.count:
        raise ValueError(f"{len(nodes)} SuperNodes registered but clients.count={cfg.clients.count}; "
                         "the run needs exactly one SuperNode per client")
    text = to_yaml(worker_config(cfg))
    queries = [Message(content=RecordDict({"config": ConfigRecord({CONFIG_KEY: text})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in nodes]
    replies = exchange(grid, queries, ROUND_TIMEOUT_S, stop)
    for msg in (m for m in replies if not m.has_error()):
        metrics = _client_metrics(msg)
        if "partition-id" in metrics:
            grid.partitions[int(msg.metadata.src_node_id)] = int(metrics["partition-id"])
    failed = [m.error.reason for m in replies if m.has_error()]
    return {"event": "clients_ready", "seconds": time.perf_counter() - started, "warmup_failures": failed}


def _report(name: str, result: MemberResult, started: float) -> MemberReport:
    """A member's summary (its row and curves) and comparison row; a member cut short gets the row of
    the rounds it finished."""
    row = result.row or _row(name, result.curves, time.perf_counter() - started)
    return MemberReport({"strategy": name, **row, "curves": result.curves}, row, result.curves)


def _run_member(grid: Optional[PartitionGrid], cfg: RunConfig, name: str, data: ImageData, evaluator: Evaluator,
                life: RunLifecycle, stop: threading.Event) -> dict:
    """One member in its sub-folder (fedepic.lifecycle); returns its comparison row. A member a resumed
    run found finished is kept as it is (its row and curves read back)."""
    if life.kept(name):
        row, curves = kept_row_and_curves(life.kept_summary(name))
        life.keep(name, row, curves)
        return row
    saved = life.checkpoint(name)
    result = MemberResult()
    started = time.perf_counter() - elapsed(saved)
    member = life.open_member(name, lambda: _report(name, result, started),
                              saved["offsets"]["member"] if saved is not None else None)
    member.write_config(to_yaml(cfg))
    if name == "centralized-epic":
        run_centralized_epic(cfg, data, evaluator, member, stop, result, saved)
    elif grid is None:
        raise ValueError(f"strategy {name!r} needs a Flower grid")
    else:
        run_strategy(grid, cfg, name, data, evaluator, member, stop, result, saved)
    life.complete(name)
    return result.row


def open_run(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None,
             resume: Optional[Resume] = None) -> RunLifecycle:
    """The lifecycle of a federated run folder: enter it, :func:`serve` in it, and leaving it writes the
    statuses, the comparison and the root summary (fedepic.lifecycle)."""
    return RunLifecycle(cfg, list(cfg.strategies), Comparison(COMPARISON_COLUMNS, PANELS, setting_title(cfg)),
                        interrupts=interrupts, resume=resume)


def serve(grid: Optional[Grid], cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> list[dict]:
    """Run every member of `cfg.strategies` in ``life``'s run folder (:func:`open_run`); returns the
    comparison rows. A resumed ``life`` continues the interrupted run (simulations/server_checkpoints.py).

    For the duration of the call (both are restored afterwards):
    - train.threads, when set, applies to the server-side evaluation and centralized-epic;
    - the heap that exists at the start (modules, torch, Ray) is frozen (`gc.freeze`): Flower's
      Bulyan converts every reply with `to_numpy_ndarrays(keep_input=False)`, which runs a full
      `gc.collect()` per reply; with the long-lived heap frozen, a 20-client Bulyan round takes
      0.4 s instead of 5.8 s here.
    """
    gc.collect()
    gc.freeze()
    try:
        with torch_threads(cfg.train.threads):
            return _serve(PartitionGrid(grid) if grid is not None else None, cfg, life, stop)
    finally:
        gc.unfreeze()


def _serve(grid: Optional[PartitionGrid], cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> list[dict]:
    data = load_dataset(cfg.data, cfg.seed)
    target = _target(cfg, data)
    report = partition_report(cfg, data)
    ready: dict = {"seconds": None}
    life.extras = lambda rows: {"clients_ready_seconds": ready["seconds"], "partition": report,
                                "diverged": diverged_members(rows, "strategy", diverged_from_round)}
    evaluator = Evaluator(cfg, data, target)
    # a resumed run keeps the root lines an uninterrupted one has written by now, and does not log them again
    kept = [name for name in cfg.strategies if life.kept(name)]
    ready_logged, members_logged = restore_root(life.root, kept) if life.resume is not None else (False, [])
    if grid is not None and any(m != "centralized-epic" for m in cfg.strategies):
        warmup = _wait_for_clients(grid, cfg, stop)  # a resumed run's nodes are new: they warm up again
        if not ready_logged:
            life.root.log(warmup)
        ready["seconds"] = warmup["seconds"]
    for name in cfg.strategies:
        row = _run_member(grid, cfg, name, data, evaluator, life, stop)
        if name not in members_logged:
            life.root.log({"event": "member", **row})
    return life.rows


def make_server_app(cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> ServerApp:
    """A ServerApp bound to a config and a run folder (the run_simulation path; see federated.py)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        with interrupted_quietly(stop):
            serve(grid, cfg, life, stop)

    return server


def config_from_run_config(run_config: dict) -> RunConfig:
    """`flwr run`: the config file named by run_config["fedepic-config"], plus space-separated
    key=value pairs from run_config["fedepic-overrides"]; mode is forced to federated."""
    name = str(run_config.get("fedepic-config", "server_noniid.yaml"))
    overrides = str(run_config.get("fedepic-overrides", "")).split()
    return load_config(name, ["mode=federated", *overrides])


app = ServerApp()


FLOWER_EXIT_GRACE_S = 30.0


@app.main()
def flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run`: one line when the run folder opens and one when it closes (its status), on the log
    stream (`flwr run --stream`, `flwr log`): Flower's own INFO lines are quieted, and a healthy run is
    otherwise silent for minutes. The folder is under the SuperLink's working directory.

    When the Flower runtime exits first (`flwr stop`, SIGINT or SIGTERM, the SuperLink gone), the run
    stops at the next message boundary and its folder is marked "interrupted" (see
    :func:`stop_on_flower_exit`), instead of being left ``.partial``.
    """
    quiet_flower()
    cfg = config_from_run_config(dict(context.run_config))
    life = open_run(cfg)
    stop, done = threading.Event(), threading.Event()
    stop_on_flower_exit(stop, done)  # after anything that may raise before the try: its finally sets done
    folder = life.root.final_dir.absolute()  # relative paths are the SuperLink's working directory's
    entered = False
    try:
        print(f"fedepic: run folder {folder} ({', '.join(cfg.strategies)}; {cfg.rounds} rounds, "
              f"{cfg.clients.count} clients)", flush=True)
        with interrupted_quietly(stop), life:
            entered = True
            serve(grid, cfg, life, stop)
    except BaseException as err:
        if not entered:  # the folder could not be opened (a full disk): nothing was written
            print(f"fedepic: run not started: {err}", flush=True)
        raise
    finally:
        done.set()
        if entered:
            status = life.root.status if life.root.status != "running" else "completed"
            print(f"fedepic: run {status}: {folder}", flush=True)


def stop_on_flower_exit(stop: threading.Event, done: threading.Event,
                        grace_s: float = FLOWER_EXIT_GRACE_S) -> None:
    """`flwr-simulation` ends through `flwr_exit` (flwr/supercore/exit/exit.py) on SIGINT or SIGTERM, which
    it also raises itself when its run is stopped or its SuperLink is gone: that calls the registered exit
    handlers, then force-exits 5 s after the first phase of them. The one added here (first phase) sets
    the ServerApp's ``stop`` and waits up to ``grace_s`` for ``done`` (the run folder written)."""
    from flwr.supercore.exit import add_exit_handler

    def wind_down() -> None:
        if not done.is_set():
            stop.set()
            done.wait(grace_s)

    add_exit_handler(wind_down, run_before_force_exit=True)
