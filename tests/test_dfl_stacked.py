"""The stacked in-process D-SGD engine (fedepic/peer_stacked.py) against a node-by-node one (``NodeByNodeDsgd``,
one state dict per node, as a Ray node keeps it: the oracle, here only), and its vectorized evaluation
against ``train.evaluate`` model by model."""

from __future__ import annotations

import dataclasses
import networkx as nx
import pytest
import torch

from fedepic.attacks import attack_success
from fedepic.config import load_config, malicious_ids, member_config
from fedepic.data import load_dataset
from fedepic.train import evaluate
from fedepic.vectors import flatten_state, unflatten_like
from fedepic.client_data import client_partition, partition_report
from fedepic.peer_node import dsgd_momentum, dsgd_step, dsgt_gradients, exchanged_state, new_model
from fedepic.peer_rounds import Messages, Received, Sent
from fedepic.peer_routing import communication_graph, routing_for, run_label_roles
from fedepic.peer_local import LocalMember
from fedepic.peer_eval import evaluate_rows
from fedepic.peer_stacked import GossipMatrix, StackedDsgdMember, member_class


class NodeByNodeDsgd(LocalMember):
    """dsgd node by node (``peer_node``'s equations on each node's state dict): every node's gradient at
    the model it sends (one vectorized call), m_i <- beta m_i + (1 - beta) g_i, the exchange, the peer
    rule over its inbox, then x_i <- R_i - eta m_i. The oracle of the stacked rows."""

    def send(self, round_: int) -> Sent:
        for i in self.active:
            if self.states[i].model is None:
                self.states[i].model = exchanged_state(self.models[i])
        points = torch.stack([flatten_state(self.states[i].model) for i in self.active])
        grads = dsgt_gradients(self.models[self.active[0]], points, [self._batch(i, round_) for i in self.active],
                               self.cfg)
        for k, i in enumerate(self.active):
            state = self.states[i]
            dsgd_momentum(state, grads[k], self.cfg.train.client_momentum)
            state.trained, state.round = state.model, round_
        return Sent({i: points[k] for k, i in enumerate(self.active)})

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        reports = self._aggregate_inboxes(work.vectors, messages)
        for i in self.active:
            dsgd_step(self.cfg, self.states[i], round_)
        return self._received(round_, reports, collect)


def dsgd_cfg(*extra: str):
    return load_config("dfl_smoke", ["decentralized.algorithm=dsgd", "engine=local", "train.lr=0.1",
                                     "train.client_momentum=0.9", "train.weight_decay=0.001", "clients.count=8",
                                     "topology.name=k_regular", "topology.k=3", "train.eval_every=2", *extra])


def member_args(cfg, strategy: str) -> tuple:
    """What a member class takes after (cfg, entry, name): routing, data, parts, roles."""
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    rule, _ = member_config(cfg, strategy)
    return routing_for(rule, communication_graph(cfg), malicious_ids(cfg)), data, parts, roles


def members(cfg, strategy: str):
    args = member_args(cfg, strategy)
    return NodeByNodeDsgd(cfg, strategy, strategy, *args), StackedDsgdMember(cfg, strategy, strategy, *args)


def assert_same_records(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for key, value in want.items():
        if key == "seconds":
            continue
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("strategy,extra", [
    ("gossip", []),                                       # the sparse mix
    ("gossip", ["attack.data=none", "clients.malicious_ids=[]"]),  # every row benign: evaluated in place
    ("gossip", ["attack.data=none", "attack.model=sign_flip"]),  # the sparse mix + attackers' messages
    ("median", []),                                       # a robust rule: node by node on the rows
    ("gp", ["attack.data=none", "attack.model=sign_flip"]),  # a stateful rule (GP's records)
    ("gossip", ["train.sampler=in_order", "train.batches_per_epoch=3"]),  # in-order minibatches
])
def test_stacked_dsgd_equals_the_node_by_node_engine(strategy, extra):
    cfg = dsgd_cfg(*extra)
    loop, stacked = members(cfg, strategy)
    assert stacked.fast_mix == (strategy == "gossip")
    for round_ in range(1, 5):
        assert_same_records(loop.play_round(round_), stacked.play_round(round_))
        for i in loop.active:
            want = flatten_state(loop.states[i].model)
            assert torch.allclose(stacked.x[stacked.row[i]], want, rtol=1e-5, atol=1e-6)
            assert torch.allclose(stacked.m[stacked.row[i]], loop.states[i].momentum, rtol=1e-5, atol=1e-7)


def test_a_non_finite_model_takes_the_node_by_node_mix():
    """A NaN row is left out by every receiver's rule (strategies.aggregate.aggregate), exactly as node by node."""
    cfg = dsgd_cfg("attack.data=none")
    loop, stacked = members(cfg, "gossip")
    for member in (loop, stacked):
        member.play_round(1)
    stacked.x[stacked.row[2]] = float("nan")
    loop.states[2].model = unflatten_like(torch.full_like(flatten_state(loop.states[2].model), float("nan")),
                                          loop.states[2].model)
    want, got = loop.play_round(2), stacked.play_round(2)
    assert got["nonfinite_models"] == want["nonfinite_models"] > 0
    for i in loop.active:
        assert torch.allclose(stacked.x[stacked.row[i]], flatten_state(loop.states[i].model), rtol=1e-5,
                              atol=1e-6, equal_nan=True)


def test_gossip_matrix_is_the_gossip_rule_row_by_row():
    """R = W X (over column blocks) equals x_i + sum_j w_ij (x_j - x_i) with Metropolis weights."""
    from fedepic.topology import metropolis_hastings_weights
    from strategies.gossip import Gossip

    graph = nx.random_regular_graph(3, 10, seed=1)
    weights = metropolis_hastings_weights(graph)
    routing = type("R", (), {"weights": weights})()
    rows = {i: i for i in graph.nodes}
    neighbours = {i: sorted(graph.neighbors(i)) for i in graph.nodes}
    x = torch.randn(10, 7)
    matrix = GossipMatrix(rows, routing, neighbours)
    matrix.COLUMN_BLOCK = 3  # blocks that do not divide D
    mixed = matrix.mix(x, torch.empty_like(x))
    for i in graph.nodes:
        w = torch.tensor([weights[i][i], *(weights[i][j] for j in neighbours[i])])
        stack = torch.cat([x[i][None], x[neighbours[i]]])
        assert torch.allclose(mixed[i], Gossip()(stack, 0, w, {}).vector, atol=1e-6)


def test_checkpoint_round_trip_resumes_the_same_rows():
    cfg = dsgd_cfg("attack.data=none", "attack.model=sign_flip")
    _, first = members(cfg, "gp")
    for round_ in (1, 2):
        first.play_round(round_)
    saved = first.plain_states()
    _, second = members(cfg, "gp")
    second.restore(saved)
    assert torch.equal(second.x, first.x) and torch.equal(second.m, first.m)
    assert_same_records(first.play_round(3), second.play_round(3))
    assert torch.equal(second.x, first.x)


@pytest.mark.parametrize("attack", [["attack.data=label_flip"], ["attack.data=backdoor", "attack.backdoor_label=1"]])
def test_vectorized_evaluation_equals_evaluate_model_by_model(attack):
    cfg = dsgd_cfg(*attack)
    data = load_dataset(cfg.data, cfg.seed)
    nets = [new_model(cfg, data) for _ in range(3)]
    for k, net in enumerate(nets):  # three different models
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
    rows = torch.stack([flatten_state(exchanged_state(n)) for n in nets])
    got = evaluate_rows(nets[0], rows, cfg, data)
    for net, result in zip(nets, got):
        want = evaluate(net, data.test_x, data.test_y, cfg.train.eval_batch_size, data.num_classes)
        assert result["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert result["per_class"] == pytest.approx(want["per_class"], abs=1e-6, nan_ok=True)
        assert result["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert result["attack_success"] == pytest.approx(
            attack_success(net, cfg.attack, data.test_x, data.test_y, data.num_classes), abs=1e-6)


def test_the_engine_picks_the_stacked_member_for_dsgd_only():
    assert member_class(dsgd_cfg()) is StackedDsgdMember
    assert member_class(load_config("dfl_smoke", ["engine=local"])) is LocalMember


def test_the_shipped_scale_config_is_valid_and_stacked():
    cfg = load_config("scale_dfl", [])
    assert (cfg.clients.count, cfg.topology.k, cfg.rounds, cfg.train.eval_every) == (1000, 10, 100, 10)
    assert member_class(cfg) is StackedDsgdMember and cfg.engine == "local"


def test_an_attack_with_success_only_is_scored_model_by_model(monkeypatch):
    """A user's data attack that defines ``success`` but not ``success_many`` is scored with its own
    ``success`` on each model (here: a figure that depends on the model's first weight)."""
    import fedepic.attacks
    import fedepic.peer_eval as stacked
    from fedepic.attacks.data_attacks import LabelFlip, batched_success

    class Custom(LabelFlip):
        def success(self, model, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
            return float(next(model.parameters()).flatten()[0])

    assert batched_success(LabelFlip("pairs", [], 0.01)) and not batched_success(Custom("pairs", [], 0.01))
    monkeypatch.setattr(fedepic.attacks, "data_attack", lambda attack: Custom("pairs", [], 0.01))
    monkeypatch.setattr(stacked, "data_attack", lambda attack: Custom("pairs", [], 0.01))
    cfg = dsgd_cfg()
    data = load_dataset(cfg.data, cfg.seed)
    net = new_model(cfg, data)
    rows = flatten_state(exchanged_state(net)).repeat(2, 1)
    rows[1, 0] = 0.5
    got = [r["attack_success"] for r in evaluate_rows(net, rows, cfg, data)]
    assert got == pytest.approx([float(rows[0, 0]), 0.5])


def local_epochs_members(cfg, strategy: str):
    """The default engine=local member, once vectorized (``train_local_stacked``) and once node by node."""
    args = member_args(cfg, strategy)
    vectorized, loop = (LocalMember(cfg, strategy, strategy, *args) for _ in range(2))
    loop.node_by_node = True
    return vectorized, loop


@pytest.mark.parametrize("strategy,extra", [
    ("gossip", []),
    ("gp_epic", ["defense.epic.warmup=1", "defense.epic.interval=1", "defense.epic.fraction=0.3"]),  # EPIC drops
    ("median", ["train.augment=crop_flip", "train.momentum=0"]),
])
def test_vectorized_local_epochs_equal_the_node_by_node_loop(strategy, extra):
    """Local epochs (the default protocol) of every node in one vectorized loop: the same records, models
    and EPIC drops as training the nodes one after another, up to float rounding."""
    cfg = load_config("dfl_smoke", ["engine=local", "train.lr=0.05", "clients.local_epochs=2", "clients.count=6",
                                    "train.batch_size=24", *extra])
    vectorized, loop = local_epochs_members(cfg, strategy)
    assert vectorized.vectorized_training() and not loop.vectorized_training()
    for round_ in range(1, 4):
        assert_same_records(loop.play_round(round_), vectorized.play_round(round_))
        for i in loop.active:
            want, got = loop.states[i], vectorized.states[i]
            assert torch.allclose(flatten_state(got.model), flatten_state(want.model), rtol=1e-4, atol=1e-5)
            assert (got.epic_keep is None) == (want.epic_keep is None)
            if want.epic_keep is not None:
                assert torch.equal(got.epic_keep, want.epic_keep) and got.epic_selections == want.epic_selections
    if strategy == "gp_epic":
        assert any(int((~s.epic_keep).sum()) > 0 for s in loop.states.values() if s.epic_keep is not None)


def test_models_with_convolutions_train_node_by_node():
    """The cnn takes the loop over nodes (vmap's grouped convolutions measured slower on the CPU)."""
    vectorized, _ = local_epochs_members(load_config("dfl_smoke", ["engine=local", "model.name=cnn"]), "gossip")
    assert not vectorized.vectorized_training()


def test_train_local_stacked_equals_train_local_job_by_job():
    """peer_node.train_local_stacked against peer_node.train_local, node by node: the trained models, the
    statistics (EPIC's drops, skipped selections, poison recall) and the node states."""
    from fedepic.client_data import build_client_data
    from fedepic.peer_node import LocalJob, NodeState, load_exchanged, train_local, train_local_stacked

    cfg = load_config("dfl_smoke", ["clients.local_epochs=3", "defense.epic.warmup=1", "defense.epic.interval=1",
                                    "defense.epic.fraction=0.3", "train.batch_size=20"])
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    clients = [build_client_data(cfg, data, i, parts) for i in range(4)]
    start = exchanged_state(new_model(cfg, data))
    loop_states, stacked_states = [NodeState("m") for _ in clients], [NodeState("m") for _ in clients]
    want_rows, want_stats = [], []
    for client, state in zip(clients, loop_states):
        net = load_exchanged(new_model(cfg, data), start)
        want_stats.append(train_local(net, client.x, client.y, cfg, state, round_=2, seed=7 + client.client_id,
                                      device=torch.device("cpu"), epic=client.client_id != 3,
                                      poison_mask=client.poisoned))
        want_rows.append(flatten_state(exchanged_state(net)))
    jobs = [LocalJob(state, c.x, c.y, 7 + c.client_id, c.client_id != 3, new_model(cfg, data), c.poisoned)
            for c, state in zip(clients, stacked_states)]
    rows, stats = train_local_stacked(jobs[0].net, torch.stack([flatten_state(start)] * 4), jobs, cfg, round_=2,
                                      device=torch.device("cpu"))
    for k in range(4):
        assert torch.allclose(rows[k], want_rows[k], rtol=1e-4, atol=1e-5)
        assert stats[k].keys() == want_stats[k].keys()
        assert stats[k]["train_loss"] == pytest.approx(want_stats[k]["train_loss"], rel=1e-4)
        assert {k2: v for k2, v in stats[k].items() if k2 != "train_loss"} == \
            {k2: v for k2, v in want_stats[k].items() if k2 != "train_loss"}
        assert stacked_states[k].epic_selections == loop_states[k].epic_selections
        assert (stacked_states[k].epic_keep is None) == (loop_states[k].epic_keep is None)
        if loop_states[k].epic_keep is not None:
            assert torch.equal(stacked_states[k].epic_keep, loop_states[k].epic_keep)
    assert "epic_dropped_total" in want_stats[0] and "epic_dropped_total" not in want_stats[3]


def test_a_node_without_rows_sends_its_model_unchanged_in_both_loops():
    """A node that holds no rows (train_local's early return) in the vectorized member too."""
    cfg = load_config("dfl_smoke", ["engine=local", "train.lr=0.05", "clients.count=6"])
    vectorized, loop = local_epochs_members(cfg, "gossip")
    for member in (vectorized, loop):
        client = member.clients[2]
        member.clients[2] = dataclasses.replace(client, rows=client.rows[:0], x=client.x[:0], y=client.y[:0],
                                                poisoned=client.poisoned[:0])
    for round_ in range(1, 3):
        assert_same_records(loop.play_round(round_), vectorized.play_round(round_))
        for i in loop.active:
            assert torch.allclose(flatten_state(vectorized.states[i].model), flatten_state(loop.states[i].model),
                                  rtol=1e-4, atol=1e-5)


def test_the_vectorized_loop_is_chosen_by_config_and_model():
    vectorized, _ = local_epochs_members(load_config("dfl_smoke", ["engine=local"]), "gossip")
    assert vectorized.vectorized_training()
    off, _ = local_epochs_members(load_config("dfl_smoke", ["engine=local", "decentralized.vectorize=false"]), "gossip")
    assert not off.vectorized_training()
    vectorized.models[vectorized.active[0]] = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    assert not vectorized.vectorized_training()  # dropout's randomness would not follow each node's generator


def test_the_stacked_step_rounds_as_a_nodes_dsgd_step():
    """``step_rows`` (x - lr * m: the product rounded, then the difference) equals ``peer_node.dsgd_step``
    bitwise on random rows, where a fused ``add_(m, alpha=-lr)`` differs in the last bit of many entries."""
    from fedepic.peer_node import NodeState, round_lr
    from fedepic.peer_stacked import step_rows

    cfg = dsgd_cfg()  # train.lr=0.1
    lr = round_lr(cfg, 1)
    gen = torch.Generator().manual_seed(0)
    x, m = torch.randn(16, 4096, generator=gen), torch.randn(16, 4096, generator=gen)
    want = []
    for k in range(x.shape[0]):
        state = NodeState(member="gossip", model={"w": x[k].clone()}, momentum=m[k].clone())
        dsgd_step(cfg, state, 1)
        want.append(state.model["w"])
    want = torch.stack(want)
    scratch = torch.empty_like(x)
    got = step_rows(x.clone(), m, lr, scratch)
    assert torch.equal(got, want)
    assert not torch.equal(x.clone().add_(m, alpha=-lr), want)  # the fused form: one rounding fewer


def test_fast_mix_reads_the_members_own_pre_aggregation():
    """A variant that adds pre-aggregation takes the node-by-node mix even when the run-level config has none."""
    cfg = dsgd_cfg("variants={pre: {strategy: gossip, defense: {pre_aggregation: [bucketing], bucket_size: 2}}}",
                   "strategies=[gossip,pre]")
    assert not cfg.defense.pre_aggregation
    assert StackedDsgdMember(cfg, "pre", "pre", *member_args(cfg, "pre")).fast_mix is False
    assert StackedDsgdMember(cfg, "gossip", "gossip", *member_args(cfg, "gossip")).fast_mix is True


def test_node_by_node_is_refused_under_dsgd():
    """The in-process dsgd member has no node-by-node form: asking for one raises instead of silently
    running the stacked rows (dpsgd's member honours it)."""
    from fedepic.peer_local import run_local_member

    with pytest.raises(ValueError, match="node_by_node=True: decentralized.algorithm=dsgd"):
        run_local_member(dsgd_cfg("strategies=[gossip]"), None, None, None, [], {}, node_by_node=True)
    assert LocalMember.has_node_by_node and not StackedDsgdMember.has_node_by_node
