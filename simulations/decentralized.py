"""Runner of ``mode=decentralized``: every peer strategy in turn over the same graph, data split and
attack, one sub-folder per strategy plus the comparison.

Structure: the round and the member loop are ``fedepic.peer_rounds`` (core, no Flower, no Ray: node
work, the messages with the model attacks, each receiver's aggregation and step, evaluation, the
metrics record, checkpoints). It drives one backend per member: under ``engine=local`` the nodes in
this process (``fedepic.peer_local.LocalMember``; ``fedepic.peer_stacked.StackedDsgdMember`` under
dsgd), under ``engine=ray`` one Flower simulation whose ServerApp routes and whose ClientApps are
the nodes (``simulations.dfl_apps``). What a node does is ``fedepic.peer_node``, what the network
does ``fedepic.peer_routing``. This module writes the folders (``FolderSink``, the engine's
``RunSink``) and starts the simulation.

Run folder (``output_dir/<timestamp>-<name>/``): config.yaml, partition.json (label histogram per
node), topology.json (edges, malicious nodes, label roles), summary.json, comparison.{md,csv,png}, and
per strategy ``<strategy>/`` with metrics.jsonl (one line per round), summary.json and curves.png.
All figures are over the BENIGN nodes (see ``peer_routing.round_metrics``).

Checkpoints: after every ``checkpoint_every``-th round but its last, a member's folder gets
``checkpoint.pt`` (``fedepic.checkpoint``): the round, the length of its metrics.jsonl, and every
node's state after that round as the backend collected it (``peer_node.NodeState``: model, GP records and
detector meta, local EPIC's kept rows and selections). A member deletes it when it completes, the
run deletes any left when it completes. ``resume=RUN_FOLDER`` keeps the completed members as they
are (their records are read back from metrics.jsonl for the comparison), continues the interrupted
one after its checkpointed round (metrics.jsonl cut back to the checkpoint's length, the nodes'
states sent back to them), starts a member without a checkpoint over and runs the others as usual.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


from fedepic.checkpoint import CHECKPOINT, Resume, metrics_size, save_checkpoint
from fedepic.config import ConfigError, RunConfig, malicious_ids, member_config
from fedepic.data import load_dataset
from fedepic.interrupts import Interrupts
from fedepic.columns import DECENTRALIZED
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle
from fedepic.plots import X_SUFFIX
from fedepic.progress import bar, progress_bars
from fedepic.report import attack_label, setting_title
from fedepic.metrics import diverged_from_round, diverged_members
from fedepic.train import torch_threads

from fedepic.client_data import client_partition, partition_report, worker_config
from simulations.flower_runtime import check_ray_address, quiet_flower, run_flower
from fedepic.peer_node import STATEFUL, peer_rule
from fedepic.peer_eval import average_columns
from fedepic.peer_local import run_local_member
from fedepic.peer_rounds import Member, MemberStart, RunSink
from simulations.dfl_apps import Router, make_client_app, make_server_app
from fedepic.peer_routing import (
    benign_components, communication_graph, malicious_share, routing_for, run_label_roles,
)

COLUMNS, PANELS, SERIES = DECENTRALIZED.columns, DECENTRALIZED.panels, DECENTRALIZED.series


def member_names(strategies: list[str]) -> list[str]:
    """Folder names: the strategy, with -2, -3 ... when it is listed again."""
    seen: dict[str, int] = {}
    names = []
    for s in strategies:
        seen[s] = seen.get(s, 0) + 1
        names.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return names


def members_average_columns(cfg: RunConfig) -> list[str]:
    """The average model's columns of the comparison (``peer_eval.average_columns``): those of every
    member's own config, in order, once each (a variant may set ``train.eval_average_model`` alone)."""
    columns: dict[str, None] = {}
    for entry in cfg.strategies:
        columns.update(dict.fromkeys(average_columns(member_config(cfg, entry)[1])))
    return list(columns)


def member_summary(name: str, strategy: str, records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The last round's figures, plus the first round at which the detector had found every malicious
    neighbour (detection recall 1), if it ever did."""
    last = dict(records[-1]) if records else {}
    summary: dict[str, Any] = {"strategy": name, "peer_rule": strategy, "rounds": len(records)}
    summary.update({k: v for k, v in last.items() if k not in ("round", "seconds")})
    summary["seconds"] = sum(float(r.get("seconds", 0.0)) for r in records)
    full = [r["round"] for r in records if r.get("detection_recall") == 1.0 and r.get("detection_tp", 0) > 0]
    summary["detected_round"] = full[0] if full else None
    diverged = [r["round"] for r in records if r.get("diverged_nodes")]
    summary["diverged_round"] = diverged[0] if diverged else None  # a benign node's model went non-finite
    evaluated = [r for r in records if "collapsed_nodes" in r]
    # a benign node that predicts one class for every test image at the last evaluation (fedepic.metrics)
    summary["collapsed"] = bool(evaluated and evaluated[-1]["collapsed_nodes"])
    return summary


def _nan_for_null(value: Any) -> Any:
    """metrics.jsonl writes NaN as null: a number (or a list of them) read back becomes NaN again."""
    if value is None:
        return math.nan
    if isinstance(value, list) and all(v is None or isinstance(v, (int, float)) for v in value):
        return [math.nan if v is None else v for v in value]
    return value


def logged_records(folder: Path) -> list[dict]:
    """A member's per-round records as its metrics.jsonl holds them (failures lists left as they are)."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [{k: v if k == "failures" else _nan_for_null(v) for k, v in json.loads(line).items()} for line in lines]


class FolderSink(RunSink):
    """The router's reports into the run's member folders (fedepic.lifecycle), with their checkpoints;
    a resumed run keeps the members the interrupted one completed (see the module docstring)."""

    def __init__(self, life: RunLifecycle, cfg: RunConfig, progress: Any, members: Sequence[Member] = ()) -> None:
        self.life, self.cfg, self.progress = life, cfg, progress
        self.records: dict[str, list[dict]] = {}
        self.bars: dict[str, Any] = {}
        for member in members:
            if life.kept(member.name):  # its folder stays; the comparison covers its logged rounds
                self.records[member.name] = logged_records(life.root.dir / member.name)
                report = self.report(member)
                life.keep(member.name, report.row, report.curves)

    def report(self, member: Member) -> MemberReport:
        """The member's summary (also its comparison row) and curves from the rounds recorded so far."""
        records = self.records[member.name]
        summary = member_summary(member.name, member_config(self.cfg, member.strategy)[0], records)
        curves: dict[str, list] = {}
        averages = average_columns(member_config(self.cfg, member.strategy)[1])  # a variant may set its own
        for k in (*SERIES, *averages):  # with train.eval_every > 1 some rounds only
            curves[k] = [r[k] for r in records if r.get(k) is not None]
            curves[k + X_SUFFIX] = [r["round"] for r in records if r.get(k) is not None]
        return MemberReport(summary, summary, curves)

    def finished(self, member: Member) -> bool:
        return self.life.kept(member.name)

    def begin(self, member: Member) -> MemberStart:
        saved = self.life.checkpoint(member.name)
        writer = self.life.open_member(member.name, lambda: self.report(member),
                                       saved["metrics_size"] if saved is not None else None)
        self.records[member.name] = logged_records(writer.dir) if saved is not None else []
        self.bars[member.name] = bar(self.progress, member.name, self.cfg.rounds)
        if saved is None:
            return MemberStart()
        self._check_saved(member, saved)
        self.bars[member.name].advance(saved["round"])
        return MemberStart(int(saved["round"]), {int(i): state for i, state in saved["states"].items()},
                           dict(saved.get("attack", {})))

    def _check_saved(self, member: Member, saved: Mapping[str, Any]) -> None:
        rounds = [r.get("round") for r in self.records[member.name]]
        if rounds != list(range(1, int(saved["round"]) + 1)):
            raise ConfigError(f"invalid value '{self.life.root.dir / member.name}' for key 'resume': metrics.jsonl "
                              f"holds rounds {rounds[:3]}..., its checkpoint is at round {saved['round']}")

    def checkpoint(self, member: Member, round_: int, states: Mapping[int, Mapping[str, Any]],
                   attack: Optional[Mapping[str, Any]] = None) -> None:
        """``checkpoint.pt`` of the member after ``round_``, whose metrics line is on disk by now, with a
        stateful attack's memory (``attack``) when it has one."""
        writer = self.life.writers[member.name]
        writer.flush()
        save_checkpoint(writer.dir / CHECKPOINT, {
            "member": member.name, "round": round_, "metrics_size": metrics_size(writer.dir),
            "states": {str(i): dict(state) for i, state in sorted(states.items())},
            **({"attack": dict(attack)} if attack else {}),
        })

    def round(self, member: Member, record: Mapping[str, Any]) -> None:
        self.life.writers[member.name].log(record)
        self.records[member.name].append(dict(record))
        if "mean_accuracy" in record:  # rounds without evaluation (train.eval_every) only advance
            self.bars[member.name].advance(info=f"acc {record['mean_accuracy']:.3f} worst {record['worst_accuracy']:.3f}")
        else:
            self.bars[member.name].advance()

    def end(self, member: Member) -> None:
        self.life.complete(member.name)


def run_decentralized(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None,
                      resume: Optional[Resume] = None) -> Path:
    """Simulate ``cfg.strategies`` on the configured graph; returns the run folder.

    On every exit path (fedepic.lifecycle) the finished members keep their summaries, a member cut
    short is marked "interrupted" (SIGINT, SIGTERM) or "failed", and the root gets the comparison of
    the finished members and a summary with the run's status and the list of finished members. With
    ``resume`` the interrupted run's folder is continued (see the module docstring).

    ``train.threads``, when set, holds for the whole call in this process (data, models, every node's
    training under engine=local), so a run's numbers do not depend on the thread count the process had.
    """
    with torch_threads(cfg.train.threads):
        return _run_decentralized(cfg, interrupts, resume)


def _run_decentralized(cfg: RunConfig, interrupts: Optional[Interrupts], resume: Optional[Resume]) -> Path:
    quiet_flower()
    if cfg.engine == "ray":
        check_ray_address(cfg)  # before a run folder exists
    data = load_dataset(cfg.data, cfg.seed)  # also fills the decoded cache the Ray workers read
    try:
        parts = client_partition(cfg, data)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"invalid value {cfg.data.partition!r} for key 'data.partition': {err}") from None
    report = partition_report(cfg, data, parts)
    for entry in cfg.strategies:
        rule, member_cfg = member_config(cfg, entry)
        if rule in STATEFUL:
            try:  # a bad detector setting should stop the run here, not inside a Ray worker
                peer_rule(rule, member_cfg)
            except ValueError as err:
                raise ConfigError(f"invalid value for key 'defense.purification' ({entry}): {err}") from None
    graph = communication_graph(cfg)
    bad = malicious_ids(cfg)
    roles = run_label_roles(cfg, report["label_histograms"], data.num_classes)
    members = [Member(name, s, routing_for(member_config(cfg, s)[0], graph, bad, cfg.topology.mixing))
               for name, s in zip(member_names(cfg.strategies), cfg.strategies)]
    columns = (*COLUMNS[:3], *members_average_columns(cfg), *COLUMNS[3:])  # the average model's after the accuracies
    comparison = Comparison(columns, PANELS, setting_title(cfg), class_labels=class_labels(roles, data.num_classes))
    life = RunLifecycle(cfg, [m.name for m in members], comparison, interrupts=interrupts,
                        resume=resume, extras=lambda rows: {"attack": attack_label(cfg), "label_roles": roles,
                                                            "diverged": diverged_members(rows, "strategy",
                                                                                         diverged_from_round),
                                                            "members": {r["strategy"]: r for r in rows}})
    with life, progress_bars(cfg.progress) as progress:
        life.root.write_json("partition.json", report)
        life.root.write_json("topology.json", {
            "name": cfg.topology.name, "nodes": cfg.clients.count, "edges": sorted(map(sorted, graph.edges)),
            "malicious": bad, "label_roles": roles, "max_malicious_share": malicious_share(graph, bad),
            "benign_components": {m.name: benign_components(m.routing, bad) for m in members},
        })
        sink = FolderSink(life, cfg, progress, members)
        if cfg.engine == "local":
            for member in members:
                run_local_member(cfg, member, sink, data, parts, roles, life.interrupts.stop)
        else:
            node_cfg = worker_config(cfg)
            router = Router(node_cfg, roles, members, sink, life.interrupts.stop, data)
            run_flower(make_server_app(router), make_client_app(node_cfg), cfg.clients.count, cfg,
                       interrupts=life.interrupts)
        if not life.all_finished:  # cut short by a signal (an error would have raised)
            life.interrupts.raise_if_stopped()
    return life.path


def class_labels(roles: Mapping[str, Sequence[int]], num_classes: int) -> list[str]:
    """What the figures call each class: its id, and its role where it has one (peer_routing.label_roles):
    "exclusive" (only malicious nodes hold it, the attack leaves it alone), "malicious only", or
    "attacked" (benign nodes hold it and the data attack changes it)."""
    def label(c: int) -> str:
        if c in roles.get("exclusive", []):
            return f"{c} (exclusive)"
        if c in roles.get("malicious_only", []):
            return f"{c} (malicious only)"
        if c in roles.get("benign", []) and c not in roles.get("clean", []):
            return f"{c} (attacked)"
        return str(c)

    return [label(c) for c in range(num_classes)]
