"""Runner of ``mode=decentralized``: one Flower simulation that runs every peer strategy in turn over
the same graph, data split and attack, and writes one sub-folder per strategy plus the comparison.

Run folder (``output_dir/<timestamp>-<name>/``): config.yaml, partition.json (label histogram per
node), topology.json (edges, malicious nodes, label roles), summary.json, comparison.{md,csv,png}, and
per strategy ``<strategy>/`` with metrics.jsonl (one line per round), summary.json and curves.png.
All figures are over the BENIGN nodes (see ``dfl_router.round_metrics``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import networkx as nx

from fedepic.attacks import flip_table
from fedepic.config import ConfigError, RunConfig, malicious_ids, to_yaml
from fedepic.data import load_dataset
from fedepic.interrupts import Interrupts
from fedepic.outputs import RunWriter
from fedepic.plots import close, curves_figure
from fedepic.progress import bar, progress_bars
from fedepic.topology import build_topology
from simulations.common import (
    check_ray_address, client_partition, partition_report, quiet_flower, run_flower, worker_config, write_comparison,
)
from simulations.dfl_node import STATEFUL, peer_rule
from simulations.dfl_apps import Member, Router, RunSink, make_client_app, make_server_app
from simulations.dfl_router import benign_components, label_roles, malicious_share, routing_for

COLUMNS = ("strategy", "mean_accuracy", "worst_accuracy", "benign_label_accuracy", "exclusive_accuracy",
           "attack_success", "consensus_distance", "detection_precision", "detection_recall", "detected_round",
           "seconds")
PANELS = ("mean_accuracy", "worst_accuracy", "exclusive_accuracy", "consensus_distance", "detection_recall")
SERIES = ("mean_accuracy", "worst_accuracy", "benign_label_accuracy", "exclusive_accuracy", "attack_success",
          "consensus_distance", "detection_precision", "detection_recall", "train_loss")


def communication_graph(cfg: RunConfig) -> nx.Graph:
    """``fedepic.topology.build_topology`` from the config (a bad graph is a ConfigError naming the key)."""
    topo = cfg.topology
    name = "explicit" if topo.name == "edges" else topo.name
    try:
        return build_topology(name, cfg.clients.count, k=topo.k, p=topo.p,
                              edges=[tuple(e) for e in topo.edges], seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"invalid value {topo.name!r} for key 'topology.name': {err}") from None


def run_label_roles(cfg: RunConfig, histograms: list[list[int]], num_classes: int) -> dict[str, list[int]]:
    """``dfl_router.label_roles`` for this run: only a label-flipping attack touches labels."""
    table = flip_table(cfg.attack, num_classes) if cfg.attack.data == "label_flip" else None
    return label_roles(histograms, malicious_ids(cfg), table)


def member_names(strategies: list[str]) -> list[str]:
    """Folder names: the strategy, with -2, -3 ... when it is listed again."""
    seen: dict[str, int] = {}
    names = []
    for s in strategies:
        seen[s] = seen.get(s, 0) + 1
        names.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return names


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
    return summary


class FolderSink(RunSink):
    """Writes each member's sub-folder as the router reports rounds."""

    def __init__(self, root: RunWriter, cfg: RunConfig, progress: Any) -> None:
        self.root, self.cfg, self.progress = root, cfg, progress
        self.writers: dict[str, RunWriter] = {}
        self.records: dict[str, list[dict]] = {}
        self.bars: dict[str, Any] = {}
        self.summaries: dict[str, dict] = {}

    def begin(self, member: Member) -> None:
        writer = RunWriter(self.root.dir, member.name, parent=self.root)
        writer.__enter__()
        self.writers[member.name] = writer
        self.records[member.name] = []
        self.bars[member.name] = bar(self.progress, member.name, self.cfg.rounds)

    def round(self, member: Member, record: Mapping[str, Any]) -> None:
        self.writers[member.name].log(record)
        self.records[member.name].append(dict(record))
        self.bars[member.name].advance(info=f"acc {record['mean_accuracy']:.3f} worst {record['worst_accuracy']:.3f}")

    def end(self, member: Member) -> None:
        writer = self.writers.pop(member.name)
        records = self.records[member.name]
        summary = member_summary(member.name, member.strategy, records)
        self.summaries[member.name] = summary
        series = {k: [r[k] for r in records if r.get(k) is not None] for k in SERIES}
        fig = curves_figure({k: v for k, v in series.items() if v}, "round", f"{member.name} ({self.cfg.name})")
        try:
            writer.save_figure(fig, "curves.png")
        finally:
            close(fig)
        writer.write_summary(summary)
        writer.__exit__(None, None, None)

    def abort(self, err: BaseException) -> None:
        """Close the members cut short by ``err``: "interrupted" for SIGINT/SIGTERM, else "failed"."""
        for writer in self.writers.values():
            writer.mark(err)
            writer.write_summary({"rounds": len(self.records.get(writer.final_dir.name, [])),
                                  "error": str(err) or type(err).__name__})
            writer.__exit__(None, None, None)
        self.writers.clear()


def run_decentralized(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None) -> Path:
    """Simulate ``cfg.strategies`` on the configured graph; returns the run folder.

    On every exit path the finished members keep their summaries, a member cut short is marked
    "interrupted" (SIGINT, SIGTERM) or "failed", and the root gets the comparison of the finished
    members and a summary with the run's status and the list of finished members.
    """
    quiet_flower()
    check_ray_address(cfg)  # before a run folder exists
    data = load_dataset(cfg.data, cfg.seed)  # also fills the decoded cache the Ray workers read
    try:
        parts = client_partition(cfg, data)
    except ValueError as err:
        raise ConfigError(f"invalid value {cfg.data.partition!r} for key 'data.partition': {err}") from None
    report = partition_report(cfg, data, parts)
    for strategy in set(cfg.strategies) & set(STATEFUL):
        try:  # a bad detector setting should stop the run here, not inside a Ray worker
            peer_rule(strategy, cfg)
        except ValueError as err:
            raise ConfigError(f"invalid value for key 'defense.purification': {err}") from None
    graph = communication_graph(cfg)
    bad = malicious_ids(cfg)
    roles = run_label_roles(cfg, report["label_histograms"], data.num_classes)
    members = [Member(name, s, routing_for(s, graph, bad)) for name, s in zip(member_names(cfg.strategies),
                                                                              cfg.strategies)]
    interrupts = interrupts if interrupts is not None else Interrupts()
    with interrupts, RunWriter(cfg.output_dir, cfg.name) as root, progress_bars(cfg.progress) as progress:
        root.write_config(to_yaml(cfg))
        root.write_json("partition.json", report)
        root.write_json("topology.json", {
            "name": cfg.topology.name, "nodes": cfg.clients.count, "edges": sorted(map(sorted, graph.edges)),
            "malicious": bad, "label_roles": roles, "max_malicious_share": malicious_share(graph, bad),
            "benign_components": {m.name: benign_components(m.routing, bad) for m in members},
        })
        sink = FolderSink(root, cfg, progress)
        node_cfg = worker_config(cfg)
        router = Router(node_cfg, bad, roles, members, sink, interrupts.stop)
        try:
            run_flower(make_server_app(router), make_client_app(node_cfg), cfg.clients.count, cfg,
                       interrupts=interrupts)
            if len(sink.summaries) < len(members):  # cut short by a signal (an error would have raised)
                interrupts.raise_if_stopped()
        except BaseException as err:
            root.mark(err)
            with interrupts.polled():
                sink.abort(err)
            raise
        finally:
            with interrupts.polled():  # a signal now must not cut the summaries short
                _write_root(cfg, root, sink, members, bad, roles)
    return root.path


def _write_root(cfg: RunConfig, root: RunWriter, sink: "FolderSink", members: list[Member], bad: list[int],
                roles: Mapping[str, Any]) -> None:
    """The comparison of the finished members and the root summary (with the run's status)."""
    done = [m for m in members if m.name in sink.summaries]
    rows = [sink.summaries[m.name] for m in done]
    if rows:
        curves = {m.name: {k: [r[k] for r in sink.records[m.name] if r.get(k) is not None] for k in SERIES}
                  for m in done}
        title = f"{cfg.name}: decentralized, {cfg.clients.count} nodes ({len(bad)} malicious), " \
                f"{cfg.topology.name}, attack {attack_label(cfg)}"
        write_comparison(root, rows, COLUMNS, curves, PANELS, title)
    root.write_summary({"mode": "decentralized", "attack": attack_label(cfg), "label_roles": roles,
                        "finished": [m.name for m in done], "members": {r["strategy"]: r for r in rows}})


def attack_label(cfg: RunConfig) -> str:
    parts = [p for p in (cfg.attack.data, cfg.attack.model) if p != "none"]
    return "+".join(parts) if parts else "none"
