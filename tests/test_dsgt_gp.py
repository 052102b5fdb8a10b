"""Gradient tracking (DSGT) and Gradient Purification on the gradient state, on hand-made problems:
the closed form of a quadratic, exact purification on a linear toy, the oracle round, the claim
protocol's smoke run."""

import json
import math
from pathlib import Path

import pytest
import torch

from gp_factory import make_gp

from fedepic.config import ConfigError, load_config, member_config
from fedepic.extensions import oracle_round
from fedepic.topology import build_topology, metropolis_hastings_weights
from fedepic.peer_node import NodeState, dsgt_finish, dsgt_mix, dsgt_point
from strategies.gradient_purification import GradientPurification

D = 6
RING = build_topology("ring", 5, seed=0)
W = metropolis_hastings_weights(RING)


def gp(target: str, oracle: int | None = None, malicious=(0,)) -> GradientPurification:
    return make_gp(target=target, oracle_round=oracle, known_malicious=malicious)


def dsgt_cfg(**extra: str):
    overrides = ["decentralized.algorithm=dsgt", "engine=local", "train.lr=0.2", "train.weight_decay=0"]
    return load_config("dfl_smoke", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_dsgt_converges_to_the_quadratics_closed_form():
    """f_i(x) = a_i / 2 ||x - b_i||^2 on a ring: every node reaches x* = sum a_i b_i / sum a_i."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, generator=gen) + 0.5
    b = torch.randn(5, D, generator=gen)
    x_star = (a[:, None] * b).sum(0) / a.sum()
    cfg = dsgt_cfg()
    grad = lambda i, x: a[i] * (x - b[i])  # noqa: E731
    states = {i: NodeState("q", model={"w": torch.zeros(D)}, tracker=grad(i, torch.zeros(D)),
                           gradient=grad(i, torch.zeros(D))) for i in range(5)}
    for round_ in range(1, 400):
        sent = {i: torch.cat([states[i].model["w"], states[i].tracker]) for i in range(5)}
        new = {}
        for i in range(5):
            box = {j: sent[j] for j in RING.neighbors(i)}
            x, y, _ = dsgt_mix("gossip", cfg, states[i], box, {j: W[i][j] for j in box}, W[i][i])
            new[i] = (dsgt_point(cfg, states[i], x, round_), y)
        for i, (point, y) in new.items():
            dsgt_finish(states[i], point, y, grad(i, point))
    for i in range(5):
        assert torch.allclose(states[i].model["w"], x_star, atol=1e-5)
    ys = torch.stack([s.tracker for s in states.values()])
    gs = torch.stack([s.gradient for s in states.values()])
    assert torch.allclose(ys.sum(0), gs.sum(0), atol=1e-5)  # the tracking invariant


def _toy_round(rule, states, malicious_vector, family):
    """One synchronous round of linear gossip on the ring (no gradients): node 0 sends
    ``malicious_vector``; benign nodes run GP on the ``family`` ('x' models via aggregate, 'y' trackers
    via aggregate_tracking). Returns the purified set of the round."""
    sent = {i: states[i]["v"] for i in range(1, 5)}
    sent[0] = malicious_vector
    new, purified = {}, set()
    for i in range(1, 5):
        ids = sorted(RING.neighbors(i))
        stack = torch.stack([sent[j] for j in ids])
        w = torch.tensor([W[i][i], *(W[i][j] for j in ids)])
        if family == "x":
            new[i], report = rule.aggregate(states[i]["v"], stack, ids, w, states[i]["gp"])
        else:
            zeros = torch.zeros_like(stack)
            _, new[i], report = rule.aggregate_tracking(torch.zeros(D), states[i]["v"], zeros, stack, ids, w,
                                                        states[i]["gp"])
        purified |= {(i, j) for j in report.purified}
    for i in range(1, 5):
        states[i]["v"] = new[i]
    return purified


@pytest.mark.parametrize("target,family", [("weights", "x"), ("gradient", "y")])
def test_after_purification_the_network_holds_none_of_the_purified_mass(target, family):
    """Linear toy: the benign nodes' sum is conserved by their mixing and changes only through what
    they took from node 0, so once every neighbour of 0 has purified, the sum is the initial one exactly
    (purifying before the next send; subtracting inside the round would let about half flow back)."""
    gen = torch.Generator().manual_seed(1)
    rule = gp(target, oracle=4)
    states = {i: {"v": torch.randn(D, generator=gen), "gp": rule.new_state()} for i in range(1, 5)}
    initial = sum(s["v"] for s in states.values())
    bad = 10 * torch.ones(D)
    purified = set()
    for round_ in range(1, 4):
        purified |= _toy_round(rule, states, bad, family)
    assert not purified
    assert not torch.allclose(sum(s["v"] for s in states.values()), initial, atol=1e-3)  # the attack moved it
    purified |= _toy_round(rule, states, bad, family)
    assert purified == {(1, 0), (4, 0)}  # node 0's benign neighbours on the ring, in round 4 exactly
    assert torch.allclose(sum(s["v"] for s in states.values()), initial, atol=1e-5)
    for _ in range(20):  # and it stays so: 0 is never mixed again
        _toy_round(rule, states, bad, family)
    assert torch.allclose(sum(s["v"] for s in states.values()), initial, atol=1e-5)


def test_gradient_target_never_changes_the_weights_at_confirmation():
    gen = torch.Generator().manual_seed(2)
    ids = [0, 2]
    w = torch.tensor([0.4, 0.3, 0.3])
    out = {}
    for target in ("gradient", "none"):
        rule = gp(target, oracle=3)
        state = rule.new_state()
        g = torch.Generator().manual_seed(5)
        for round_ in range(1, 4):
            own_x, own_y = torch.randn(D, generator=g), torch.randn(D, generator=g)
            x, y = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
            record = state.records.get(0, torch.zeros(D)).clone()
            mx, my, report = rule.aggregate_tracking(own_x, own_y, x, y, ids, w, state)
        out[target] = (mx, my, record, report)
    (gx, gy, record, report), (nx, ny, _, _) = out["gradient"], out["none"]
    assert report.purified == [0]
    assert torch.equal(gx, nx)  # x_i: mixed over the kept neighbours only, never rolled back
    assert torch.allclose(gy, ny - record, atol=1e-6)  # y_i: exactly the record of 0 less
    assert torch.allclose(gx, own_x + 0.3 * (x[1] - own_x), atol=1e-6)  # 0's weight stays with the node
    del gen


def test_oracle_confirms_exactly_at_its_round():
    rule = gp("gradient", oracle=3, malicious=(0, 7))
    state = rule.new_state()
    w = torch.tensor([0.25, 0.25, 0.25, 0.25])
    confirmed_at = {}
    for round_ in range(1, 6):
        vec = torch.randn(3, D)
        _, _, report = rule.aggregate_tracking(torch.zeros(D), torch.zeros(D), vec, vec, [0, 2, 7], w, state)
        for j in report.purified:
            confirmed_at[j] = round_
        assert report.flagged == []  # the oracle flags nothing
    assert confirmed_at == {0: 3, 7: 3}
    cfg = load_config("gp_claim", ["rounds=200"])
    assert [oracle_round(member_config(cfg, m)[1]) for m in ("exclude_start", "gp_grad_td5", "gp_grad_td20",
                                                                "gp_grad_td50", "gp_grad")] == [1, 10, 40, 100, None]


@pytest.mark.parametrize("overrides,key", [
    (["decentralized.algorithm=dsgt", "defense.local_epic=true"], "strategies"),  # local EPIC counts epochs
    (["decentralized.algorithm=dsgt", "train.momentum=0"], "train.momentum"),  # DSGT takes plain steps: any
    (["decentralized.algorithm=dsgt", "train.client_momentum=0"], "train.client_momentum"),  # momentum is refused
    (["decentralized.algorithm=dsgd", "train.momentum=0.5"], "train.momentum"),  # dsgd's is train.client_momentum
    (["decentralized.algorithm=dsgt", "model.name=resnet18"], "model.name"),
    (["engine=local", "train.device=cuda"], "train.device"),
    (["defense.purification.detector=records", "defense.purification.target=none"], "defense.purification.detector"),
    (["strategies=[exclude]", "defense.purification.detector=records"], "defense.purification.detector"),
    (["variants.g={strategy: gp, model: {name: cnn}}", "strategies=[g]"], "variants.g.model"),
    (["variants.g={strategy: gp, attack: {data: none}}", "strategies=[g]"], "variants.g.attack"),
    (["defense.purification.target=gradient"], "defense.purification.target"),  # dpsgd has no gradient state
    (["variants.g={strategy: gp, rounds: 3}", "strategies=[g]"], "variants.g.rounds"),
    (["variants.g={strategy: nope}", "strategies=[g]"], "variants.g.strategy"),
    (["defense.purification.oracle_at=1.5"], "defense.purification.oracle_at"),
])
def test_bad_algorithm_and_variant_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        given = any(o.startswith("strategies=") for o in overrides)
        load_config("dfl_smoke", [*([] if given else ["strategies=[gp]"]), *overrides])


def test_claim_protocol_smoke_runs_through_the_main_command(tmp_path):
    """configs/gp_claim.yaml at toy scale through ``python -m fedepic.simulate`` (in process)."""
    from fedepic.simulate import main

    code = main([
        "config=gp_claim.yaml", f"output_dir={tmp_path}", "progress=false", "rounds=6", "train.eval_every=3",
        "data.train_per_class=30", "data.test_per_class=10",
        "strategies=[gossip,exclude_start,upper,gp_grad_td50,gp_weights_td50,stop_td50,gp_grad]",
    ])
    assert code == 0
    run = next(tmp_path.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    lines = [json.loads(x) for x in (run / "gp_grad_td50" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5, 6]
    evaluated = [r["round"] for r in lines if "mean_accuracy" in r]
    assert evaluated == [2, 3, 4, 6]  # eval_every 3, the last round, and T_d - 1, T_d, T_d + 1 (T_d = 3)
    assert lines[1]["detection_recall"] == 0.0 and lines[2]["detection_recall"] == 1.0
    assert all(not math.isnan(lines[-1][k]) for k in ("clean_accuracy", "exclusive_accuracy", "attack_success"))


def ray_and_local_runs(args: list[str], capsys) -> dict[str, Path]:
    """The run folders of ``python -m fedepic.simulate`` with ``args`` under engine=ray and engine=local,
    with one torch thread (as in the Ray workers, one CPU each, so float sums match)."""
    from fedepic.simulate import main

    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for engine in ("ray", "local"):
            assert main([*args, f"engine={engine}"]) == 0
            runs[engine] = Path(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,momentum", [("dsgt", []), ("dsgd", ["train.client_momentum=0.9"])])
def test_one_step_algorithms_on_ray_give_the_local_engines_numbers(tmp_path, capsys, algorithm, momentum):
    """The same DSGT / DSGD run (a variant included) through Flower + Ray and in process: the same
    rounds, evaluations and figures (the in-process gradients are one vmap over all nodes, a Ray node's
    a vmap over one: equal to float rounding)."""
    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false",
            f"decentralized.algorithm={algorithm}", "train.lr=0.05", *momentum, "rounds=3",
            "train.eval_every=2",
            "variants={gp_none: {strategy: gp, defense: {purification: {target: none, oracle_at: 0.5}}}}",
            "strategies=[gossip,gp,gp_none]"]
    runs = ray_and_local_runs(args, capsys)
    for member in ("gossip", "gp", "gp_none"):
        rows = {e: [json.loads(x) for x in (run / member / "metrics.jsonl").read_text().splitlines()]
                for e, run in runs.items()}
        assert [r["round"] for r in rows["ray"]] == [r["round"] for r in rows["local"]] == [1, 2, 3]
        evaluated = [r["round"] for r in rows["local"] if "mean_accuracy" in r]
        assert evaluated == ([1, 2, 3] if member == "gp_none" else [2, 3])  # T_d = 2 evaluates 1, 2 and 3
        for got, want in zip(rows["ray"], rows["local"]):
            assert ("mean_accuracy" in got) == ("mean_accuracy" in want)
            assert got.get("detection_recall") == want.get("detection_recall")
            if "mean_accuracy" not in want:
                continue
            assert got["mean_accuracy"] == pytest.approx(want["mean_accuracy"], abs=1e-6)
            assert got["per_class"] == pytest.approx(want["per_class"], abs=1e-6)
            assert got["consensus_distance"] == pytest.approx(want["consensus_distance"], rel=1e-3, abs=1e-6)
    assert json.loads((runs["ray"] / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_dsgd_protocol_options_on_ray_give_the_local_engines_numbers(tmp_path, capsys):
    """The dsgd options through Flower + Ray and in process: adapt_then_combine, heavy-ball client
    momentum, malicious nodes without momentum sending sign-flipped models, uniform_max_degree weights,
    and the router-side average model with groups: the same rounds and figures (the tolerance of the
    test above), the average accuracies included."""
    args = ["config=dfl_smoke.yaml", f"output_dir={tmp_path}", "progress=false", "decentralized.algorithm=dsgd",
            "train.lr=0.05", "train.client_momentum=0.9", "rounds=3", "train.eval_every=2",
            "decentralized.order=adapt_then_combine", "train.client_momentum_form=heavy_ball", "attack.momentum=false",
            "attack.model=sign_flip", "attack.data=none", "topology.mixing=uniform_max_degree",
            "train.eval_average_model=true", "topology.groups={a: [0, 1, 2], b: [3, 4]}",
            "strategies=[gossip,median]"]
    cfg = load_config("dfl_smoke", args[3:])
    assert cfg.clients.malicious_ids or cfg.clients.malicious_fraction > 0  # attackers without momentum act
    runs = ray_and_local_runs(args, capsys)
    averages = ["average_accuracy", "average_accuracy_a", "average_accuracy_b"]
    for member in ("gossip", "median"):
        rows = {e: [json.loads(x) for x in (run / member / "metrics.jsonl").read_text().splitlines()]
                for e, run in runs.items()}
        assert [r["round"] for r in rows["ray"]] == [r["round"] for r in rows["local"]] == [1, 2, 3]
        assert [r["round"] for r in rows["local"] if "mean_accuracy" in r] == [2, 3]
        for got, want in zip(rows["ray"], rows["local"]):
            assert ("mean_accuracy" in got) == ("mean_accuracy" in want)
            if "mean_accuracy" not in want:
                continue
            for key in ("mean_accuracy", *averages):
                assert got[key] == pytest.approx(want[key], abs=1e-6), key
            assert got["per_class"] == pytest.approx(want["per_class"], abs=1e-6)
            assert got["consensus_distance"] == pytest.approx(want["consensus_distance"], rel=1e-3, abs=1e-6)
    assert json.loads((runs["ray"] / "summary.json").read_text())["status"] == "completed"


def test_the_oracle_reads_the_round_not_how_many_aggregations_the_node_had():
    """A node that sat rounds out (an empty inbox, a failed message, an older checkpoint) still confirms
    in round T_d."""
    rule = gp("gradient", oracle=3)
    state = rule.new_state()
    vec = torch.randn(2, D)
    w = torch.tensor([0.4, 0.3, 0.3])
    _, _, report = rule.aggregate_tracking(torch.zeros(D), torch.zeros(D), vec, vec, [0, 2], w, state, round_=3)
    assert report.purified == [0] and state.rounds == 1


def test_dsgd_of_a_node_alone_is_minibatch_sgd_with_client_momentum():
    """Two nodes and no edge: each runs m <- beta m + (1 - beta) g, x <- x - lr m on its own minibatches,
    which a hand loop over torch.autograd reproduces. beta = train.client_momentum = 0.7, not what
    train.momentum holds (0.9): a run that read it would differ."""
    import torch.nn.functional as F

    from fedepic.data import load_dataset
    from fedepic.client_data import client_partition, partition_report
    from fedepic.peer_node import dsgt_batch, exchanged_state, new_model
    from fedepic.seeds import derive_seed
    from fedepic.peer_routing import routing_for, run_label_roles
    from fedepic.peer_stacked import StackedDsgdMember
    from fedepic.vectors import flatten_state

    import networkx as nx

    cfg = load_config("dfl_smoke", ["clients.count=2", "clients.malicious_ids=[]", "decentralized.algorithm=dsgd",
                                    "engine=local",
                                    "train.lr=0.1", "train.client_momentum=0.7", "train.weight_decay=0.001",
                                    "attack.data=none", "strategies=[gossip]", "train.eval_every=100"])
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
    member = StackedDsgdMember(cfg, "gossip", "gossip", routing_for("gossip", nx.empty_graph(2), []), data, parts, roles)
    for round_ in range(1, 6):
        member.play_round(round_)
    net = new_model(cfg, data)
    params = dict(net.named_parameters())
    momentum = {k: torch.zeros_like(p) for k, p in params.items()}
    client = member.clients[1]
    for round_ in range(1, 6):
        xb, yb = dsgt_batch(client.x, client.y, cfg, derive_seed(cfg.seed, round_, 1))
        net.zero_grad()
        F.cross_entropy(net(xb.float().div(255) if xb.dtype == torch.uint8 else xb), yb).backward()
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad + 0.001 * p
                momentum[k] = 0.7 * momentum[k] + 0.3 * g
                p -= 0.1 * momentum[k]
    assert torch.allclose(flatten_state(member.node_model(1)), flatten_state(exchanged_state(net)), atol=1e-5)


@pytest.mark.parametrize("target", ["gradient", "weights"])
def test_the_records_detector_finds_a_persistent_offset_that_one_round_hides(target):
    """A neighbour whose vector differs from the node's in one fixed direction, by less than the benign
    neighbours' noise per round: its record per unit weight and round converges to the offset while the
    benign ones average out, so ``detector="records"`` confirms it, and only it (on the DSGT trackers,
    and on the D-PSGD models)."""
    rule = make_gp(target=target, detector="records", patience=2, votes=None, reject_score=None)
    state = rule.new_state()
    gen = torch.Generator().manual_seed(7)
    d = 400
    offset = torch.ones(d) * 0.6  # norm 12
    w = torch.full((5,), 0.2)
    confirmed_at = None
    for round_ in range(1, 41):
        own_y = torch.randn(d, generator=gen)
        y = own_y + torch.randn(4, d, generator=gen) * 1.0  # benign differences: norm about 28 each round
        y[3] = own_y + offset + torch.randn(d, generator=gen) * 0.5
        x = torch.zeros(4, d)
        if target == "gradient":
            _, _, report = rule.aggregate_tracking(torch.zeros(d), own_y, x, y, [1, 2, 3, 4], w, state,
                                                   round_=round_)
        else:
            _, report = rule.aggregate(own_y, y, [1, 2, 3, 4], w, state, round_=round_)
        assert set(report.flagged) <= {4}, f"round {round_}: benign neighbours flagged {report.flagged}"
        if report.purified and confirmed_at is None:
            confirmed_at = round_
    assert confirmed_at is not None and state.confirmed == {4}
    assert 4 not in state.records and 4 not in state.mixed  # purified: its record went with it
