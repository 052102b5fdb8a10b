"""The protocol options the published replays need (fedepic issue 33, section 2b): topology.mixing,
decentralized.order, train.client_momentum_form, attack.momentum and train.eval_average_model; each
by hand on small cases, on the stacked rows against a node-by-node oracle that calls ``peer_node``'s
functions as a Ray node does, and refused where it does not act."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from fedepic.config import load_config, malicious_ids
from fedepic.peer_routing import communication_graph, routing_for
from fedepic.errors import ConfigError
from fedepic.peer_node import (
    adapts_first, dsgd_momentum, dsgd_step, dsgt_gradients, exchanged_state, keeps_momentum,
)
from fedepic.peer_rounds import Messages, Received, Sent
from fedepic.topology import mixing_weights
from fedepic.train import client_momentum_
from fedepic.vectors import flatten_state
from tests.test_dfl_stacked import NodeByNodeDsgd, assert_same_records, member_args
from fedepic.peer_stacked import StackedDsgdMember

SMALL = ["data.name=synthetic", "clients.count=4"]
DSGD = ["mode=decentralized", "decentralized.algorithm=dsgd", "model.name=mlp", "strategies=[gossip]"]


# --------------------------------------------------------------------------- train.client_momentum_form


def test_heavy_ball_is_the_undamped_sum_and_ema_the_damped_one():
    m, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    assert client_momentum_(m.clone(), g, 0.9, "heavy_ball").tolist() == pytest.approx([0.9 + 3.0, -1.8 + 4.0])
    assert client_momentum_(m.clone(), g, 0.9, "ema").tolist() == pytest.approx([0.9 + 0.3, -1.8 + 0.4])
    assert torch.equal(client_momentum_(torch.zeros(2), g, 0.9, "heavy_ball"), g)  # m_1 = g_1, the authors' first buffer
    scratch = g.clone()
    client_momentum_(m.clone(), scratch, 0.5, "heavy_ball", scratch=True)
    assert torch.equal(scratch, g)  # heavy_ball leaves the gradient alone
    # t steps of heavy ball = the EMA's divided by (1 - beta), so lr (1 - beta) takes the EMA's steps
    ema, ball = torch.zeros(2), torch.zeros(2)
    for step in range(5):
        grad = torch.tensor([float(step), 1.0 - step])
        client_momentum_(ema, grad, 0.8, "ema")
        client_momentum_(ball, grad, 0.8, "heavy_ball")
    assert torch.allclose(ball * 0.2, ema, atol=1e-6)
    with pytest.raises(ValueError, match="nesterov"):
        client_momentum_(m, g, 0.9, "nesterov")


def test_dsgd_momentum_heavy_ball_and_without_memory():
    from fedepic.peer_node import NodeState

    state = NodeState("m")
    dsgd_momentum(state, torch.tensor([2.0]), 0.5, "heavy_ball")
    dsgd_momentum(state, torch.tensor([1.0]), 0.5, "heavy_ball")
    assert state.momentum.tolist() == [2.0]  # 0.5 * 2 + 1
    dsgd_momentum(state, torch.tensor([-3.0]), 0.5, "heavy_ball", memory=False)
    assert state.momentum.tolist() == [-3.0]  # the raw gradient, whatever came before


# --------------------------------------------------------------------------- topology.mixing


def test_dumbbell_uniform_max_degree_weights_are_the_authors_1_11():
    """Two 10-cliques bridged by (0, 19): 1/11 on every edge, 2/11 self weight inside, 1/11 at the bridge
    (PROTOCOLS.md 1.1); Metropolis gives 1/10 inside a clique."""
    graph = nx.disjoint_union(nx.complete_graph(10), nx.complete_graph(10))
    graph.add_edge(0, 19)
    w = mixing_weights(graph, "uniform_max_degree")
    assert w[3][4] == w[0][19] == w[19][0] == pytest.approx(1 / 11)
    assert w[3][3] == pytest.approx(2 / 11) and w[0][0] == pytest.approx(1 / 11)
    assert mixing_weights(graph, "metropolis")[3][4] == pytest.approx(1 / 10)
    for i in graph.nodes:
        assert sum(w[i].values()) == pytest.approx(1.0)
        assert all(w[i][j] == w[j][i] for j in graph.neighbors(i))


def test_uniform_degree_weights_are_row_stochastic_not_symmetric():
    star = nx.star_graph(3)  # centre 0 of degree 3, leaves of degree 1
    w = mixing_weights(star, "uniform_degree")
    assert w[0] == pytest.approx({1: 0.25, 2: 0.25, 3: 0.25, 0: 0.25})
    assert w[1] == pytest.approx({0: 0.5, 1: 0.5})
    assert w[0][1] != w[1][0]
    with pytest.raises(ValueError, match="unknown mixing"):
        mixing_weights(star, "laplacian")


def test_the_dissensus_attack_reads_the_members_mixing_weights():
    """dissensus crafts its model from the receiver's own weights (``receiver_view``): with uniform_degree
    weights the poisoned model is the one built from those weights, not the Metropolis one."""
    from fedepic.peer_routing import poisoned_models, receiver_view, routing_for
    from fedepic.attacks.model_attacks import model_attack_arguments, run_model_attack

    cfg = load_config(None, ["data.name=synthetic", "clients.count=5", "mode=decentralized", "strategies=[gossip]",
                             "attack.model=dissensus", "clients.malicious_ids=[0]"])
    graph = nx.Graph([(0, 1), (1, 2), (2, 3), (2, 4), (3, 4)])  # receiver 1: degree 2, neighbours of degree 1 and 3
    trained = {i: torch.tensor([float(i), 2.0 * i]) for i in range(5)}
    uniform = routing_for("gossip", graph, [0], "uniform_degree")
    got = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=uniform.weights)[1]
    honest, view = receiver_view(trained, uniform.weights, {0}, 1)
    assert view["honest_weights"].tolist() == pytest.approx([1 / 3])  # 1 / (1 + d_1); Metropolis: 1/4
    assert view["byzantine_weight"] == pytest.approx(1 / 3)  # Metropolis: 1/3 too
    params = model_attack_arguments(cfg.attack, n=5, f=1, **view)
    want = run_model_attack("dissensus", honest, trained[0], torch.Generator().manual_seed(0), **params).update
    assert torch.allclose(got, want)
    metropolis = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1,
                                 weights=routing_for("gossip", graph, [0]).weights)[1]
    assert not torch.allclose(got, metropolis)


# --------------------------------------------------------------------------- the options on the rows


class NodeByNodeOptions(NodeByNodeDsgd):
    """The oracle with the options, as ``simulations/dfl_apps.py``'s node does them: the momentum's form
    and memory (``peer_node.dsgd_momentum``), and under adapt_then_combine ``dsgd_step`` before sending."""

    def send(self, round_: int) -> Sent:
        for i in self.active:
            if self.states[i].model is None:
                self.states[i].model = exchanged_state(self.models[i])
        points = torch.stack([flatten_state(self.states[i].model) for i in self.active])
        grads = dsgt_gradients(self.models[self.active[0]], points, [self._batch(i, round_) for i in self.active],
                               self.cfg)
        train = self.cfg.train
        for k, i in enumerate(self.active):
            state = self.states[i]
            dsgd_momentum(state, grads[k], train.client_momentum, train.client_momentum_form,
                          keeps_momentum(self.cfg, self.clients[i].is_malicious))
            if adapts_first(self.cfg):
                dsgd_step(self.cfg, state, round_)
            state.trained, state.round = state.model, round_
        return Sent({i: flatten_state(self.states[i].model) for i in self.active})

    def receive(self, round_: int, work: Sent, messages: Messages, collect: bool) -> Received:
        reports = self._aggregate_inboxes(work.vectors, messages)
        for i in self.active:
            if not adapts_first(self.cfg):
                dsgd_step(self.cfg, self.states[i], round_)
        return self._received(round_, reports, collect)


OPTIONS = [
    ("gossip", ["train.client_momentum_form=heavy_ball", "train.lr=0.01"]),
    ("gossip", ["attack.momentum=false"]),  # dfl_smoke: node 0 flips labels
    ("gossip", ["decentralized.order=adapt_then_combine", "attack.data=none", "attack.model=sign_flip"]),
    ("median", ["decentralized.order=adapt_then_combine"]),
    ("gossip", ["topology.mixing=uniform_degree", "attack.data=none", "attack.model=sign_flip"]),
    ("gossip", ["topology.mixing=uniform_max_degree", "decentralized.order=adapt_then_combine",
                "train.client_momentum_form=heavy_ball", "attack.momentum=false", "train.lr=0.01"]),
]


def options_cfg(*extra: str):
    """dsgd_cfg's run on a graph of unequal degrees (where the mixing options differ from Metropolis)."""
    keys = {e.split("=", 1)[0] for e in extra}
    base = ["decentralized.algorithm=dsgd", "engine=local", "train.lr=0.1", "train.client_momentum=0.9",
            "train.weight_decay=0.001", "clients.count=8", "topology.name=erdos_renyi", "topology.p=0.5",
            "train.eval_every=2", "seed=1"]
    return load_config("dfl_smoke", [b for b in base if b.split("=", 1)[0] not in keys] + list(extra))


@pytest.mark.parametrize("strategy,extra", OPTIONS, ids=["-".join(o[1][:2]) for o in OPTIONS])
def test_stacked_rows_with_the_options_equal_the_node_by_node_oracle(strategy, extra):
    cfg = options_cfg(*extra)
    _, *rest = member_args(cfg, strategy)
    routing = routing_for(strategy, communication_graph(cfg), malicious_ids(cfg), cfg.topology.mixing)
    assert routing.weights == mixing_weights(routing.graph, cfg.topology.mixing)
    assert len({d for _, d in routing.graph.degree()}) > 1  # the options' weights differ from Metropolis here
    loop, stacked = NodeByNodeOptions(cfg, strategy, strategy, routing, *rest), \
        StackedDsgdMember(cfg, strategy, strategy, routing, *rest)
    for round_ in range(1, 5):
        assert_same_records(loop.play_round(round_), stacked.play_round(round_))
        for i in loop.active:
            assert torch.allclose(stacked.x[stacked.row[i]], flatten_state(loop.states[i].model), rtol=1e-5, atol=1e-6)
            assert torch.allclose(stacked.m[stacked.row[i]], loop.states[i].momentum, rtol=1e-5, atol=1e-7)


def test_adapt_then_combine_by_hand_on_two_nodes():
    """Two benign nodes, one edge, Metropolis weights 1/2: after round 1 both hold
    (x0 - lr m_0 + x0 - lr m_1) / 2 with m_i = (1 - beta) g_i (ATC), and x0 - lr m_i mixed the other
    way round (CTA) gives (x0 + x0) / 2 - lr m_i: a node's own step only."""
    base = ["clients.count=2", "clients.malicious_ids=[]", "attack.data=none", "topology.name=complete",
            "train.eval_every=100"]
    runs = {}
    for order in ("adapt_then_combine", "combine_then_adapt"):
        cfg = options_cfg(*base, f"decentralized.order={order}")
        member = StackedDsgdMember(cfg, "gossip", "gossip", *member_args(cfg, "gossip"))
        x0 = member.x[0].clone()
        member.play_round(1)
        runs[order] = (member, x0)
    member, x0 = runs["adapt_then_combine"]
    lr, m = 0.1, member.m
    want = ((x0 - lr * m[0]) + (x0 - lr * m[1])) / 2
    assert torch.allclose(member.x[0], want, atol=1e-6) and torch.allclose(member.x[1], want, atol=1e-6)
    member, x0 = runs["combine_then_adapt"]
    assert torch.allclose(member.x[0], x0 - lr * member.m[0], atol=1e-6)


def test_per_step_malicious_client_without_momentum_sends_its_raw_gradient(tmp_path):
    """server.protocol=per_step, sign_flip, attack.momentum=false: the malicious client sends -g whatever
    its previous momentum; a benign client's momentum is unchanged by the option; heavy_ball from m = 0
    is g, which gives the expected vector."""
    from fedepic.client_data import build_client_data, client_partition
    from fedepic.client_work import per_step_results, state_parameters
    from fedepic.builders import build_model
    from fedepic.data import load_dataset
    from tests.test_server_per_step import per_step_config

    results = {}
    for keep in (True, False):
        cfg = per_step_config(tmp_path, "clients.count=3", "clients.malicious_ids=[2]", "attack.model=sign_flip",
                              f"attack.momentum={str(keep).lower()}", "train.client_momentum_form=heavy_ball",
                              "train.lr=0.01")
        data = load_dataset(cfg.data, cfg.seed)
        parts = client_partition(cfg, data)
        clients = [build_client_data(cfg, data, i, parts) for i in range(3)]
        model = build_model(cfg, data, cfg.seed, torch.device("cpu"))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        previous = [torch.ones_like(flatten_state(state)) for _ in clients]
        fresh = per_step_results(cfg, model, clients, state, 2, [None] * 3, state_parameters(model))
        again = per_step_results(cfg, model, clients, state, 2, previous, state_parameters(model))
        results[keep] = (fresh, again, state_parameters(model))
    fresh, again, mask = results[False]
    gradient = fresh[2].momentum  # heavy ball from zero: the raw gradient
    assert torch.equal(again[2].momentum, gradient)  # no memory of the previous momentum
    assert torch.equal(again[2].vector[mask], -gradient[mask])
    kept_fresh, kept_again, _ = results[True]
    assert torch.equal(kept_fresh[2].momentum, gradient)  # with memory from zero: the same first buffer
    assert torch.allclose(kept_again[2].momentum, 0.9 * torch.ones_like(gradient) + gradient)
    assert torch.equal(again[0].momentum, kept_again[0].momentum)  # benign clients keep theirs


# --------------------------------------------------------------------------- where the keys act


REFUSED = [
    (["mode=federated"], "topology.mixing=uniform_degree", "topology.mixing"),
    ([*DSGD[:1], "strategies=[gossip]"], "decentralized.order=adapt_then_combine", "decentralized.order"),
    (["mode=decentralized", "decentralized.algorithm=dsgt", "model.name=mlp", "strategies=[gossip]"],
     "decentralized.order=adapt_then_combine", "decentralized.order"),
    (["mode=federated"], "train.client_momentum_form=heavy_ball", "train.client_momentum_form"),
    (["mode=decentralized", "strategies=[gossip]"], "train.client_momentum_form=heavy_ball",
     "train.client_momentum_form"),
    (["mode=federated"], "attack.momentum=false", "attack.momentum"),
    (["mode=federated", "server.protocol=per_step", "model.name=mlp"], "train.eval_average_model=true",
     "train.eval_average_model"),
    (DSGD, "topology.groups={a: [0]}", "topology.groups"),
    (DSGD, "train.eval_average_model=true|topology.groups={a: [9]}", "topology.groups.a"),
    (DSGD, "train.eval_average_model=true|topology.groups={a-b: [0]}", "topology.groups"),
]


@pytest.mark.parametrize("mode,override,key", REFUSED, ids=[r[1] for r in REFUSED])
def test_an_option_set_where_it_does_not_act_is_refused(mode, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, *mode, *override.split("|")])
    message = str(err.value)
    assert "\n" not in message and f"key '{key}'" in message, message


def test_the_options_load_where_they_act():
    cfg = load_config(None, [*SMALL, *DSGD, "topology.mixing=uniform_max_degree",
                             "decentralized.order=adapt_then_combine", "train.client_momentum_form=heavy_ball",
                             "attack.momentum=false", "train.eval_average_model=true",
                             "topology.groups={left: [0, 1], right: [2, 3]}"])
    assert (cfg.topology.mixing, cfg.decentralized.order, cfg.train.client_momentum_form, cfg.attack.momentum,
            cfg.train.eval_average_model, cfg.topology.groups) == (
        "uniform_max_degree", "adapt_then_combine", "heavy_ball", False, True, {"left": [0, 1], "right": [2, 3]})
    per_step = load_config(None, [*SMALL, "mode=federated", "server.protocol=per_step", "model.name=mlp",
                                  "train.client_momentum_form=heavy_ball", "attack.momentum=false"])
    assert (per_step.train.client_momentum_form, per_step.attack.momentum) == ("heavy_ball", False)


# --------------------------------------------------------------------------- train.eval_average_model


def test_the_average_model_is_scored_once_per_set_of_benign_nodes():
    """average_record evaluates the float64 mean of the given rows (all, then each group's benign ones),
    which evaluate_rows of that mean gives by hand; a group without a benign model is NaN."""
    from fedepic.data import load_dataset
    from fedepic.peer_eval import average_columns, average_record, evaluate_rows
    from fedepic.peer_node import new_model

    cfg = load_config(None, [*SMALL, *DSGD, "train.eval_average_model=true",
                             "topology.groups={left: [0, 1], right: [2, 3], bad: [3]}"])
    data = load_dataset(cfg.data, cfg.seed)
    net = new_model(cfg, data)
    base = flatten_state(exchanged_state(net))
    gen = torch.Generator().manual_seed(0)
    models = {i: base + 0.5 * torch.randn(base.shape, generator=gen) for i in (0, 1, 2)}  # node 3: not benign
    got = average_record(cfg, data, models, net)
    assert list(got) == average_columns(cfg) == ["average_accuracy", "average_accuracy_left", "average_accuracy_right",
                                                 "average_accuracy_bad"]
    means = torch.stack([(models[0] + models[1] + models[2]) / 3, (models[0] + models[1]) / 2, models[2]])
    want = [r["accuracy"] for r in evaluate_rows(net, means, cfg, data)]
    assert [got["average_accuracy"], got["average_accuracy_left"], got["average_accuracy_right"]] == \
        pytest.approx(want)
    assert got["average_accuracy_bad"] != got["average_accuracy_bad"]  # NaN
    off = load_config(None, [*SMALL, *DSGD])
    assert average_record(off, data, models, net) == {} and average_columns(off) == []


def test_average_accuracy_reaches_metrics_summary_and_the_comparison(tmp_path, capsys):
    """A dumbbell-like run with the switch: every evaluated record, the summary and comparison.csv hold
    average_accuracy and average_accuracy_<group>; the run without it holds none and the same other figures."""
    import csv
    import json
    from pathlib import Path

    from fedepic.simulate import main

    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false", "engine=local", "rounds=3",
            "train.eval_every=2", "strategies=[gossip]"]
    runs = {}
    for switch in ([], ["train.eval_average_model=true", "topology.groups={a: [0, 1, 2], b: [3, 4]}"]):
        assert main([*args, *switch, f"name=avg{len(switch)}"]) == 0
        runs[bool(switch)] = Path(capsys.readouterr().out.strip().splitlines()[-1])
    lines = {k: [json.loads(x) for x in (run / "gossip" / "metrics.jsonl").read_text().splitlines()]
             for k, run in runs.items()}
    columns = ["average_accuracy", "average_accuracy_a", "average_accuracy_b"]
    for got, want in zip(lines[True], lines[False]):
        assert got.get("mean_accuracy") == want.get("mean_accuracy")
        assert all((k in got) == ("mean_accuracy" in got) for k in columns)
        assert not any(k in want for k in columns)
    assert 0.0 <= lines[True][-1]["average_accuracy"] <= 1.0
    summary = json.loads((runs[True] / "gossip" / "summary.json").read_text())
    assert summary["average_accuracy"] == lines[True][-1]["average_accuracy"]
    header = next(csv.reader((runs[True] / "comparison.csv").read_text().splitlines()))
    assert header[:6] == ["strategy", "mean_accuracy", "worst_accuracy", *columns]
    assert "average_accuracy" not in (runs[False] / "comparison.csv").read_text()


def test_a_variants_average_model_has_its_columns_in_the_comparison(tmp_path, capsys):
    """``train.eval_average_model`` set in one variant only: the comparison's columns are built from the
    members' configs (``members_average_columns``), so the variant's row holds its average accuracy and
    the plain member's cell is empty; its curves hold the column too (FolderSink reads the member's config)."""
    import csv
    import json
    from pathlib import Path

    from fedepic.simulate import main
    from simulations.decentralized import members_average_columns

    variant = ["variants={avg: {strategy: gossip, train: {eval_average_model: true}}}", "strategies=[gossip,avg]"]
    assert members_average_columns(load_config("dfl_smoke.yaml", variant)) == ["average_accuracy"]
    assert members_average_columns(load_config("dfl_smoke.yaml", ["strategies=[gossip]"])) == []
    assert main(["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false", "engine=local", "rounds=2",
                 *variant]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["strategy"]: r for r in csv.DictReader((run / "comparison.csv").read_text().splitlines())}
    last = json.loads((run / "avg" / "metrics.jsonl").read_text().splitlines()[-1])
    assert float(rows["avg"]["average_accuracy"]) == pytest.approx(last["average_accuracy"])
    assert rows["gossip"]["average_accuracy"] == ""
    assert rows["gossip"]["mean_accuracy"] == rows["avg"]["mean_accuracy"]  # the switch changes no other figure


def test_dsgt_refuses_row_stochastic_weights_and_takes_the_doubly_stochastic_ones():
    """DSGT's tracker keeps sum_i y_i = sum_i g_i only when W's columns sum to 1: uniform_degree
    (1 / (1 + d_i), row-stochastic) is refused in one line naming the key; the symmetric ones load."""
    dsgt = ["mode=decentralized", "decentralized.algorithm=dsgt", "model.name=mlp", "strategies=[gossip]"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, *dsgt, "topology.mixing=uniform_degree"])
    message = str(err.value)
    assert "\n" not in message and "key 'topology.mixing'" in message and "column" in message, message
    for mixing in ("metropolis", "uniform_max_degree"):
        assert load_config(None, [*SMALL, *dsgt, f"topology.mixing={mixing}"]).topology.mixing == mixing
    assert load_config(None, [*SMALL, *DSGD, "topology.mixing=uniform_degree"]).topology.mixing == "uniform_degree"
