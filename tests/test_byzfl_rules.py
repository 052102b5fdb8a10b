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
from fedepic.extensions import SERVER_RULES
from strategies import centered_clipping
from strategies.aggregate import aggregate
from strategies.centered_clipping import CenteredClippingRule

DATA = Path(__file__).parent / "data"
REFERENCE = torch.load(DATA / "byzfl_reference.pt", weights_only=True)
BYZFL_PYTHON = Path(os.environ.get("FEDEPIC_BYZFL_PYTHON", "/tmp/byzfl-venv/bin/python"))
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


# --------------------------------------------------------------------------- the recording itself


@pytest.mark.skipif(not BYZFL_PYTHON.exists(), reason="no venv with byzfl (FEDEPIC_BYZFL_PYTHON); the comparisons "
                    "above still ran, on the recorded outputs")
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
