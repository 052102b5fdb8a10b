"""The model attacks the robust-aggregation literature compares against (fedepic issue 33): bit flipping,
min-sum, Fang et al.'s attacks on Krum and the trimmed mean, ByzFL's optimized ALIE / IPM, mimic and
dissensus, each on hand-made cases computed from its formula (and against ByzFL's values where ByzFL has
the attack)."""

from __future__ import annotations

import math

import pytest
import torch

from fedepic.attacks.model_attacks import apply_model_attack, sign_flip
from fedepic.attacks.minsum import minsum
from fedepic.extensions import MODEL_ATTACKS

HONEST = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]])
OWN = torch.tensor([1.0, -2.0, 0.5])


# ------------------------------------------------------------------------------------- bit flip


def test_bit_flip_is_sign_flip_under_the_literature_name():
    assert MODEL_ATTACKS.get("bit_flip").target == MODEL_ATTACKS.get("sign_flip").target
    assert not MODEL_ATTACKS.has("bit_flip", "needs_honest")
    assert torch.equal(apply_model_attack("bit_flip", HONEST, OWN), torch.tensor([-1.0, 2.0, -0.5]))
    assert torch.equal(apply_model_attack("bit_flip", HONEST, OWN), sign_flip(HONEST, OWN))


# ------------------------------------------------------------------------------------- min-sum


def _sum_sq(m: torch.Tensor, honest: torch.Tensor) -> float:
    return float((honest.double() - m.double()).square().sum())


def _budget(honest: torch.Tensor, bound: str) -> float:
    sums = [_sum_sq(h, honest) for h in honest]
    return min(sums) if bound == "code" else max(sums)


@pytest.mark.parametrize("bound", ["code", "paper"])
@pytest.mark.parametrize("kind", ["std", "unit_vec", "sign"])
def test_minsum_meets_the_sum_budget_with_equality(kind, bound):
    budget = _budget(HONEST, bound)
    mal = minsum(HONEST, OWN, None, perturbation=kind, bound=bound)
    assert _sum_sq(mal, HONEST) == pytest.approx(budget, rel=1e-6)
    mu = HONEST.mean(dim=0)
    step = mal - mu
    assert _sum_sq(mu + 1.001 * step, HONEST) > budget  # gamma is the largest allowed


def test_minsum_hand_made_value():
    # honest rows (0, 0), (2, 0), (1, 3): mu = (1, 1); |e_i| = sqrt2, sqrt2, 2 -> min sqrt2, max 2;
    # std = (1, sqrt3), p = -(1, sqrt3), |p| = 2 -> gamma = sqrt2 / 2 (code) or 1 (paper)
    honest = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    out = minsum(honest, torch.zeros(2), bound="paper")
    assert torch.allclose(out, torch.tensor([0.0, 1.0 - math.sqrt(3.0)]), atol=1e-6)
    g = math.sqrt(2.0) / 2
    out = minsum(honest, torch.zeros(2), bound="code")
    assert torch.allclose(out, torch.tensor([1.0 - g, 1.0 - g * math.sqrt(3.0)]), atol=1e-6)
    for bound in ("code", "paper"):
        assert torch.equal(minsum(torch.ones(3, 2), torch.zeros(2), bound=bound), torch.ones(2))  # no spread: mu
    with pytest.raises(ValueError, match="bound must be 'code' or 'paper', got 'mean'"):
        minsum(honest, torch.zeros(2), bound="mean")


def _authors_search(honest: torch.Tensor, kind: str, bound: str, start: float = 10.0) -> float:
    """The binary search of the authors' ``our_attack_score`` (NDSS21-Model-Poisoning notebooks), in float64:
    lamda from ``start``, steps halving, accepted while sum_j ||mu - lamda * deviation - h_j||^2 <= the bound
    (min over i of the benign sums in their code; max in the paper's text), to 1e-5."""
    from fedepic.attacks.model_attacks import perturbation_direction

    mu, deviation = honest.mean(dim=0), -perturbation_direction(honest, kind)
    limit = _budget(honest, bound)
    lamda, lamda_fail, lamda_succ = start, start, 0.0
    while abs(lamda_succ - lamda) > 1e-5:
        if _sum_sq(mu - lamda * deviation, honest) <= limit:
            lamda_succ, lamda = lamda, lamda + lamda_fail / 2
        else:
            lamda = lamda - lamda_fail / 2
        lamda_fail /= 2
    return lamda_succ


def _gamma(honest: torch.Tensor, kind: str, bound: str) -> float:
    from fedepic.attacks.model_attacks import perturbation_direction

    p = perturbation_direction(honest, kind)
    out = minsum(honest, torch.zeros(honest.shape[1], dtype=honest.dtype), perturbation=kind, bound=bound)
    return float((out - honest.mean(dim=0)).norm() / p.norm())


def test_minsum_gamma_of_the_code_and_of_the_paper_on_8x50_rows():
    honest = torch.randn(8, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    code, paper = _gamma(honest, "std", "code"), _gamma(honest, "std", "paper")
    assert code == pytest.approx(0.78975, abs=1e-4) and paper == pytest.approx(1.00739, abs=1e-4)
    assert _authors_search(honest, "std", "code") == pytest.approx(code, abs=2e-5)
    assert _authors_search(honest, "std", "paper") == pytest.approx(paper, abs=2e-5)


@pytest.mark.parametrize("seed", range(6))
def test_minsum_closed_form_is_the_authors_binary_search(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, dim = int(torch.randint(3, 12, (1,), generator=gen)), int(torch.randint(2, 40, (1,), generator=gen))
    honest = torch.randn(rows, dim, generator=gen, dtype=torch.float64) + torch.rand(dim, generator=gen,
                                                                                        dtype=torch.float64)
    for kind in ("std", "unit_vec", "sign"):
        for bound in ("code", "paper"):
            closed = _gamma(honest, kind, bound)
            assert closed < 19.0  # inside the search's reach (twice its start of 10)
            assert _authors_search(honest, kind, bound) == pytest.approx(closed, abs=2e-5), (kind, bound)


def test_minsum_is_registered_and_omniscient():
    from fedepic.attacks.model_attacks import model_attack_arguments
    from fedepic.config import load_config

    assert MODEL_ATTACKS.has("minsum", "needs_honest")
    for bound in ("code", "paper"):
        cfg = load_config(None, ["attack.model=minsum", f"attack.minsum_bound={bound}"])
        params = model_attack_arguments(cfg, n=5, f=2)
        assert params == {"bound": bound}
        assert torch.equal(apply_model_attack("minsum", HONEST, OWN, None, **params),
                           minsum(HONEST, OWN, bound=bound))
    assert load_config(None, ["attack.model=minsum"]).attack.minsum_bound == "code"


# ------------------------------------------------------------------------------------- Fang et al.

from fedepic.attacks.fang import fang_krum, fang_trimmed_mean, krum_lambda_bound  # noqa: E402

CLUSTER = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [1.1, 0.9]])


def test_fang_lambda_bound_by_hand():
    # m = 5 vectors, c = 1: each benign row's m - c - 2 = 2 nearest benign rows, m - 2c - 1 = 2, d = 2
    d = lambda a, b: math.dist(a, b)  # noqa: E731
    rows = CLUSTER.tolist()
    near = [sum(sorted(d(r, o) for k, o in enumerate(rows) if k != i)[:2]) for i, r in enumerate(rows)]
    expected = min(near) / (2 * math.sqrt(2)) + max(math.hypot(*r) for r in rows) / math.sqrt(2)
    assert krum_lambda_bound(CLUSTER, 1, 5) == pytest.approx(expected, rel=1e-12)
    # m - 2c - 1 <= 0: the first term is dropped
    assert krum_lambda_bound(CLUSTER, 2, 5) == pytest.approx(max(math.hypot(*r) for r in rows) / math.sqrt(2))


def _krum_choice(stack: torch.Tensor, f: int) -> int:
    n, k = stack.shape[0], max(1, stack.shape[0] - f - 2)
    scores = [sum(sorted(float(torch.dist(a, b)) ** 2 for j, b in enumerate(stack) if j != i)[:k])
              for i, a in enumerate(stack)]
    return min(range(n), key=lambda i: (scores[i], i))


SPREAD = torch.tensor([[0.1, 0.3], [0.3, -0.1], [-0.1, 0.2], [0.2, 0.0], [0.0, 0.1]])


def test_fang_krum_is_the_largest_halving_krum_selects():
    # three attackers among eight vectors: Krum (f = 3, k = 3 neighbours) picks -lambda_0 / 4 * s
    out = fang_krum(SPREAD, SPREAD[0], None, f=3, n=8)
    lam0 = krum_lambda_bound(SPREAD, 3, 8)
    lam = float(out.abs()[0])
    assert torch.allclose(out, -lam * torch.ones(2))  # -lambda * sign(mean), sign(mean) = (1, 1)
    assert lam == pytest.approx(lam0 / 4, rel=1e-6)
    assert _krum_choice(torch.cat([SPREAD, out.expand(3, -1)]), 3) >= 5  # Krum picks a crafted copy
    assert _krum_choice(torch.cat([SPREAD, (2 * out).expand(3, -1)]), 3) < 5  # lambda_0 / 2 was not picked
    assert _krum_choice(torch.cat([SPREAD, (4 * out).expand(3, -1)]), 3) < 5  # nor lambda_0


def test_fang_krum_stops_at_the_threshold():
    # one attacker is never picked here: lambda is halved down to the paper's threshold 1e-5
    out = fang_krum(SPREAD, SPREAD[0], None, f=1, n=6)
    lam = float(out.abs()[0])
    assert 1e-5 <= lam < 2e-5
    assert lam == pytest.approx(krum_lambda_bound(SPREAD, 1, 6) / 2 ** 15, rel=1e-6)


def test_fang_krum_threshold_and_zero():
    assert torch.equal(fang_krum(torch.zeros(3, 2), torch.zeros(2), None, f=1, n=None), torch.zeros(2))


def test_fang_trimmed_mean_by_hand():
    honest = torch.tensor([[1.0, -1.0, 2.0, 0.5], [2.0, -3.0, -4.0, -0.5], [3.0, -2.0, 1.0, 0.0]])
    # mean (2, -2, -1/3, 0): s = (1, -1, -1, 0); extremes: min 1 (same sign: 1/r), max -1 (same sign:
    # -1/r), max 2 (opposite: 2r), 0 where s = 0
    r = 1 + torch.rand(4, generator=torch.Generator().manual_seed(5))
    out = fang_trimmed_mean(honest, torch.zeros(4), torch.Generator().manual_seed(5))
    assert torch.allclose(out, torch.tensor([1 / r[0], -1 / r[1], 2 * r[2], 0.0]))
    assert float(out[0]) <= 1.0 and float(out[1]) >= -1.0 and float(out[2]) >= 2.0
    with pytest.raises(ValueError, match="b must be"):
        fang_trimmed_mean(honest, torch.zeros(4), None, b=0.5)


def test_fang_trimmed_mean_moves_the_trimmed_mean_against_the_direction():
    from strategies.trimmed_mean import TrimmedMeanRule

    gen = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.1 * torch.randn(6, 50, generator=gen)  # every coordinate moves up
    crafted = fang_trimmed_mean(honest, honest[0], torch.Generator().manual_seed(1))
    rule = TrimmedMeanRule(2)
    clean = rule(honest, None, None, {}).vector
    attacked = rule(torch.cat([honest, crafted.expand(2, -1)]), None, None, {}).vector
    assert bool((attacked < clean).all())


# ------------------------------------------------------------------------------------- ByzFL's optimized ALIE / IPM

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from fedepic.attacks.optimized import best_factor, defense_aggregator, optimal_alie, optimal_ipm  # noqa: E402

BYZFL_CASES = Path(__file__).parent / "data" / "byzfl_attacks.json"


def _byzfl_rule(name: str):
    from strategies.median import MedianRule
    from strategies.preaggregation import nearest_neighbor_mixing
    from strategies.trimmed_mean import TrimmedMeanRule

    return {"trmean_nnm": lambda s: TrimmedMeanRule(2)(nearest_neighbor_mixing(s, 2), None, None, {}).vector,
            "median": lambda s: MedianRule()(s, None, None, {}).vector,
            "trmean": lambda s: TrimmedMeanRule(2)(s, None, None, {}).vector}[name]


def test_optimized_attacks_match_byzfl():
    """ByzFL 0.0.11's Optimal_ALittleIsEnough / Optimal_InnerProductManipulation (tests/data/make_byzfl_attacks.py)
    on 9 random stacks each, against the same rules built from fedepic's strategies."""
    cases = json.loads(BYZFL_CASES.read_text())["cases"]
    assert len(cases) == 18
    for case in cases:
        x = torch.tensor(case["x"], dtype=torch.float64)
        attack = optimal_alie if case["attack"] == "alie" else optimal_ipm
        out = attack(x, x[0], None, f=2, evals=20, aggregator=_byzfl_rule(case["rule"]))
        assert torch.allclose(out, torch.tensor(case["out"], dtype=torch.float64), rtol=1e-6, atol=1e-5), case["rule"]


def test_line_search_by_hand():
    # F(tau) = 100 - |tau - 25| under ByzFL's schedule, traced by hand (tau (F - 100)):
    # 0 (-25), +10 -> 10 (-15) better, delta 20 -> 30 (-5) better, delta 40 -> 70 (-45) worse, delta 32;
    # contraction: 62 (-37) no, delta 25.6 -> 55.6 no, delta 20.48 -> 50.48 no, delta 16.384 -> 46.384 no
    honest = torch.zeros(2, 1)
    calls = []

    def aggregator(stack):
        calls.append(float(stack[-1, 0]))
        return torch.tensor([-abs(float(stack[-1, 0]) - 25.0) + 100.0])  # distance from 0: 100 - |tau - 25|

    tau = best_factor(honest, lambda t: torch.tensor([t]), f=1, evals=8, aggregator=aggregator)
    assert tau == 30.0
    assert calls == pytest.approx([0.0, 10.0, 30.0, 70.0, 62.0, 55.6, 50.48, 46.384])
    with pytest.raises(ValueError, match="evals"):
        best_factor(honest, lambda t: torch.tensor([t]), f=1, evals=0, aggregator=aggregator)


def test_optimal_ipm_against_the_mean_keeps_expanding():
    # the mean's deviation grows with tau: 20 evaluations expand 0, 10, 30, 70, ... = 10 (2^19 - 1)
    out = optimal_ipm(HONEST, OWN, None, f=1, evals=20)
    assert torch.allclose(out, -10.0 * (2 ** 19 - 1) * HONEST.mean(dim=0))


def test_the_server_passes_its_defense_to_the_optimized_attacks():
    from fedepic.config import load_config
    from fedepic.server_rounds import inject_model_attack

    cfg = load_config(None, ["mode=federated", "attack.model=optimal_alie", "defense.trim=2",
                             "defense.pre_aggregation=[nnm]", "clients.count=9", "clients.malicious_fraction=0.22"])
    x = torch.tensor(json.loads(BYZFL_CASES.read_text())["cases"][0]["x"], dtype=torch.float32)
    stack = torch.cat([x, torch.zeros(2, 5)])  # the global model is the origin: rows are updates
    out = inject_model_attack(cfg, [False] * 7 + [True] * 2, stack, torch.zeros(5), seed=0, rule="fedtrimmedavg")
    expected = optimal_alie(x, x[0], None, f=2, evals=20, aggregator=_byzfl_rule("trmean_nnm"))
    assert torch.allclose(out.update, expected, rtol=1e-5)
    # the aggregator the server builds is the registry's rule after its pre-aggregation steps
    stacked = torch.cat([x, expected.expand(2, -1)])
    assert torch.allclose(defense_aggregator(cfg, "fedtrimmedavg")(stacked), _byzfl_rule("trmean_nnm")(stacked))
    # without the member's rule the objective is the plain mean
    plain = inject_model_attack(cfg, [False] * 7 + [True] * 2, stack, torch.zeros(5), seed=0)
    assert torch.allclose(plain.update, optimal_alie(x, x[0], None, f=2, evals=20), rtol=1e-5)


def test_the_search_sees_the_rule_state_the_server_holds():
    """Centered clipping from the previous centre c = (10, 0): rows (10, +-1) sit within tau = 1 of it, so
    the aggregate is c; from an empty state (centre 0) both rows are clipped to norm 1 instead. Each
    evaluation starts from a copy: the state and the repeated result do not move."""
    from fedepic.config import load_config
    from fedepic.server_rounds import inject_model_attack

    cfg = load_config(None, ["mode=federated", "attack.model=optimal_alie", "clients.count=4",
                             "clients.malicious_fraction=0.25", "defense.centered_clipping.tau=1",
                             "strategies=[centered_clipping]"])
    state = {"centre": torch.tensor([10.0, 0.0])}
    stack = torch.tensor([[10.0, 1.0], [10.0, -1.0]])
    defended = defense_aggregator(cfg, "centered_clipping", state)
    assert torch.equal(defended(stack), torch.tensor([10.0, 0.0]))
    assert torch.equal(defended(stack), torch.tensor([10.0, 0.0]))
    assert torch.equal(state["centre"], torch.tensor([10.0, 0.0])) and list(state) == ["centre"]
    fresh = defense_aggregator(cfg, "centered_clipping")(stack)
    assert torch.allclose(fresh, torch.tensor([10.0 / math.sqrt(101.0), 0.0]))
    # the server's injection passes its state on: the update is the search against that centre
    honest = torch.tensor([[10.0, 1.0], [10.0, -1.0], [11.0, 0.5]])
    rows = torch.cat([honest, torch.zeros(1, 2)])
    out = inject_model_attack(cfg, [False] * 3 + [True], rows, torch.zeros(2), seed=0, rule="centered_clipping",
                              rule_state=state)
    expected = optimal_alie(honest, honest[0], None, f=1, evals=20, aggregator=defended)
    assert torch.equal(out.update, expected)
    empty = inject_model_attack(cfg, [False] * 3 + [True], rows, torch.zeros(2), seed=0, rule="centered_clipping")
    assert not torch.equal(empty.update, expected)


def test_both_backends_hand_their_rule_state_to_the_search(tmp_path, monkeypatch):
    """engine=local: round 2's search gets the centre round 1 left (round 1's: none); the Flower backend
    holds a rule without a Flower strategy in the same RuleAggregation, read the same way."""
    import threading
    from types import SimpleNamespace

    import fedepic.server_rounds as rounds
    import simulations.flower_backend as fb
    from fedepic.config import load_config
    from fedepic.local_backend import RuleAggregation
    from fedepic.server_rounds import ClientReply, NodeWork, rule_memory
    from tests.test_resume import serve_locally

    seen, centres = [], []
    real_defense, real_call = rounds.defense_aggregator, RuleAggregation.__call__

    def spy_defense(cfg, rule, state=None, round_=None):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in (state or {}).items()})
        return real_defense(cfg, rule, state, round_)

    def spy_call(self, work, updates, rnd=None):
        out = real_call(self, work, updates, rnd)
        centres.append(self.rule_state["centre"].clone())
        return out

    monkeypatch.setattr(rounds, "defense_aggregator", spy_defense)
    monkeypatch.setattr(RuleAggregation, "__call__", spy_call)
    cfg = load_config(None, ["mode=federated", "engine=local", "name=n", f"output_dir={tmp_path}", "progress=false",
                             "data.name=synthetic", "data.synthetic_train=200", "data.synthetic_test=50",
                             "clients.count=4", "clients.malicious_fraction=0.25", "rounds=2", "model.name=mlp",
                             "attack.model=optimal_alie", "attack.search_evals=3", "strategies=[centered_clipping]"])
    serve_locally(cfg)
    # each search gets the rule's memory and this call's inputs (the round), as the rule itself does
    assert len(seen) == 2 and seen[0] == {"round": 1} and seen[1]["round"] == 2
    assert torch.equal(seen[1]["centre"], centres[0])

    grid = fb.PartitionGrid(SimpleNamespace(get_node_ids=lambda: [0, 1]))
    backend = fb.FlowerServerBackend(cfg, "centered_clipping", grid, {}, threading.Event(), torch.nn.Linear(2, 1))
    assert backend.tracked is None and rule_memory(backend) == {}
    work = NodeWork([ClientReply(i, torch.zeros(3), {"num-examples": 1}) for i in range(2)], [], 2)
    out = backend.aggregate(1, work, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(rule_memory(backend)["centre"], out.vector)


def test_search_evals_is_validated():
    from fedepic.config import ConfigError, load_config

    assert load_config(None, ["attack.model=optimal_ipm"]).attack.search_evals == 20
    with pytest.raises(ConfigError, match="attack.search_evals"):
        load_config(None, ["attack.search_evals=0"])


# ------------------------------------------------------------------------------------- dissensus

from fedepic.attacks.dissensus import dissensus  # noqa: E402


def test_dissensus_formula_by_hand():
    honest = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_i = torch.tensor([1.0, 1.0])
    # pull = 0.2 * (0, -1) + 0.3 * (2, 1) = (0.6, 0.1); byzantine weight 0.25, eps 2: x_i - 8 * pull
    out = dissensus(honest, torch.zeros(2), None, epsilon=2.0, receiver=x_i,
                    honest_weights=torch.tensor([0.2, 0.3]), byzantine_weight=0.25)
    assert torch.allclose(out, torch.tensor([1.0 - 4.8, 1.0 - 0.8]))
    own = torch.tensor([5.0, 5.0])
    assert torch.equal(dissensus(honest, own, None, epsilon=1.0), own)  # no receiver: its own vector
    assert torch.equal(dissensus(honest[:0], own, None, epsilon=1.0, receiver=x_i, honest_weights=torch.zeros(0),
                                 byzantine_weight=0.5), x_i)


def _dfl_cfg(*overrides):
    from fedepic.config import load_config

    return load_config(None, ["mode=decentralized", "clients.count=5", "strategies=[gossip]", *overrides])


def test_dissensus_at_the_router_per_receiver():
    """Ring of 5, node 0 malicious (neighbours 1 and 4): every degree is 2, so every Metropolis-Hastings
    weight is 1/3; receiver 1's benign neighbour is 2, its Byzantine one 0: it gets
    x_1 - eps * (1/3)(x_2 - x_1) / (1/3) = x_1 - eps (x_2 - x_1)."""
    from fedepic.topology import build_topology, metropolis_hastings_weights
    from fedepic.peer_routing import poisoned_models

    graph = build_topology("ring", 5, seed=0)
    gen = torch.Generator().manual_seed(3)
    trained = {i: torch.randn(4, generator=gen) for i in range(5)}
    cfg = _dfl_cfg("attack.model=dissensus", "attack.dissensus_eps=1.5")
    sent = poisoned_models(cfg.attack, trained, graph, [0], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    assert torch.allclose(sent[1], trained[1] - 1.5 * (trained[2] - trained[1]))
    assert torch.allclose(sent[4], trained[4] - 1.5 * (trained[3] - trained[4]))
    # gossip at receiver 1 then moves by (1 - eps) times the benign pull
    mixed = (trained[1] + trained[2] + sent[1]) / 3
    assert torch.allclose(mixed - trained[1], (1 - 1.5) * (trained[2] - trained[1]) / 3, atol=1e-6)

    # two malicious neighbours of receiver 2 in a complete graph of 4 (weights 1/4): 0 and 1 send
    # x_2 - eps * (1/4)(x_3 - x_2) / (2/4)
    graph = build_topology("complete", 4, seed=0)
    sent = poisoned_models(cfg.attack, trained, graph, [0, 1], 0, seed=0, round_=1, weights=metropolis_hastings_weights(graph))
    assert torch.allclose(sent[2], trained[2] - 1.5 * 0.5 * (trained[3] - trained[2]))
    assert sent[1] is trained[0]  # a colluder gets the honest model


def test_dissensus_is_refused_at_a_server():
    from fedepic.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="attack.model.*not for mode=federated"):
        load_config(None, ["mode=federated", "attack.model=dissensus"])
    assert _dfl_cfg("attack.model=dissensus").attack.dissensus_eps == 1.0


@pytest.mark.parametrize("name", ["fang_krum", "fang_trimmed_mean"])
def test_fangs_attacks_are_refused_at_peers(name):
    """Fang et al. define them against a server's Krum / trimmed mean: mode=decentralized refuses them
    with one line naming the key (exit 2 at the CLI); server FL keeps them."""
    from fedepic.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"invalid value '{name}' for key 'attack.model'.*not for mode=decentralized"):
        _dfl_cfg(f"attack.model={name}")
    assert load_config(None, ["mode=federated", f"attack.model={name}"]).attack.model == name


# ------------------------------------------------------------------------------------- mimic

from fedepic.attacks.mimic import mimic  # noqa: E402


def _power_step(h, mu, z):
    c = sum(float((row - mu) @ z) * (row - mu) for row in h)
    return c / c.norm()


def test_mimic_warmup_by_hand():
    """Two warm-up rounds, traced with the formulas of the authors' code, then the target is fixed."""
    gen = torch.Generator().manual_seed(1)
    r0, r1, r2 = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    ids = [3, 5, 6, 8]
    state: dict = {}
    # round 0: mu = mean, z from the seeded z0
    z0 = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = r0.mean(0)
    z = _power_step(r0, mu, z0)
    out = mimic(r0, torch.zeros(3, dtype=torch.float64), None, warmup=2, state=state, ids=ids)
    row = int(torch.argmax(r0 @ z))
    assert torch.equal(out, r0[row]) and state["target"] == ids[row] and state["t"] == 1
    # round 1 (t = 1 < warmup): running mean and direction
    mu = mu / 2 + r1.mean(0) / 2
    z = z / 2 + _power_step(r1, mu, z) / 2
    z = z / z.norm()
    out = mimic(r1, torch.zeros(3, dtype=torch.float64), None, warmup=2, state=state, ids=ids)
    row = int(torch.argmax(r1 @ z))
    assert torch.allclose(state["z"], z) and torch.allclose(state["mu"], mu)
    assert torch.equal(out, r1[row]) and state["target"] == ids[row]
    # round 2 (t = warmup): the target client's vector, wherever its row is; z no longer moves
    target = state["target"]
    shuffled = [8, 6, 5, 3]
    out = mimic(r2, torch.zeros(3, dtype=torch.float64), None, warmup=2, state=state, ids=shuffled)
    assert torch.equal(out, r2[shuffled.index(target)]) and torch.allclose(state["z"], z) and state["t"] == 3
    # a target not sampled this round: the row of largest <h, z> stands in, the target stays
    others = [i for i in ids if i != target][:3]
    out = mimic(r2[:3], torch.zeros(3, dtype=torch.float64), None, warmup=2, state=state, ids=others)
    assert torch.equal(out, r2[int(torch.argmax(r2[:3] @ z))]) and state["target"] == target


def test_mimic_without_state_and_nonfinite_rows():
    honest = torch.tensor([[-2.0, 0.0], [0.0, 0.1], [3.0, 0.0]])
    first = mimic(honest, torch.zeros(2), None, warmup=1)
    assert torch.equal(first, mimic(honest, torch.zeros(2), None, warmup=1))  # no memory: round 0 each time
    spoilt = torch.cat([honest, torch.full((1, 2), float("nan"))])
    state: dict = {}
    assert torch.equal(mimic(spoilt, torch.zeros(2), None, warmup=1, state=state, ids=[1, 2, 3, 4]), first)
    assert state["target"] in (1, 2, 3)
    with pytest.raises(ValueError, match="ids"):
        mimic(honest, torch.zeros(2), None, warmup=1, ids=[1])


def test_the_server_keeps_mimics_memory_in_the_members_progress():
    from fedepic.config import load_config
    from fedepic.server_rounds import Progress, inject_model_attack

    cfg = load_config(None, ["mode=federated", "attack.model=mimic", "attack.mimic_warmup=1"])
    gen = torch.Generator().manual_seed(2)
    stack = torch.randn(5, 4, generator=gen)
    progress = Progress({})
    malicious = [False, True, False, False, True]
    out = inject_model_attack(cfg, malicious, stack, torch.zeros(4), seed=0, memory=progress.attack,
                              clients=[10, 11, 12, 13, 14])
    assert progress.attack["target"] in (10, 12, 13) and progress.attack["t"] == 1
    target = progress.attack["target"]
    assert torch.equal(out.update, stack[[10, 11, 12, 13, 14].index(target)])
    restored = Progress.from_state_dict(progress.state_dict())
    assert restored.attack["target"] == target and torch.equal(restored.attack["z"], progress.attack["z"])
    # next round, other rows: the fixed target's new vector
    stack2 = torch.randn(5, 4, generator=gen)
    out = inject_model_attack(cfg, malicious, stack2, torch.zeros(4), seed=1, memory=restored.attack,
                              clients=[10, 11, 12, 13, 14])
    assert torch.equal(out.update, stack2[[10, 11, 12, 13, 14].index(target)])


@pytest.mark.parametrize("module", ["fedepic.attacks.minsum", "fedepic.attacks.fang", "fedepic.attacks.optimized",
                                    "fedepic.attacks.dissensus", "fedepic.attacks.mimic",
                                    "fedepic.attacks.model_attacks"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_the_search_gets_the_rounds_inputs_fltrust_and_bucketing():
    """The optimized attacks search against the rule as the engine calls it this round: FLTrust with the
    server's update in its state, bucketing's steps built for the round (an unseeded step would refuse)."""
    from fedepic.config import load_config
    from fedepic.server_rounds import inject_model_attack

    honest = torch.tensor([[1.0, 0.5], [0.8, 0.7], [1.2, 0.4], [0.9, 0.6]], dtype=torch.float64)
    rows = torch.cat([honest, torch.zeros(2, 2, dtype=torch.float64)])
    bad = [False] * 4 + [True] * 2
    fl = load_config(None, ["mode=federated", "attack.model=optimal_alie", "strategies=[fltrust]",
                            "clients.count=6", "clients.malicious_ids=[4,5]"])
    g0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = inject_model_attack(fl, bad, rows, torch.zeros(2, dtype=torch.float64), seed=0, rule="fltrust",
                              rule_state={"round": 1, "server_update": g0}, round_=1)
    assert out is not None and bool(torch.isfinite(out.update).all())
    with pytest.raises(ValueError, match="server_update"):  # without the round's input the rule cannot run
        inject_model_attack(fl, bad, rows, torch.zeros(2, dtype=torch.float64), seed=0, rule="fltrust")
    bucketed = load_config(None, ["mode=federated", "attack.model=optimal_ipm", "strategies=[fedmedian]",
                                  "defense.pre_aggregation=[bucketing]", "clients.count=6",
                                  "clients.malicious_ids=[4,5]"])
    first = inject_model_attack(bucketed, bad, rows, torch.zeros(2, dtype=torch.float64), seed=0,
                                rule="fedmedian", rule_state={"round": 3}, round_=3)
    again = inject_model_attack(bucketed, bad, rows, torch.zeros(2, dtype=torch.float64), seed=0,
                                rule="fedmedian", rule_state={"round": 3}, round_=3)
    assert torch.equal(first.update, again.update)  # the round's permutation: the same search both times
