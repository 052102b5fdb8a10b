"""What the peer rules and attacks get from the decentralized round (fedepic issue 33): the call context of
a stateless peer rule (round, rounds, node; BALANCE's decay, bucketing's seed), MOZI's own-batch loss,
the receiver's defense in the optimized attacks, mimic's memory across rounds, and both engines agreeing
on all of them."""

from __future__ import annotations

import math

import pytest
import torch

from fedepic.client_data import client_partition, partition_report
from fedepic.config import load_config, malicious_ids, member_config
from fedepic.data import load_dataset
from fedepic.peer_node import dsgt_batch, load_exchanged, own_batch_loss
from fedepic.seeds import derive_seed
from fedepic.peer_routing import communication_graph, routing_for, run_label_roles
from fedepic.peer_stacked import member_class
from fedepic.vectors import unflatten_like
from strategies.aggregate import aggregate


def member_for(cfg, strategy: str):
    """A member of ``cfg`` (its in-process backend, as ``peer_local.run_local_member`` builds it)."""
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    rule, _ = member_config(cfg, strategy)
    routing = routing_for(rule, communication_graph(cfg), malicious_ids(cfg))
    return member_class(cfg)(cfg, strategy, strategy, routing, data, parts, roles)


class Recording:
    """A peer rule that records the ``state`` of every call (a copy) and delegates to ``rule``."""

    def __init__(self, rule) -> None:
        self.rule, self.calls = rule, []

    def __call__(self, stack, own_index, weights, state):
        self.calls.append(dict(state))
        return self.rule(stack, own_index, weights, state)


# --------------------------------------------------------------------------- the call context


@pytest.mark.parametrize("algorithm,strategy", [("dpsgd", "median"), ("dsgd", "median"), ("dsgt", "median")])
def test_stateless_peer_rules_get_the_round_the_rounds_and_the_node(algorithm, strategy):
    """Every benign node's rule call carries {"round": t, "rounds": T, "node": i}, the sender of each row
    (``ids``, own first; fedepic issue 30), the rows ``strategies.aggregate.aggregate`` passed on
    (``rows``) and, under dsgt, which of the round's two calls it is (``tracking``: trackers first), on
    the in-process backends of the three algorithms (dsgd: the stacked rows' node-by-node path); the Ray
    node passes the same (``test_both_engines_agree_on_the_new_hooks``)."""
    extra = {"dpsgd": [], "dsgd": ["train.client_momentum=0.9"], "dsgt": []}[algorithm]
    cfg = load_config("dfl_smoke", [f"strategies=[{strategy}]", "rounds=2", f"decentralized.algorithm={algorithm}",
                                    *extra])
    member = member_for(cfg, strategy)
    recorder = Recording(member.rules[strategy])
    member.rules[strategy] = recorder
    for rnd in (1, 2):
        member.play_round(rnd)
    benign = [i for i in member.active if i not in member.bad]
    calls = [{"tracking": "trackers"}, {"tracking": "models"}] if algorithm == "dsgt" else [{}]  # dsgt: two sums
    neighbours = {i: sorted(member.routing.graph.neighbors(i)) for i in benign}  # a ring: two each
    want = [{"rounds": 2, "round": r, "node": i, "ids": [i, *neighbours[i]], "rows": [0, 1, 2], **call}
            for r in (1, 2) for i in benign for call in calls]
    assert recorder.calls == want


def test_balance_decays_with_the_round_it_is_given():
    """Own [1, 0], a neighbour at distance 0.4: gamma = 0.5 accepts it at t = 0 (radius 0.5) but not at
    t = T = 1 with kappa = 1 (radius 0.5 / e = 0.18)."""
    from strategies.balance import Balance

    stack = torch.tensor([[1.0, 0.0], [1.0, 0.4]])
    rule = Balance(0.5, 1.0, 0.5, rounds=10)
    assert rule(stack, 0, None, {}).kept.tolist() == [True, True]
    late = rule(stack, 0, None, {"round": 1, "rounds": 1})
    assert late.kept.tolist() == [True, False] and late.info["threshold"] == pytest.approx(0.5 / math.e)
    assert rule(stack, 0, None, {"round": 5}).info["threshold"] == pytest.approx(0.5 * math.exp(-0.5))


def test_bucketing_at_a_peer_is_seeded_by_the_run_seed_the_round_and_the_node():
    """A dpsgd round of gossip with bucketing (s = 2): node i's rule sees its stack with rows replaced by
    the bucket means of the permutation seeded (seed * 1_000_003 + t) * 1_000_033 + i."""
    from strategies.bucketing import bucketed_rows

    cfg = load_config("dfl_smoke", ["strategies=[gossip]", "rounds=2", "defense.pre_aggregation=[bucketing]",
                                    "defense.bucket_size=2", "seed=4"])
    member = member_for(cfg, "gossip")
    wrapped = member.rules["gossip"]
    seen = []
    inner = wrapped.rule

    def gossip(stack, own_index, weights, state):
        seen.append((stack.clone(), dict(state)))
        return inner(stack, own_index, weights, state)

    wrapped.rule = gossip
    raw = []
    original = wrapped.transform

    def transform(stack, state=None):
        raw.append(stack.clone())
        return original(stack, state)

    wrapped.transform = transform
    member.play_round(1)
    assert len(seen) == 4  # the benign nodes 1..4
    for (bucketed, state), stack in zip(seen, raw):
        g = torch.Generator().manual_seed((4 * 1_000_003 + 1) * 1_000_033 + state["node"])
        assert torch.equal(bucketed, bucketed_rows(stack, torch.randperm(stack.shape[0], generator=g), 2))


# --------------------------------------------------------------------------- MOZI's loss stage


def test_mozi_gets_the_nodes_own_batch_loss():
    """A dpsgd round of mozi: each benign node's rule gets ``loss``, the cross-entropy of flat models on its
    minibatch (train.batch_size of its rows, seeded (seed, round, node)), checked model by model."""
    cfg = load_config("dfl_smoke", ["strategies=[mozi]", "rounds=1", "defense.mozi.rho=1.0"])
    member = member_for(cfg, "mozi")
    recorder = Recording(member.rules["mozi"])
    member.rules["mozi"] = recorder
    member.play_round(1)
    assert [c["node"] for c in recorder.calls] == [1, 2, 3, 4] and all("loss" in c for c in recorder.calls)
    node = 2
    loss = recorder.calls[1]["loss"]
    net = member.models[node]
    like = dict(member.template)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, sum(v.numel() for v in member.template.values()), generator=gen) * 0.1
    images, labels = dsgt_batch(member.clients[node].x, member.clients[node].y, cfg, derive_seed(cfg.seed, 1, node))
    got = loss(rows)
    for k in range(3):
        load_exchanged(net, unflatten_like(rows[k], like))
        net.eval()
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(net(images.float() / 255 if images.dtype == torch.uint8
                                                          else images.float()), labels)
        assert float(got[k]) == pytest.approx(float(want), rel=1e-6)


def test_mozi_keeps_only_the_neighbours_no_worse_on_own_batch():
    """Stage 2 by hand: rho = 1 keeps all three neighbours in stage 1; with losses own 0.5, neighbours 0.4,
    0.9, 0.5, the second goes (worse than own), ties stay; alpha = 0.5. No neighbour as good: the closest."""
    from strategies.mozi import Mozi

    stack = torch.tensor([[0.0], [1.0], [2.0], [-3.0]])
    losses = {0.0: 0.5, 1.0: 0.4, 2.0: 0.9, -3.0: 0.5}
    loss = lambda rows: torch.tensor([losses[float(v)] for v in rows[:, 0]])  # noqa: E731
    out = aggregate(Mozi(1.0, 0.5), stack, 0, None, {"loss": loss})
    assert out.kept.tolist() == [True, True, False, True] and out.info["selected"] == [1, 3]
    assert torch.allclose(out.vector, torch.tensor([0.5 * (1.0 - 3.0) / 2]))
    worse = lambda rows: torch.tensor([0.1] + [1.0] * (rows.shape[0] - 1))  # noqa: E731
    out = aggregate(Mozi(1.0, 0.5), stack, 0, None, {"loss": worse})
    assert out.info["selected"] == [1] and torch.allclose(out.vector, torch.tensor([0.5]))


OWN_STEP = ["strategies=[mozi]", "rounds=2", "decentralized.algorithm=dsgd", "train.client_momentum=0.9",
            "train.client_momentum_form=heavy_ball", "decentralized.order=adapt_then_combine",
            "defense.mozi.own_step=true", "defense.mozi.rho=1.0", "defense.mozi.alpha=0.5", "train.lr=0.05"]


def _gradient_and_loss(net, row, like, images, labels):
    """The cross-entropy of the flat model ``row`` on one minibatch (eval mode, as MOZI scores) and its
    gradient (train mode; the MLP has neither dropout nor BatchNorm), by torch autograd on the module."""
    load_exchanged(net, unflatten_like(row, like))
    xb = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(xb), labels).backward()
    grad = torch.cat([p.grad.reshape(-1) for _, p in net.named_parameters()])
    with torch.no_grad():
        net.eval()
        loss = float(torch.nn.functional.cross_entropy(net(xb), labels))
        net.train()
    return grad, loss


def test_mozi_own_step_is_the_codes_update():
    """defense.mozi.own_step by hand, round 2 of dfl_smoke under dsgd (heavy-ball momentum 0.9 and
    adapt_then_combine set: neither may act). ClippedGossip's Mozi.__call__ (codes/aggregator.py:427-469,
    under DummyDecentralizedTrainer): every node sent its model x_i of the round's start; benign node i
    keeps N_r = the neighbours whose loss on B'_i (seed (seed, 2, i, 1)) is at most its own (rho 1: all
    are in N_s), else the closest, and takes 0.5 x_i + 0.5 mean_{N_r} x_j - lr (g_i(B_i) + g_i(B'_i)),
    B_i seeded (seed, 2, i), each g with fedepic's L2 term; malicious node 0 gossips (Metropolis weights)
    and takes the same step."""
    cfg = load_config("dfl_smoke", OWN_STEP)
    member = member_for(cfg, "mozi")
    member.play_round(1)
    start = {i: member.x[member.row[i]].clone() for i in member.active}
    member.play_round(2)
    net, like = member.model, dict(member.template)
    parameters = [n for n, _ in net.named_parameters()]
    assert list(like) == parameters  # the flat layout is the parameters' (the gradient's order)
    kept_some = []
    for i in member.active:
        client = member.clients[i]
        first = dsgt_batch(client.x, client.y, cfg, derive_seed(cfg.seed, 2, i))
        second = dsgt_batch(client.x, client.y, cfg, derive_seed(cfg.seed, 2, i, 1))
        g1, _ = _gradient_and_loss(net, start[i], like, *first)
        g2, own_loss = _gradient_and_loss(net, start[i], like, *second)
        neighbours = sorted(member.routing.graph.neighbors(i))
        if i in member.bad:  # honest gossip: x_i + sum_j w_ij (x_j - x_i)
            w = member.routing.weights[i]
            mixed = start[i] + sum(w[j] * (start[j] - start[i]) for j in neighbours)
        else:
            losses = {j: _gradient_and_loss(net, start[j], like, *second)[1] for j in neighbours}
            kept = [j for j in neighbours if losses[j] <= own_loss] or \
                [min(neighbours, key=lambda j: float((start[j] - start[i]).norm()))]
            kept_some.append(len(kept))
            mixed = 0.5 * start[i] + 0.5 * torch.stack([start[j] for j in kept]).mean(0)
        decay = cfg.train.weight_decay * start[i]  # fedepic's g holds the L2 term (the code's p.grad none)
        want = mixed - cfg.train.lr * ((g1 + decay) + (g2 + decay))
        got = member.x[member.row[i]]
        assert torch.allclose(got, want, atol=1e-7), (i, float((got - want).abs().max()))
        # not the trainer's step: with one batch, or with the momentum, the node would be elsewhere
        assert not torch.allclose(got, mixed - cfg.train.lr * (g1 + decay), atol=1e-4)
    assert kept_some == [1, 1, 1, 1]  # of its two ring neighbours each benign node mixed one: the loss stage acted


@pytest.mark.slow
def test_mozi_own_step_on_ray_gives_the_local_engines_numbers(tmp_path, capsys):
    """The same own-step member through Flower + Ray (``simulations/dfl_apps.py``'s ClientApp calling the
    ``Dsgd`` node step: the two gradients, no momentum, the step after the mix, the scores on B'_i) and in
    process (``StackedDsgdMember``'s rows): the same figures, round by round."""
    import json

    from tests.test_dsgt_gp import ray_and_local_runs

    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false",
            *(o for o in OWN_STEP if not o.startswith("rounds=")), "rounds=3",
            "attack.data=none", "attack.model=sign_flip"]
    runs = ray_and_local_runs(args, capsys)
    rows = {e: [json.loads(x) for x in (run / "mozi" / "metrics.jsonl").read_text().splitlines()]
            for e, run in runs.items()}
    assert [r["round"] for r in rows["ray"]] == [r["round"] for r in rows["local"]] == [1, 2, 3]
    for got, want in zip(rows["ray"], rows["local"]):
        assert got["mean_accuracy"] == pytest.approx(want["mean_accuracy"], abs=1e-6)
        assert got["per_class"] == pytest.approx(want["per_class"], abs=1e-6)
        assert got["consensus_distance"] == pytest.approx(want["consensus_distance"], rel=1e-3, abs=1e-6)
    assert json.loads((runs["ray"] / "summary.json").read_text())["status"] == "completed"


def test_mozi_own_step_needs_dsgd():
    from fedepic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'defense.mozi.own_step': mozi's own gradient step replaces the one-step "
                                          r"update of decentralized.algorithm=dsgd; decentralized.algorithm=dpsgd"):
        load_config("dfl_smoke", ["strategies=[mozi]", "defense.mozi.own_step=true"])
    load_config("dfl_smoke", ["strategies=[gossip]", "defense.mozi.own_step=true"])  # no mozi member: no matter


def test_own_batch_loss_is_seeded_by_round_and_node():
    cfg = load_config("dfl_smoke", ["strategies=[mozi]"])
    member = member_for(cfg, "mozi")
    client, net = member.clients[1], member.models[1]
    row = torch.randn(1, sum(v.numel() for v in member.template.values()), generator=torch.Generator().manual_seed(1))
    a = own_batch_loss(net, client.x, client.y, cfg, 1, 1)(row)
    assert torch.equal(a, own_batch_loss(net, client.x, client.y, cfg, 1, 1)(row))
    assert not torch.equal(a, own_batch_loss(net, client.x, client.y, cfg, 2, 1)(row))


# --------------------------------------------------------------------------- optimized attacks at peers


def test_optimal_alie_at_a_peer_optimises_against_the_receivers_rule():
    """Ring of 5, node 0 malicious: receiver 1 aggregates own x_1, x_2 and the attack (weights 1/3 each).
    The crafted model is ByzFL's search with that receiver's trimmed mean as the aggregator, not the
    plain mean (whose search keeps expanding)."""
    from fedepic.attacks.optimized import optimal_alie
    from fedepic.peer_node import peer_rule
    from fedepic.peer_routing import poisoned_models, receiver_defense
    from fedepic.topology import build_topology, metropolis_hastings_weights

    cfg = load_config("dfl_smoke", ["strategies=[trimmed_mean]", "attack.model=optimal_alie", "attack.data=none"])
    graph = build_topology("ring", 5, seed=0)
    gen = torch.Generator().manual_seed(5)
    trained = {i: torch.randn(6, generator=gen) for i in range(5)}
    defense = receiver_defense(cfg, "trimmed_mean", 3)
    sent = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=3, defense=defense, weights=metropolis_hastings_weights(graph))
    rule = peer_rule("trimmed_mean", cfg)
    w = torch.full((3,), 1 / 3)
    for receiver, neighbour in ((1, 2), (4, 3)):
        honest = torch.stack([trained[receiver], trained[neighbour]])
        want = optimal_alie(honest, trained[0], None, f=1, evals=cfg.attack.search_evals,
                            aggregator=lambda s, r=receiver: aggregate(rule, s, 0, w, {"round": 3, "node": r}).vector)
        assert torch.allclose(sent[receiver], want)
        against_mean = optimal_alie(honest, trained[0], None, f=1, evals=cfg.attack.search_evals)
        assert float((sent[receiver] - honest.mean(0)).norm()) < 1e-3 * float((against_mean - honest.mean(0)).norm())
    # without the defense (a caller that passes none) the objective is the plain mean, as before
    plain = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=3, weights=metropolis_hastings_weights(graph))
    assert plain[1] is plain[4]


def test_optimal_attacks_on_dfl_smoke_stay_finite_against_a_robust_rule():
    from fedepic.peer_local import run_sequential

    for attack in ("optimal_alie", "optimal_ipm"):
        cfg = load_config("dfl_smoke", ["strategies=[trimmed_mean]", f"attack.model={attack}", "attack.data=none",
                                        "rounds=3"])
        records = run_sequential(cfg, "trimmed_mean")
        assert all(math.isfinite(r["consensus_distance"]) and r["consensus_distance"] < 1.0 for r in records)
        assert records[-1]["mean_accuracy"] > 0.5


# --------------------------------------------------------------------------- mimic's memory at peers


def test_mimic_at_peers_keeps_its_target_across_rounds_and_checkpoints():
    """mimic with a warm-up of 1 round: the engine's memory holds the attacker's target after round 1,
    round 2 sends that node's model of round 2; a resume from round 1's checkpoint (states and memory)
    gives the uninterrupted run's records."""
    from fedepic.peer_local import LocalMember
    from fedepic.peer_rounds import Member, MemberStart, RunSink, run_peer_member

    overrides = ["strategies=[gossip]", "attack.model=mimic", "attack.mimic_warmup=1", "attack.data=none",
                 "rounds=3", "checkpoint_every=1"]
    cfg = load_config("dfl_smoke", overrides)
    member = member_for(cfg, "gossip")
    member.play_round(1)
    memory = member.attack_memory
    assert set(memory) == {"0"} and memory["0"]["t"] == 1 and memory["0"]["target"] in (1, 2, 3, 4)
    target = memory["0"]["target"]
    seen = {}
    original = member.receive

    def receive(round_, work, messages, collect):
        seen[round_] = (messages[0][1], work.vectors[target])
        return original(round_, work, messages, collect)

    member.receive = receive
    member.play_round(2)
    assert memory["0"]["target"] == target and memory["0"]["t"] == 2
    assert torch.equal(seen[2][0], seen[2][1])  # the fixed target's model of round 2

    class Sink(RunSink):
        def __init__(self, start=MemberStart()):
            self.start, self.records, self.saved = start, [], {}

        def begin(self, member):
            return self.start

        def round(self, member, record):
            self.records.append({k: v for k, v in record.items() if k not in ("seconds", "failures")})

        def checkpoint(self, member, round_, states, **extra):
            import copy
            self.saved[round_] = (copy.deepcopy(dict(states)), copy.deepcopy(extra))

    def backend():
        fresh = member_for(cfg, "gossip")
        assert isinstance(fresh, LocalMember)
        return fresh

    whole = Sink()
    run_peer_member(cfg, Member("gossip", "gossip", member.routing), whole, backend)
    states, extra = whole.saved[1]
    assert extra["attack"]["0"]["target"] == target
    resumed = Sink(MemberStart(1, states, extra["attack"]))
    run_peer_member(cfg, Member("gossip", "gossip", member.routing), resumed, backend)
    assert repr(resumed.records) == repr(whole.records[1:])  # repr: NaN figures compare equal


# --------------------------------------------------------------------------- both engines


@pytest.mark.slow
def test_both_engines_agree_on_the_new_hooks(tmp_path, capsys):
    """One Ray run of dfl_smoke with balance (the round), mozi (the own-batch loss) and trimmed_mean, all
    with bucketing (round and node), under the optimized ALIE (the receiver's defense): its records are
    the in-process engine's, node by node."""
    import json
    from pathlib import Path

    from fedepic.peer_local import run_sequential
    from fedepic.simulate import main

    overrides = [f"output_dir={tmp_path}", "strategies=[balance,mozi,trimmed_mean]",
                 "defense.pre_aggregation=[bucketing]", "defense.bucket_size=2", "attack.model=optimal_alie",
                 "attack.data=none", "defense.mozi.rho=1.0", "defense.balance.gamma=0.05"]
    assert main(["config=dfl_smoke.yaml", "progress=false", *overrides]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers (one CPU each), so float sums match
    try:
        for member in ("balance", "mozi", "trimmed_mean"):
            got = [json.loads(line) for line in (run / member / "metrics.jsonl").read_text().splitlines()]
            want = run_sequential(load_config("dfl_smoke.yaml", overrides), member, node_by_node=True)
            assert len(got) == len(want) == 2
            for g, w in zip(got, want):
                assert g["mean_accuracy"] == pytest.approx(w["mean_accuracy"], abs=1e-6)
                assert g["per_class"] == pytest.approx(w["per_class"], abs=1e-6)
                assert g["consensus_distance"] == pytest.approx(w["consensus_distance"], rel=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_defended_view_weights_are_the_receiving_nodes_with_a_failed_sender():
    """Complete graph of 4 (Metropolis weights 1/4), receiver 1, liars 0 and 3; liar 3 failed this round
    (not in ``trained``). The receiving node (``LocalMember._mixing``) weighs its senders 0 and 2 by 1/4
    and keeps 1 - 1/2 for itself; the view counts f = 1 liar and gives the same weights. A non-finite
    honest neighbour is then left out and the rest renormalised, as ``strategies.aggregate`` does."""
    import networkx as nx

    from fedepic.peer_routing import defended_view
    from fedepic.topology import metropolis_hastings_weights

    weights = metropolis_hastings_weights(nx.complete_graph(4))
    trained = {i: torch.full((3,), float(i)) for i in (0, 1, 2)}
    honest, w, f = defended_view(trained, weights, {0, 3}, 1)
    node_self_weight = 1 - (weights[1][0] + weights[1][2])  # what node 1 keeps over its inbox {0, 2}
    assert f == 1 and torch.equal(honest, torch.stack([trained[1], trained[2]]))
    assert w.tolist() == pytest.approx([node_self_weight, weights[1][2], weights[1][0]]) == [0.5, 0.25, 0.25]
    spoilt = {**trained, 2: torch.full((3,), float("nan"))}
    honest, w, f = defended_view(spoilt, weights, {0, 3}, 1)
    assert f == 1 and torch.equal(honest, trained[1][None])
    assert w.tolist() == pytest.approx([0.5 / 0.75, 0.25 / 0.75])
