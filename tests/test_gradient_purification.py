"""Tests for Gradient Purification (strategies/gradient_purification.py) on hand-made rounds."""

import pytest
import torch

from gp_factory import make_gp

from fedepic.metrics import detection_metrics
from strategies.gradient_purification import GradientPurification, PurificationState


D = 40
IDS = [1, 2, 3, 4]
W = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])


def _round(gen, y, attack=None, bad_id=4):
    """Models after local training from a common start y: update = g + noise; ``bad_id`` attacks."""
    g = torch.ones(D)
    updates = g + 0.1 * torch.randn(len(IDS) + 1, D, generator=gen)
    models = y + updates
    if attack is not None:
        row = IDS.index(bad_id) + 1
        models[row] = y + attack(updates[row])
    return models[0], models[1:]


def test_benign_neighbours_never_flagged():
    gen = torch.Generator().manual_seed(0)
    gp = make_gp()
    state = gp.new_state()
    y = torch.zeros(D)
    bias = 0.3 * torch.randn(len(IDS) + 1, D, generator=gen)  # persistent non-IID offsets
    for _ in range(15):
        own, neigh = _round(gen, y)
        own, neigh = own + bias[0], neigh + bias[1:]
        y, report = gp.aggregate(own, neigh, IDS, W, state)
        assert report.flagged == [] and report.purified == []
        assert report.kept == IDS
        assert max(report.scores.values()) < gp.threshold
    assert state.confirmed == set()


@pytest.mark.parametrize("attack", [lambda u: -u, lambda u: 10 * u], ids=["sign_flip", "scaling"])
def test_attacker_confirmed_after_patience(attack):
    gen = torch.Generator().manual_seed(1)
    gp = make_gp(patience=3, votes=None, reject_score=None)  # rule 5 alone
    state = gp.new_state()
    y = torch.zeros(D)
    for t in range(1, 6):
        own, neigh = _round(gen, y, attack)
        y, report = gp.aggregate(own, neigh, IDS, W, state)
        assert report.flagged == ([4] if t <= 3 else [])
        assert report.purified == ([4] if t == 3 else [])
        # suspicious but unconfirmed: still aggregated (rule 5); confirmed: out for good
        assert report.kept == (IDS if t < 3 else [1, 2, 3])
        assert (4 in state.confirmed) == (t >= 3)
    assert 4 not in report.scores  # confirmed neighbours are no longer scored
    assert detection_metrics(state.confirmed, {4}) == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0
    }


def test_blatant_suspect_left_out_before_confirmation_moderate_one_aggregated():
    gen = torch.Generator().manual_seed(1)
    gp = make_gp(patience=3, votes=None, reject_score=50.0)
    state = gp.new_state()
    own, neigh = _round(gen, torch.zeros(D), lambda u: 10 * u)
    _, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.scores[4] > 50 and report.flagged == [4] and report.kept == [1, 2, 3]
    assert 4 not in state.records and state.history[4] == [True]  # not recorded, but it counts
    # a suspect between threshold and reject_score is still aggregated (and recorded)
    gp_loose = make_gp(patience=3, votes=None, reject_score=2 * report.scores[4])
    state = gp_loose.new_state()
    _, report = gp_loose.aggregate(own, neigh, IDS, W, state)
    assert report.flagged == [4] and report.kept == IDS and 4 in state.records
    with pytest.raises(ValueError, match="reject_score"):
        make_gp(threshold=3.0, reject_score=2.0)


def test_votes_route_confirms_intermittent_attacker():
    gen = torch.Generator().manual_seed(2)
    gp = make_gp(patience=5, window=4, votes=3)
    state = gp.new_state()
    y = torch.zeros(D)
    pattern = [True, False, True, True]  # never 5 in a row, but 3 of the last 4
    for t, bad in enumerate(pattern, start=1):
        own, neigh = _round(gen, y, (lambda u: -u) if bad else None)
        y, report = gp.aggregate(own, neigh, IDS, W, state)
        assert report.purified == ([4] if t == 4 else [])


def test_purification_removes_exactly_the_record():
    gen = torch.Generator().manual_seed(3)
    gp = make_gp(patience=1)
    state = gp.new_state()
    y = torch.zeros(D)
    expected_record = torch.zeros(D)
    for _ in range(3):  # benign rounds: neighbour 4 contributes and is recorded
        own, neigh = _round(gen, y)
        y, report = gp.aggregate(own, neigh, IDS, W, state)
        assert report.kept == IDS
        expected_record += 0.2 * (neigh[3] - own)  # c_ij = w_ij (x_j - x_i), weights unchanged
    record = state.records[4].clone()
    assert torch.allclose(record, expected_record, atol=1e-6)

    own, neigh = _round(gen, y, lambda u: 10 * u)  # 4 turns rogue; patience 1 confirms at once
    new_own, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.purified == [4] and report.kept == [1, 2, 3]
    # gossip over self + {1,2,3}, 4's weight staying with the node, then x - r_ij (before the next send)
    expected = own + 0.2 * (neigh[:3] - own).sum(dim=0) - record
    assert torch.allclose(new_own, expected, atol=1e-6)
    assert 4 not in state.records and state.confirmed == {4}

    # once confirmed, 4 is excluded for good, even when it looks honest again
    own, neigh = _round(gen, new_own)
    _, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.kept == [1, 2, 3] and 4 not in state.records


def test_purify_alone_is_exact():
    state = PurificationState(records={7: torch.tensor([0.5, -1.0, 2.0])})
    own = torch.tensor([1.0, 1.0, 1.0])
    out = GradientPurification.purify(own, state, 7)
    assert torch.equal(out, torch.tensor([0.5, 2.0, -1.0]))
    assert state.records == {} and state.confirmed == {7}


def test_suspicious_unconfirmed_still_aggregated_and_recorded():
    gen = torch.Generator().manual_seed(4)
    gp = make_gp(patience=2, votes=None, reject_score=None)  # rule 5 alone
    state = gp.new_state()
    own, neigh = _round(gen, torch.zeros(D))
    y, _ = gp.aggregate(own, neigh, IDS, W, state)
    record = state.records[4].clone()
    own, neigh = _round(gen, y, lambda u: -u)
    new_own, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.flagged == [4] and report.purified == [] and report.kept == IDS
    assert torch.allclose(state.records[4], record + 0.2 * (neigh[3] - own), atol=1e-6)
    assert torch.allclose(new_own, own + 0.2 * (neigh - own).sum(dim=0), atol=1e-6)

    # confirmed next round: both recorded contributions (the honest and the rogue one) are removed
    own, neigh = _round(gen, new_own, lambda u: -u)
    full_record = state.records[4].clone()
    out, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.purified == [4] and report.kept == [1, 2, 3]
    assert torch.allclose(out, own + 0.2 * (neigh[:3] - own).sum(dim=0) - full_record, atol=1e-5)


def test_clipped_aggregation_records_and_purifies_the_clipped_contribution():
    gen = torch.Generator().manual_seed(5)
    tau = 0.5
    gp = make_gp(patience=2, votes=None, reject_score=None, clip_tau=tau)
    state = gp.new_state()
    own, neigh = _round(gen, torch.zeros(D), lambda u: -u)  # 4 suspicious, aggregated (rule 5), clipped
    diffs = neigh - own
    clipped = diffs * torch.clamp(tau / diffs.norm(dim=1, keepdim=True), max=1.0)
    assert (diffs.norm(dim=1) > tau).all()  # every difference here is longer than tau
    y, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.kept == IDS
    assert torch.allclose(y, own + 0.2 * clipped.sum(dim=0), atol=1e-6)
    assert torch.allclose(state.records[4], 0.2 * clipped[3], atol=1e-6)
    assert float((y - own).norm()) <= 4 * 0.2 * tau + 1e-6  # each neighbour moves the node by <= w tau

    own, neigh = _round(gen, y, lambda u: -u)  # confirmed: the clipped record is removed
    record = state.records[4].clone()
    out, report = gp.aggregate(own, neigh, IDS, W, state)
    assert report.purified == [4] and report.kept == [1, 2, 3]
    diffs = neigh[:3] - own
    clipped = diffs * torch.clamp(tau / diffs.norm(dim=1, keepdim=True), max=1.0)
    assert torch.allclose(out, own + 0.2 * clipped.sum(dim=0) - record, atol=1e-5)
    with pytest.raises(ValueError, match="clip_tau"):
        make_gp(clip_tau=0.0)


def test_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    gp = make_gp(patience=2, votes=None)
    state = gp.new_state()
    y = torch.zeros(D)
    for _ in range(3):
        own, neigh = _round(gen, y, lambda u: -u, bad_id=2)
        y, _ = gp.aggregate(own, neigh, IDS, W, state)
    own, neigh = _round(gen, y, lambda u: -u, bad_id=2)
    sd = state.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd["records"].values())
    assert all(isinstance(v, (int, list)) for v in sd["meta"].values())
    copy = PurificationState.from_state_dict(sd)
    assert copy.confirmed == state.confirmed == {2}
    assert copy.history == state.history and copy.rounds == state.rounds == 3
    assert copy.records.keys() == state.records.keys()
    a, ra = gp.aggregate(own, neigh, IDS, W, state)
    b, rb = gp.aggregate(own, neigh, IDS, W, copy)
    assert torch.equal(a, b) and ra == rb


def test_single_neighbour_cannot_be_told_apart():
    gp = make_gp(patience=1)
    state = gp.new_state()
    out, report = gp.aggregate(torch.zeros(3), torch.full((1, 3), 100.0), [9], None, state)
    assert report.flagged == [] and torch.allclose(out, torch.full((3,), 50.0))


def test_bad_arguments():
    gp = make_gp()
    with pytest.raises(ValueError, match="neighbour_ids"):
        gp.aggregate(torch.zeros(3), torch.zeros(2, 3), [1, 1], None, gp.new_state())
    with pytest.raises(ValueError, match="votes"):
        make_gp(window=3, votes=4)
    with pytest.raises(ValueError, match="detector"):
        make_gp(detector="oracle")


def test_detection_metrics():
    m = detection_metrics({1, 2, 5}, {1, 2, 3, 4})
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert detection_metrics([], [])["precision"] == 1.0
    assert detection_metrics([], [(0, 3)])["recall"] == 0.0
    pairs = detection_metrics([(0, 3), (1, 3)], [(0, 3), (1, 3), (2, 3)])
    assert pairs["tp"] == 2 and pairs["fn"] == 1


def test_epic_detector_confirms_outlier():
    gen = torch.Generator().manual_seed(6)
    gp = make_gp(detector="epic", epic_fraction=0.4, patience=2, votes=None)
    state = gp.new_state()
    y = torch.zeros(D)
    for t in (1, 2):
        own, neigh = _round(gen, y, lambda u: -u)
        y, report = gp.aggregate(own, neigh, IDS, W, state)
        assert report.flagged == [4] and report.scores[4] == 1.0
        assert report.purified == ([4] if t == 2 else [])

