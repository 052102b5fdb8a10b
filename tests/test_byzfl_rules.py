"""The rules of ByzFL's family (centered clipping, geometric median, MoNNA, bucketing, ARC): each against
ByzFL's own implementation on seeded float64 stacks with outliers, against its formula on a hand-made
case, under the non-finite policy, and (peer rules) with the own row anywhere in the stack.

ByzFL's outputs are recorded in tests/data/byzfl_reference.pt by tests/data/make_byzfl_reference.py,
run in a venv holding byzfl (fedepic's own environment does not); the last test re-runs that script
where such a venv exists and checks the recording is still what ByzFL gives.
"""

from __future__ import annotations

import doctest
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fedepic.config import load_config
from fedepic.extensions import PEER_RULES, SERVER_RULES, pre_aggregation_steps
from fedepic.peer_node import peer_rule
from strategies import arc, bucketing, centered_clipping, geometric_median, monna
from strategies.aggregate import aggregate
from strategies.arc import AdaptiveRobustClipping, adaptive_robust_clip, clipped_count
from strategies.bucketing import Bucketing, bucket_means, bucketed_rows
from strategies.centered_clipping import CenteredClippingRule
from strategies.geometric_median import GeometricMedianRule
from strategies.mean import MeanRule
from strategies.monna import MoNNARule
from tests.byzfl_python import BYZFL_PYTHON, SKIP_REASON

DATA = Path(__file__).parent / "data"
REFERENCE = torch.load(DATA / "byzfl_reference.pt", weights_only=True)
NAN = float("nan")


def reference(rule: str) -> list[dict]:
    found = [c for c in REFERENCE["cases"] if c["rule"] == rule]
    assert found, rule
    return found


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- centered clipping


def test_centered_clipping_is_byzfls_over_two_rounds():
    for case in reference("centered_clipping"):
        rule, state = CenteredClippingRule(case["tau"], case["iterations"]), {}
        for x, want in zip(case["stacks"], case["outs"]):
            out = aggregate(rule, x.clone(), None, None, state)
            assert close(out.vector, want), (case["tau"], case["iterations"], x.shape)
            assert out.kept.all() and out.shares is None
            assert close(state["centre"], want)


def test_centered_clipping_by_hand():
    """tau = 1, two steps from the centre (1, 0) kept by the last round:
    step 1: x - v = (2, 0), (-1, 0), (-1, 3): norms 2, 1, sqrt(10) -> clipped (1, 0), (-1, 0),
    (-1, 3)/sqrt(10), whose sum is (-1, 3)/sqrt(10); v = (1 - 1/(3 sqrt(10)), 1/sqrt(10)).
    step 2: the same from v's new value (the loop below)."""
    x = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    want = v.clone()
    for _ in range(2):
        steps = []
        for row in x:
            z = row - want
            steps.append(z * min(1.0, 1.0 / float(z.norm())))
        want = want + sum(steps) / 3
    r10 = 10 ** 0.5
    first = torch.tensor([1 - 1 / (3 * r10), 1 / r10], dtype=torch.float64)
    state = {"centre": v}
    rule = CenteredClippingRule(1.0, 1)
    assert close(rule(x, None, None, {"centre": v}).vector, first)
    out = CenteredClippingRule(1.0, 2)(x, None, None, state)
    assert close(out.vector, want) and close(state["centre"], want)
    assert out.kept.tolist() == [True, True, True]


def test_centered_clipping_leaves_a_nan_row_out_and_keeps_its_centre_when_nothing_is_left():
    x = torch.tensor([[1.0, 0.0], [NAN, 0.0], [0.0, 1.0]], dtype=torch.float64)
    state = {}
    out = aggregate(CenteredClippingRule(10.0, 1), x, None, None, state)
    assert close(out.vector, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert out.kept.tolist() == [True, False, True] and out.nonfinite.tolist() == [False, True, False]
    out = aggregate(CenteredClippingRule(10.0, 1), torch.full((2, 2), NAN, dtype=torch.float64), None, None, state)
    assert out.vector is None and close(state["centre"], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_centered_clipping_refuses_bad_parameters_and_a_centre_of_another_length():
    with pytest.raises(ValueError, match="tau"):
        CenteredClippingRule(0.0, 1)
    with pytest.raises(ValueError, match="iterations"):
        CenteredClippingRule(1.0, 0)
    with pytest.raises(ValueError, match="centre"):
        CenteredClippingRule(1.0, 1)(torch.zeros(2, 3), None, None, {"centre": torch.zeros(4)})


def test_centered_clipping_binds_from_the_config():
    cfg = load_config(None, ["mode=federated", "defense.centered_clipping.tau=2.5",
                             "defense.centered_clipping.iterations=4"])
    rule = SERVER_RULES.build("centered_clipping", cfg)
    assert (rule.tau, rule.iterations) == (2.5, 4)


def test_centered_clipping_examples():
    assert doctest.testmod(centered_clipping).failed == 0


# --------------------------------------------------------------------------- geometric median (RFA)


def test_geometric_median_is_byzfls_at_the_server_and_at_a_peer():
    for case in reference("geometric_median"):
        rule = GeometricMedianRule(case["iterations"], case["nu"])
        x, want = case["stack"], case["out"]
        out = aggregate(rule, x.clone(), None, None, {})
        assert close(out.vector, want), (case["nu"], case["iterations"], x.shape)
        assert out.kept.all() and abs(sum(out.info["weights"]) - 1) < 1e-12
        for own in (0, x.shape[0] - 1):  # at a peer: own is a row like the others, mixing weights ignored
            w = torch.rand(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(own))
            peer = aggregate(rule, x.clone(), own, w / w.sum(), {})
            assert close(peer.vector, want) and peer.kept.all()


def test_geometric_median_by_hand_with_example_weights():
    """Rows 0, 2, 10 (one coordinate) with example counts 1, 2, 1, nu = 0.5, two steps from 0:
    step 1: distances 0, 2, 10 -> max(nu, d) = 0.5, 2, 10; beta = 1/0.5, 2/2, 1/10 = 2, 1, 0.1;
            z_1 = (0 + 2 + 1) / 3.1 = 30/31.
    step 2: distances 30/31, 32/31, 280/31; beta = 31/30, 62/32, 31/280; z_2 = sum beta x / sum beta."""
    x = torch.tensor([[0.0], [2.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    one = GeometricMedianRule(1, 0.5)(x, None, w, {})
    assert abs(float(one.vector) - 30 / 31) < 1e-12
    b = [31 / 30, 62 / 32, 31 / 280]
    two = GeometricMedianRule(2, 0.5)(x, None, w, {})
    assert abs(float(two.vector) - (2 * b[1] + 10 * b[2]) / sum(b)) < 1e-12
    assert two.kept.tolist() == [True, True, True]
    # the same stack with equal weights (None) is ByzFL's: beta = 2, 1/2, 1/10
    assert abs(float(GeometricMedianRule(1, 0.5)(x, None, None, {}).vector) - (1 + 1) / 2.6) < 1e-12


def test_geometric_median_leaves_a_nan_row_out():
    x = torch.tensor([[0.0, 0.0], [NAN, 1.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    out = aggregate(GeometricMedianRule(5, 0.1), x.clone(), None, None, {})
    want = GeometricMedianRule(5, 0.1)(x[[0, 2, 3]], None, None, {}).vector
    assert torch.equal(out.vector, want)
    assert out.kept.tolist() == [True, False, True, True] and out.nonfinite.tolist() == [False, True, False, False]
    # at a peer with a NaN own: own is replaced by the coordinate median of the others, then one row of the median
    peer = aggregate(GeometricMedianRule(5, 0.1), x.clone(), 1, None, {})
    replaced = x.clone()
    replaced[1] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    assert peer.own_replaced and torch.equal(peer.vector, GeometricMedianRule(5, 0.1)(replaced, 1, None, {}).vector)


def test_geometric_median_refuses_bad_parameters_and_binds_from_the_config():
    with pytest.raises(ValueError, match="iterations"):
        GeometricMedianRule(0, 0.1)
    with pytest.raises(ValueError, match="nu"):
        GeometricMedianRule(3, 0.0)
    cfg = load_config(None, ["mode=federated", "defense.geometric_median.iterations=7",
                             "defense.geometric_median.nu=0.01"])
    rule = SERVER_RULES.build("geometric_median", cfg)
    assert (rule.iterations, rule.nu) == (7, 0.01)
    peer = PEER_RULES.build("geometric_median", load_config(None, ["mode=decentralized", "strategies=[gossip]"]))
    assert (peer.iterations, peer.nu) == (3, 0.1)


def test_geometric_median_examples():
    assert doctest.testmod(geometric_median).failed == 0


# --------------------------------------------------------------------------- MoNNA


def test_monna_at_a_peer_is_byzfls_with_idx_the_own_row():
    for case in reference("monna"):
        x, want, own = case["stack"], case["out"], case["idx"]
        out = aggregate(MoNNARule(case["f"]), x.clone(), own, None, {})
        assert close(out.vector, want), (case["f"], own, x.shape)
        assert int(out.kept.sum()) == x.shape[0] - case["f"] and bool(out.kept[own])
        assert close(x[out.kept].mean(dim=0), want)


def test_monna_by_hand_at_a_peer_and_at_the_server():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, -2.0], [30.0, 40.0]], dtype=torch.float64)
    # own = row 2 at (1, 0), f = 2: distances 1, sqrt(20), 0, sqrt(5), sqrt(29 ** 2 + 40 ** 2) -> rows 2, 0, 3
    out = MoNNARule(2)(x, 2, None, {})
    assert out.info["selected"] == [2, 0, 3] and out.kept.tolist() == [True, False, True, True, False]
    assert close(out.vector, torch.tensor([1 / 3, -2 / 3], dtype=torch.float64))
    # a tie with own goes to own: row 0 duplicated at row 1, own = 1, f = 2 of 3 -> lowered to 1: rows 1, 0
    dup = torch.tensor([[1.0], [1.0], [5.0]], dtype=torch.float64)
    assert MoNNARule(2)(dup, 1, None, {}).info["selected"] == [1, 0]
    # the server: round 1 from 0 (norms 0, 5, 1, 2, 50 -> rows 0, 2, 3), round 2 from that mean
    state = {}
    first = MoNNARule(2)(x, None, None, state)
    assert first.info["selected"] == [0, 2, 3] and close(state["reference"], first.vector)
    second = MoNNARule(2)(x + torch.tensor([3.0, 4.0], dtype=torch.float64), None, None, state)
    # from the reference (1/3, -2/3) the shifted rows (3, 4), (6, 8), (4, 4), (3, 2), (33, 44) lie at
    # sqrt(7.11 + 21.78), sqrt(32.11 + 75.11), sqrt(13.44 + 21.78), sqrt(7.11 + 7.11), ...: rows 3, 0, 2
    assert second.info["selected"] == [3, 0, 2]
    want = (x + torch.tensor([3.0, 4.0], dtype=torch.float64))[[0, 2, 3]].mean(dim=0)
    assert close(second.vector, want) and close(state["reference"], want)


def test_monna_leaves_a_nan_row_out_and_replaces_a_nan_own():
    x = torch.tensor([[0.0], [NAN], [1.0], [2.0], [50.0]], dtype=torch.float64)
    out = aggregate(MoNNARule(1), x.clone(), 0, None, {})  # 4 finite rows, f = 1: own and its 2 nearest
    assert close(out.vector, torch.tensor([1.0], dtype=torch.float64))
    assert out.kept.tolist() == [True, False, True, True, False] and out.nonfinite.tolist()[1]
    # own (row 1) replaced by the median of 0, 1, 2, 50, 1.5: five rows, f = 1, own and its 3 nearest
    own_nan = aggregate(MoNNARule(1), x.clone(), 1, None, {})
    assert own_nan.own_replaced and own_nan.info["selected"] == [1, 2, 3, 0]
    assert close(own_nan.vector, torch.tensor([(1.5 + 1.0 + 2.0 + 0.0) / 4], dtype=torch.float64))
    assert own_nan.kept.tolist() == [True, False, True, True, False]  # the replaced own is reported not kept
    server = aggregate(MoNNARule(1), x.clone(), None, None, {})
    assert close(server.vector, torch.tensor([1.0], dtype=torch.float64)) and server.nonfinite.tolist()[1]


def test_monna_binds_f_from_the_config():
    cfg = load_config(None, ["mode=federated", "clients.count=10", "clients.malicious_fraction=0.3"])
    assert SERVER_RULES.build("monna", cfg).f == 3
    assert SERVER_RULES.build("monna", load_config(None, ["mode=federated", "defense.byzantine=2"])).f == 2
    with pytest.raises(ValueError, match="monna"):
        MoNNARule(-1)


def test_monna_examples():
    assert doctest.testmod(monna).failed == 0


# --------------------------------------------------------------------------- bucketing


def test_bucket_means_are_byzfls_under_byzfls_permutation():
    for case in reference("bucketing"):
        x, perm, s = case["stack"], case["permutation"], case["s"]
        assert close(bucket_means(x, perm, s), case["out"]), (s, x.shape)
        rows = bucketed_rows(x, perm, s)  # what the step hands the rule: each row its bucket's mean
        for b, members in enumerate(torch.split(perm, s)):
            assert all(close(rows[i], case["out"][b]) for i in members.tolist())


def test_bucketing_by_hand_and_its_seeds():
    x = torch.arange(5.0, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 10.0]], dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])  # buckets {3, 0}, {4, 1}, {2}
    want = torch.tensor([[1.5, 15.0], [2.5, 25.0], [2.0, 20.0]], dtype=torch.float64)
    assert close(bucket_means(x, perm, 2), want)
    assert close(bucketed_rows(x, perm, 2), want[[0, 1, 2, 0, 1]])
    # at a server the round's permutation: that of node SERVER_NODE (2**31 - 1), the same however often it
    # is built, and not seed * 1_000_003 + round, which seeds the server rules' draws (fedepic/seeds.py)
    for rnd in (1, 2):
        g = torch.Generator().manual_seed(((7 * 1_000_003 + rnd) * 1_000_033 + 2**31 - 1) % 2**63)
        assert torch.equal(Bucketing(2, 7, rnd)(x), bucketed_rows(x, torch.randperm(5, generator=g), 2))
        assert torch.equal(Bucketing(2, 7, rnd)(x), Bucketing(2, 7, rnd)(x))
    # at a peer: bound per call to the round and the receiving node, whatever the stack holds
    for rnd, node in ((1, 0), (1, 3), (2, 3)):
        bound = Bucketing(2, 7).for_call({"round": rnd, "node": node})
        g = torch.Generator().manual_seed((7 * 1_000_003 + rnd) * 1_000_033 + node)
        perm = torch.randperm(5, generator=g)
        for stack in (x, x + 1, x * 2):  # the permutation does not depend on the contents
            assert torch.equal(bound(stack), bucketed_rows(stack, perm, 2))
    perms = {tuple(Bucketing(2, 7).for_call({"round": r, "node": k}).permutation(x).tolist())
             for r in range(1, 5) for k in range(5)}
    assert len(perms) > 10  # a new permutation for each round and node (5! = 120 of them)
    assert Bucketing(2, 7, 4).for_call({"round": 9, "node": 1}).round == 4  # a server's step keeps its round
    with pytest.raises(ValueError, match="bucketing: no round"):
        Bucketing(2, 7)(x)
    assert torch.equal(Bucketing(1, 7, 1)(x), x)
    with pytest.raises(ValueError, match="bucketing"):
        Bucketing(0, 7)


def test_bucketing_leaves_nan_rows_out_of_the_buckets():
    x = torch.tensor([[0.0], [NAN], [2.0], [4.0], [6.0]], dtype=torch.float64)
    out = Bucketing(2, 3, 1)(x)
    g = torch.Generator().manual_seed(((3 * 1_000_003 + 1) * 1_000_033 + 2**31 - 1) % 2**63)
    finite = bucketed_rows(x[[0, 2, 3, 4]], torch.randperm(4, generator=g), 2)
    assert torch.isnan(out[1]).all() and torch.equal(out[[0, 2, 3, 4]], finite)
    # then the rule leaves the NaN row out: the mean of the four bucketed rows is the mean of the rows
    agg = aggregate(MeanRule(), out, None, None, {})
    assert close(agg.vector, torch.tensor([3.0], dtype=torch.float64)) and agg.nonfinite.tolist()[1]


def test_the_server_engine_builds_the_steps_with_its_round():
    cfg = load_config(None, ["mode=federated", "seed=5", "defense.pre_aggregation=[bucketing,arc]",
                             "defense.bucket_size=3", "defense.byzantine=2"])
    bucketing, arc = pre_aggregation_steps(cfg, 4)
    assert (bucketing.s, bucketing.seed, bucketing.round, arc.f) == (3, 5, 4, 2)
    assert pre_aggregation_steps(cfg)[0].round is None  # a peer's: built once, no round
    source = (Path(__file__).parents[1] / "fedepic" / "server_rounds.py").read_text()
    assert "pre_aggregation_steps(cfg, rnd)" in source


def test_bucketing_before_a_peer_rule_moves_own_with_its_bucket():
    cfg = load_config("dfl_smoke", ["strategies=[gossip]", "defense.pre_aggregation=[bucketing]",
                                    "defense.bucket_size=2", "seed=11"])
    rule = peer_rule("gossip", cfg)
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    got = aggregate(rule, x, 0, torch.tensor([0.7, 0.1, 0.1, 0.1]), {"round": 3, "node": 2}).vector
    rows = bucketed_rows(x, Bucketing(2, 11, 3, 2).permutation(x), 2)
    assert torch.allclose(got, 0.7 * rows[0] + 0.1 * rows[1:].sum(dim=0))


# --------------------------------------------------------------------------- ARC


def test_arc_is_byzfls():
    for case in reference("arc"):
        x = case["stack"]
        assert close(AdaptiveRobustClipping(case["f"])(x.clone()), case["out"]), (case["f"], x.shape)


def test_arc_by_hand():
    # n = 5, f = 2: k = floor(2 * 2 * 3 / 5) = 2; norms 5, 10, 1, 2, 13 -> the two largest (13, 10) go to 5
    x = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0], [0.0, 2.0], [5.0, 12.0]], dtype=torch.float64)
    want = x.clone()
    want[1] = torch.tensor([3.0, 4.0], dtype=torch.float64)
    want[4] = torch.tensor([5.0, 12.0], dtype=torch.float64) * 5 / 13
    assert close(adaptive_robust_clip(x, 2), want)
    assert torch.equal(adaptive_robust_clip(x, 0), x)  # k = 0
    assert [clipped_count(n, f) for n, f in ((10, 3), (4, 2), (7, 3), (3, 3))] == [4, 2, 3, 0]


def test_arc_k_is_the_exact_floor_where_byzfls_float_product_falls_short():
    assert clipped_count(242, 33) == 57 and int((2 * 33 / 242) * (242 - 33)) == 56  # 2 * 33 * 209 / 242 = 57


def test_arc_leaves_nan_rows_out_of_the_norms():
    x = torch.tensor([[3.0, 4.0], [NAN, 0.0], [6.0, 8.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = AdaptiveRobustClipping(1)(x)  # 4 finite rows, f = 1: k = 1, the row of norm 10 clipped to 5
    assert torch.isnan(out[1, 0]) and close(out[[0, 2, 3, 4]], adaptive_robust_clip(x[[0, 2, 3, 4]], 1))
    assert close(out[2], torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_bucketing_and_arc_examples():
    assert doctest.testmod(bucketing).failed == 0 and doctest.testmod(arc).failed == 0


@pytest.mark.parametrize("name", ["geometric_median", "monna"])
def test_the_peer_rules_keep_a_consensus(name):
    cfg = load_config(None, ["mode=decentralized", "strategies=[gossip]", "defense.byzantine=1"])
    x = torch.tensor([1.0, -2.0, 3.0])
    out = aggregate(PEER_RULES.build(name, cfg), x.repeat(5, 1), 2, torch.full((5,), 0.2))
    assert torch.allclose(out.vector, x) and out.nonfinite.sum() == 0


# --------------------------------------------------------------------------- the recording itself


@pytest.mark.skipif(not BYZFL_PYTHON.exists(), reason=SKIP_REASON + "; the comparisons above still ran, on the "
                    "recorded outputs")
def test_the_recorded_outputs_are_still_byzfls(tmp_path):
    out = tmp_path / "again.pt"
    subprocess.run([str(BYZFL_PYTHON), str(DATA / "make_byzfl_reference.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    again = torch.load(out, weights_only=True)
    assert len(again["cases"]) == len(REFERENCE["cases"])
    for new, old in zip(again["cases"], REFERENCE["cases"]):
        assert new.keys() == old.keys()
        for key in new:
            a, b = new[key], old[key]
            if isinstance(a, list):
                assert all(torch.equal(p, q) for p, q in zip(a, b))
            else:
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_byzfl_interpreter_comes_from_the_environment():
    """FEDEPIC_BYZFL_PYTHON names ByzFL's interpreter (default /tmp/byzfl-venv/bin/python), and the skip
    reason of the live checks says how to set it."""
    import sys

    code = "from tests.byzfl_python import BYZFL_PYTHON, SKIP_REASON; print(BYZFL_PYTHON); print(SKIP_REASON)"
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "FEDEPIC_BYZFL_PYTHON"}
    default = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert default.stdout.splitlines()[0] == "/tmp/byzfl-venv/bin/python"
    given = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "FEDEPIC_BYZFL_PYTHON": "/x/bin/python"},
                           capture_output=True, text=True)
    path, reason = given.stdout.splitlines()
    assert path == "/x/bin/python" and "/x/bin/python" in reason and "set FEDEPIC_BYZFL_PYTHON" in reason
