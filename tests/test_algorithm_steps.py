"""The node steps of the decentralized algorithms (fedepic/algorithms/): the in-process engine's all-nodes
forms equal the per-node step the Ray ClientApp calls, and a new algorithm is one step class plus one
``ALGORITHMS`` line: registered here (a toy, by monkeypatching the registry), it runs in process and
through the ClientApp of simulations/dfl_apps.py with the same numbers, no branch added anywhere.

The ClientApp half runs Flower's ClientApp and the router's ``FlowerPeers`` in this process, through a
Grid whose messages the app answers directly (``InProcessGrid``): the Ray workers would import a
registry without the toy entry."""

from __future__ import annotations

import doctest
from uuid import uuid4

import pytest
import torch

from fedepic import extensions as ext
from fedepic.algorithms import Inbox, NodeSent, NodeStep, PeerNode, node_step, start_model
from fedepic.algorithms.dpsgd import aggregate_inbox
from fedepic.config import load_config, malicious_ids, member_config
from fedepic.data import load_dataset
from fedepic.client_data import client_partition, partition_report
from fedepic.peer_local import LocalMember, run_sequential
from fedepic.peer_node import (
    AggregationReport, derive_seed, dsgt_batch, dsgt_gradients, exchanged_state, node_batch, round_lr,
)
from fedepic.peer_routing import communication_graph, routing_for, run_label_roles
from fedepic.peer_stacked import StackedDsgdMember
from fedepic.registry import Entry, Registry
from fedepic.vectors import flatten_state, unflatten_like


def member_args(cfg, strategy: str) -> tuple:
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    rule, _ = member_config(cfg, strategy)
    return routing_for(rule, communication_graph(cfg), malicious_ids(cfg), cfg.topology.mixing), data, parts, roles


def same_records(want: dict, got: dict) -> None:
    """Equal records up to float rounding (the consensus distance, a difference of nearly equal models,
    to the tolerance of the Ray-against-local tests, tests/test_dsgt_gp.py)."""
    assert want.keys() == got.keys()
    for key, value in want.items():
        if key == "seconds":
            continue
        if key == "consensus_distance":
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
        elif isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        else:
            assert got[key] == value, key


def test_the_algorithm_modules_doctests_pass():
    import fedepic.algorithms as contract
    from fedepic.algorithms import dpsgd, dsgd, dsgt

    for module in (contract, dpsgd, dsgd, dsgt):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# --------------------------------------------------------------------------- all-nodes forms = per-node step


@pytest.mark.parametrize("strategy,extra", [
    ("gossip", []),
    ("gp", ["attack.data=none", "attack.model=sign_flip"]),  # GP screens and purifies the trackers
    ("gossip", ["train.sampler=in_order", "train.batches_per_epoch=2"]),  # in-order batches, y_i(0) batch 0
])
def test_dsgt_vectorized_gradients_equal_the_per_node_step(strategy, extra):
    """dsgt in process (every node's gradients in one vectorized call: ``Dsgt.send_all``, ``receive_all``)
    against the per-node step a Ray node runs (``node_by_node``): the same records, models and trackers."""
    cfg = load_config("dfl_smoke", ["engine=local", "decentralized.algorithm=dsgt", "train.lr=0.05",
                                    "clients.count=6", "topology.name=k_regular", "topology.k=3", *extra])
    args = member_args(cfg, strategy)
    vectorized, loop = LocalMember(cfg, strategy, strategy, *args), LocalMember(cfg, strategy, strategy, *args)
    loop.node_by_node = True
    for round_ in range(1, 4):
        same_records(loop.play_round(round_), vectorized.play_round(round_))
        for i in loop.active:
            want, got = loop.states[i], vectorized.states[i]
            assert torch.allclose(flatten_state(got.model), flatten_state(want.model), rtol=1e-5, atol=1e-6)
            assert torch.allclose(got.tracker, want.tracker, rtol=1e-4, atol=1e-6)
            assert torch.allclose(got.gradient, want.gradient, rtol=1e-4, atol=1e-6)
            assert want.trained is None and got.trained is None


@pytest.mark.parametrize("strategy,extra", [
    ("median", ["train.lr=0.1"]),
    ("median", ["decentralized.order=adapt_then_combine", "train.lr=0.01", "train.client_momentum_form=heavy_ball",
                "attack.momentum=false"]),
    ("median", ["train.lr=0.1", "train.sampler=in_order", "train.batches_per_epoch=2"]),
    # MOZI's own step: two minibatches summed, no momentum, the step after the mix whatever the order
    ("mozi", ["strategies=[mozi]", "defense.mozi.own_step=true", "defense.mozi.rho=1.0", "train.lr=0.05",
              "decentralized.order=adapt_then_combine"]),
    ("mozi", ["strategies=[mozi]", "defense.mozi.own_step=true", "train.lr=0.05", "train.sampler=in_order"]),
])
def test_the_stacked_dsgd_rows_equal_the_per_node_step(strategy, extra):
    """dsgd's stacked rows (``StackedDsgdMember``, its entry's ``info["member"]``) against ``LocalMember``
    running the ``Dsgd`` step node by node, as a Ray node does."""
    cfg = load_config("dfl_smoke", ["engine=local", "decentralized.algorithm=dsgd",
                                    "train.client_momentum=0.9", "train.weight_decay=0.001", "clients.count=6",
                                    "topology.name=k_regular", "topology.k=3", *extra])
    args = member_args(cfg, strategy)
    loop, stacked = LocalMember(cfg, strategy, strategy, *args), StackedDsgdMember(cfg, strategy, strategy, *args)
    assert type(loop.step).__name__ == "Dsgd" and loop.step.send_all(loop, 1) is None
    for round_ in range(1, 4):
        same_records(loop.play_round(round_), stacked.play_round(round_))
        for i in loop.active:
            assert torch.allclose(stacked.x[stacked.row[i]], flatten_state(loop.states[i].model), rtol=1e-5, atol=1e-6)
            assert torch.allclose(stacked.m[stacked.row[i]], loop.states[i].momentum, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- a new algorithm: one class, one line


class PlainStep(NodeStep):
    """A toy algorithm: x_i <- R_i({x_j - eta g_j(x_j)}), one plain minibatch step (no momentum), then the
    node's rule over the stepped models (adapt then combine)."""

    def send(self, node: PeerNode, round_: int) -> NodeSent:
        cfg, client = node.cfg, node.client
        model = start_model(node)
        point = flatten_state(exchanged_state(model))
        batch = node_batch(client.x, client.y, cfg, round_, node.id)
        gradient = dsgt_gradients(model, point.unsqueeze(0), [batch], cfg)[0]
        node.state.trained = unflatten_like(point - round_lr(cfg, round_) * gradient, exchanged_state(model))
        node.state.model, node.state.round = None, round_
        return NodeSent(node.state.trained)

    def receive(self, node: PeerNode, round_: int, inbox: Inbox) -> AggregationReport:
        return aggregate_inbox(node, round_, inbox)


TOY = Entry("plain", f"{__name__}:PlainStep", "a toy: one plain step, then the rule",
            flags=frozenset({"one_step", "no_running_stats"}))
TOY_RUN = ["engine=local", "decentralized.algorithm=plain", "train.lr=0.05", "rounds=2"]


@pytest.fixture
def toy_registered(monkeypatch):
    """``ALGORITHMS`` plus the toy's one line: nothing else of the product changes."""
    monkeypatch.setattr(ext, "ALGORITHMS", Registry("decentralized algorithm", [*ext.ALGORITHMS, TOY]))


def test_a_registered_algorithm_runs_in_process_with_its_own_equation(toy_registered):
    """The in-process engine runs the toy through ``LocalMember`` (no ``info["member"]``): after round 1
    every benign node's model is the gossip of its neighbours' stepped models, computed here by hand."""
    cfg = load_config("dfl_smoke", [*TOY_RUN, "attack.data=none", "clients.malicious_ids=[]"])
    assert isinstance(node_step(cfg), PlainStep)
    args = member_args(cfg, "gossip")
    member = LocalMember(cfg, "gossip", "gossip", *args)
    record = member.play_round(1)
    assert "train_loss" not in record  # one_step: no training loss to report
    routing = args[0]
    x0 = flatten_state(member.template)
    model = member.models[0]
    stepped = {}
    for i in member.active:
        client = member.clients[i]
        batch = dsgt_batch(client.x, client.y, cfg, derive_seed(cfg.seed, 1, i))
        stepped[i] = x0 - 0.05 * dsgt_gradients(model, x0.unsqueeze(0), [batch], cfg)[0]
    for i in member.active:
        want = sum(w * stepped[j] for j, w in routing.weights[i].items() if j != i)
        want = want + (1 - sum(w for j, w in routing.weights[i].items() if j != i)) * stepped[i]
        assert torch.allclose(flatten_state(member.states[i].model), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flatten_state(member.states[0].model), flatten_state(member.states[1].model))


class InProcessGrid:
    """Flower's Grid as ``simulations.messaging`` uses it (node ids, push, pull), answered by a ClientApp
    in this process: one ``Context`` per node (partition ``k`` is node ``100 + k``), kept across messages
    as a SuperNode keeps it."""

    def __init__(self, app, count: int) -> None:
        from flwr.app import Context, RecordDict

        self.app, self.replies = app, {}
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config={"partition-id": k},
                                          state=RecordDict(), run_config={}) for k in range(count)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grid stamps it
            self.replies[msg.metadata.message_id] = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_registered_algorithm_runs_through_the_client_app_with_the_in_process_numbers(toy_registered, monkeypatch):
    """The toy through the Ray backend's code (``Router`` -> ``FlowerPeers`` -> the ClientApp's ``train``
    and ``train.aggregate``, which resolve the step from the registry entry) and through the in-process
    engine node by node: the same records, and the ClientApp's nodes end with the in-process models."""
    from flwr.supercore.task_identity import TaskIdentity
    from simulations.dfl_apps import Router, load_node_state, make_client_app
    from fedepic.peer_local import _Collect
    from fedepic.peer_rounds import Member

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower's runtime sets in a ServerApp's process
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    cfg = load_config("dfl_smoke", [*TOY_RUN, "strategies=[gossip,median]", "train.eval_every=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both halves in one process: the same float sums
    try:
        want = {s: run_sequential(cfg, s, node_by_node=True) for s in ("gossip", "median")}
        routing, data, parts, roles = member_args(cfg, "gossip")
        members = [Member(s, s, routing_for(s, communication_graph(cfg), malicious_ids(cfg), cfg.topology.mixing))
                   for s in ("gossip", "median")]
        sink = _Collect()
        grid = InProcessGrid(make_client_app(cfg), cfg.clients.count)
        Router(cfg, roles, members, sink)(grid, None)
    finally:
        torch.set_num_threads(threads)
    got = sink.records
    assert len(got) == 4 and [r["round"] for r in got] == [1, 2, 1, 2]
    for record, expected in zip(got, want["gossip"] + want["median"]):
        record = {k: v for k, v in record.items() if k not in ("node_train_seconds", "train_phase_seconds")}
        same_records(expected, record)
        assert 0.0 < record["mean_accuracy"] < 1.0
    # the last member's node states on the "Ray" side are the in-process member's, node by node
    local = LocalMember(cfg, "median", "median", *member_args(cfg, "median"))
    local.node_by_node = True
    for round_ in (1, 2):
        local.play_round(round_)
    for node, context in grid.contexts.items():
        state = load_node_state(context, "median")
        assert torch.allclose(flatten_state(state.model), flatten_state(local.states[node - 100].model),
                              rtol=1e-6, atol=1e-7)
