"""The decentralized round engine (fedepic/peer_rounds.py) on a hand-made backend: what travels over each
edge, the record it builds, and its member loop (begin / resume, checkpoints, failures, the stop event).
Its equality with the code it replaced is tested on the real backends: tests/test_dfl_stacked.py,
tests/test_decentralized.py, tests/test_resume.py."""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping

import networkx as nx
import pytest
import torch

from fedepic.config import load_config
from fedepic.errors import RunFailed, RunInterrupted
from fedepic.peer_rounds import (
    Member, MemberStart, Messages, Received, RunSink, Sent, peer_setting, play_round, round_messages, run_peer_member,
)
from fedepic.peer_routing import routing_for

ROLES = {"benign": [0, 1], "clean": [0, 1]}


def ring_member(cfg, strategy: str = "gossip") -> Member:
    return Member(strategy, strategy, routing_for(strategy, nx.cycle_graph(cfg.clients.count), [0]))


def small_cfg(*extra: str):
    return load_config("dfl_smoke", ["clients.count=4", "clients.malicious_ids=[0]", *extra])


class MeanBackend:
    """Node i sends the vector (i + 1, i + 1) (its "training" loss 0.1 i, its time 1 s); each node
    takes the mean of its own vector and its inbox; a benign node's "accuracy" is its new first
    coordinate / 10, its per-class accuracy [that, 1]. ``fail``: {round: nodes that fail the train
    phase}. States are {"arrays": {}, "config": {"round": r, "node": i}}."""

    def __init__(self, setting, fail: Mapping[int, set] | None = None, timed: bool = True) -> None:
        self.setting, self.fail, self.timed = setting, fail or {}, timed
        self.restored: dict = {}
        self.received: dict[int, dict[int, torch.Tensor]] = {}

    def restore(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        self.restored = dict(states)

    def send(self, round_: int) -> Sent:
        failed = self.fail.get(round_, set())
        nodes = [i for i in self.setting.active if i not in failed]
        stats = {i: {"train_loss": 0.1 * i, **({"train_seconds": 1.0} if self.timed else {})} for i in nodes}
        return Sent({i: torch.full((2,), float(i + 1)) for i in nodes}, stats,
                    [{"node": i, "phase": "train", "reason": "worker died"} for i in sorted(failed)])

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        evals, models = {}, {}
        for i, own in work.vectors.items():
            box = {s: msgs[i] for s, msgs in messages.items() if i in msgs}
            self.received[i] = box
            new = torch.stack([own, *box.values()]).mean(dim=0)
            if i in self.setting.benign:
                evals[i] = {"accuracy": float(new[0]) / 10, "per_class": [float(new[0]) / 10, 1.0],
                            "collapsed": False, "attack_success": None}
                models[i] = new
        states = {i: {"arrays": {}, "config": {"round": round_, "node": i}} for i in work.vectors} if collect else {}
        return Received(evals, models, {i: [] for i in work.vectors}, 0, states)


def test_benign_senders_send_their_vector_and_an_attacker_its_poisoned_one():
    cfg = small_cfg("attack.model=sign_flip")
    setting = peer_setting(cfg, ring_member(cfg), ROLES)
    work = MeanBackend(setting).send(1)
    messages, nonfinite = round_messages(setting, work, 1)
    assert nonfinite == 0
    assert sorted(messages) == [0, 1, 2, 3] and sorted(messages[2]) == [1, 3]  # the ring's edges
    assert messages[2][1] is work.vectors[2] and messages[2][3] is work.vectors[2]  # the tensor itself
    assert messages[0][1].tolist() == [-1.0, -1.0] and messages[0][3].tolist() == [-1.0, -1.0]  # -x_0


def test_a_round_record_by_hand():
    """Ring 0-1-2-3-0, node 0 malicious sending -1: node 1 averages (2, -1, 3) -> 4/3, node 2 (3, 2, 4)
    -> 3, node 3 (4, 3, -1) -> 2; accuracies a tenth of that."""
    cfg = small_cfg("attack.model=sign_flip", "clients.local_epochs=1")
    backend = MeanBackend(peer_setting(cfg, ring_member(cfg), ROLES))
    record, states = play_round(backend, 1)
    accuracies = [4 / 30, 0.3, 0.2]
    assert record["round"] == 1 and states == {}
    assert record["mean_accuracy"] == pytest.approx(sum(accuracies) / 3)
    assert record["worst_accuracy"] == pytest.approx(4 / 30)
    assert record["per_class"] == pytest.approx([sum(accuracies) / 3, 1.0])
    assert record["train_loss"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)  # benign nodes only
    assert record["failures"] == [] and record["nonfinite_models"] == 0 and record["attack_nonfinite_inputs"] == 0
    assert record["diverged_nodes"] == 0 and "detection_recall" not in record  # gossip has no detector
    assert record["node_train_seconds"] == 4.0  # the four nodes' own times
    assert list(record)[-3:] == ["node_train_seconds", "train_phase_seconds", "seconds"]


def test_untimed_backends_and_one_step_algorithms_write_fewer_keys():
    cfg = small_cfg()
    record, _ = play_round(MeanBackend(peer_setting(cfg, ring_member(cfg), ROLES), timed=False), 1)
    assert "node_train_seconds" not in record and "train_phase_seconds" not in record and "seconds" in record
    one_step = small_cfg("decentralized.algorithm=dsgd", "model.name=mlp")
    backend = MeanBackend(peer_setting(one_step, ring_member(one_step), ROLES))
    backend.send = lambda round_: Sent({i: torch.full((2,), float(i + 1)) for i in range(4)})  # no stats
    assert "train_loss" not in play_round(backend, 1)[0]
    backend = MeanBackend(peer_setting(cfg, ring_member(cfg), ROLES))
    backend.send = lambda round_: Sent({i: torch.full((2,), float(i + 1)) for i in range(4)})
    assert math.isnan(play_round(backend, 1)[0]["train_loss"])  # dpsgd without a reported loss: NaN


def test_rounds_without_evaluation_keep_the_detector_figures_only():
    cfg = small_cfg("train.eval_every=2", "rounds=3", "strategies=[gp]")
    record, _ = play_round(MeanBackend(peer_setting(cfg, ring_member(cfg, "gp"), ROLES)), 1)
    # gp's truth: the benign neighbours of node 0 (1 and 3) should confirm it; nobody did
    assert record["detection_recall"] == 0.0 and record["detection_fn"] == 2 and "mean_accuracy" not in record


class Sink(RunSink):
    def __init__(self, start: MemberStart = MemberStart(), finished: bool = False) -> None:
        self.start, self.done = start, finished
        self.records: list[dict] = []
        self.checkpoints: list[tuple[int, dict]] = []
        self.ended = False

    def finished(self, member: Member) -> bool:
        return self.done

    def begin(self, member: Member) -> MemberStart:
        return self.start

    def round(self, member: Member, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))

    def checkpoint(self, member: Member, round_: int, states: Mapping[int, Mapping[str, Any]]) -> None:
        self.checkpoints.append((round_, {i: s["config"] for i, s in states.items()}))

    def end(self, member: Member) -> None:
        self.ended = True


def test_the_member_loop_resumes_checkpoints_and_keeps_a_failed_nodes_older_state():
    cfg = small_cfg("rounds=6", "checkpoint_every=2")
    member = ring_member(cfg)
    saved = {i: {"arrays": {}, "config": {"round": 2, "node": i}} for i in range(4)}
    sink = Sink(MemberStart(2, saved))
    built = []

    def backend():
        built.append(MeanBackend(peer_setting(cfg, member, ROLES), fail={4: {3}}))
        return built[-1]

    run_peer_member(cfg, member, sink, backend)
    assert built[0].restored == saved and sink.ended
    assert [r["round"] for r in sink.records] == [3, 4, 5, 6]
    assert sink.records[1]["failures"] == [{"node": 3, "phase": "train", "reason": "worker died"}]
    # round 4 checkpoints; node 3 failed it and keeps round 2's state; round 6 is the last (no checkpoint)
    assert sink.checkpoints == [(4, {0: {"round": 4, "node": 0}, 1: {"round": 4, "node": 1},
                                     2: {"round": 4, "node": 2}, 3: {"round": 2, "node": 3}})]


def test_the_member_loop_skips_finished_members_and_stops_on_failures_and_signals():
    cfg = small_cfg("rounds=3")
    member = ring_member(cfg)
    run_peer_member(cfg, member, Sink(finished=True), lambda: pytest.fail("a finished member builds nothing"))

    sink = Sink()
    with pytest.raises(RunFailed, match="gossip, round 2: 3 of 4 clients failed"):
        run_peer_member(cfg, member, sink, lambda: MeanBackend(peer_setting(cfg, member, ROLES), fail={2: {0, 1, 2}}))
    assert [r["round"] for r in sink.records] == [1, 2] and not sink.ended  # round 2 is logged, then the run stops

    with pytest.raises(RunFailed, match="round 1: 4 of 4 clients failed"):  # nobody sent: nothing to route
        run_peer_member(cfg, member, Sink(),
                        lambda: MeanBackend(peer_setting(cfg, member, ROLES), fail={1: {0, 1, 2, 3}}))

    stop, sink = threading.Event(), Sink()
    sink.round = lambda member, record: stop.set()  # a signal during round 1
    with pytest.raises(RunInterrupted):
        run_peer_member(cfg, member, sink, lambda: MeanBackend(peer_setting(cfg, member, ROLES)), stop)
