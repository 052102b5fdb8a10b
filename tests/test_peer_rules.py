"""Tests for the peer-side aggregation rules in strategies/ and their registry."""

import pytest
import torch

from strategies.gossip import Gossip, check_stack, gossip_subset, renormalised_weights
from strategies.krum import KrumSelect, krum_scores
from strategies.aggregate import aggregate
from strategies.median import MedianRule, coordinate_median
from fedepic.config import load_config
from fedepic.extensions import PEER_RULES
from strategies.scclip import SelfCenteredClipping
from strategies.trimmed_mean import TrimmedMean

OWN = torch.tensor([0.0, 0.0])
NEIGH = torch.tensor([[1.0, 0.0], [0.0, 2.0], [10.0, -10.0]])
W = torch.tensor([0.4, 0.2, 0.2, 0.2])


def peer(rule, own, neighbours, weights=None):
    """``rule``'s vector over the stack [own; neighbours] (own at row 0) through the one entry point,
    ``strategies.aggregate.aggregate`` (the old call ``rule(own, neighbours, weights)``)."""
    check_stack(own, neighbours)
    return aggregate(rule, torch.cat([own[None], neighbours]), 0, weights).vector


def test_gossip_weighted_sum():
    out = peer(Gossip(), OWN, NEIGH, W)
    expected = 0.4 * OWN + 0.2 * NEIGH.sum(dim=0)
    assert torch.allclose(out, expected)
    uniform = peer(Gossip(), OWN, NEIGH, None)
    assert torch.allclose(uniform, torch.cat([OWN[None], NEIGH]).mean(dim=0))


def test_gossip_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to 1"):
        peer(Gossip(), OWN, NEIGH, torch.tensor([0.5, 0.2, 0.2, 0.2]))
    with pytest.raises(ValueError, match="shape"):
        peer(Gossip(), OWN, NEIGH, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        peer(Gossip(), OWN, torch.zeros(3, 5), None)


def test_gossip_subset_renormalises_with_self():
    keep = torch.tensor([True, False, False])
    out = gossip_subset(OWN, NEIGH, W, keep)
    # self 0.4 and neighbour 0 0.2 remain -> 2/3 and 1/3
    assert torch.allclose(out, (0.4 * OWN + 0.2 * NEIGH[0]) / 0.6)
    assert torch.allclose(renormalised_weights(W, keep), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    none_kept = gossip_subset(OWN + 3, NEIGH, W, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none_kept, OWN + 3)
    assert torch.allclose(gossip_subset(OWN, NEIGH, W, torch.ones(3, dtype=torch.bool)), peer(Gossip(), OWN, NEIGH, W))


def test_median_true_median_for_even_count():
    stack = torch.tensor([[1.0, 4.0], [2.0, 3.0], [10.0, -1.0], [3.0, 0.0]])
    assert torch.equal(coordinate_median(stack), torch.tensor([2.5, 1.5]))
    assert torch.equal(coordinate_median(stack[:3]), torch.tensor([2.0, 3.0]))
    out = peer(MedianRule(), OWN, NEIGH, W)  # rows {0,1,0,10} and {0,0,2,-10}
    assert torch.equal(out, torch.tensor([0.5, 0.0]))


def test_trimmed_mean():
    own = torch.tensor([0.0])
    neigh = torch.tensor([[1.0], [2.0], [100.0], [-50.0]])
    assert torch.allclose(peer(TrimmedMean(1), own, neigh), torch.tensor([1.0]))  # mean of {0, 1, 2}
    assert torch.allclose(peer(TrimmedMean(0), own, neigh), torch.tensor([53.0 / 5]))
    assert torch.allclose(peer(TrimmedMean(2), own, neigh), torch.tensor([1.0]))  # the middle value
    # b = 3 needs 7 models: with 5 it is lowered to (5 - 1) // 2 = 2 (the docstring's deviation)
    assert torch.equal(peer(TrimmedMean(3), own, neigh), peer(TrimmedMean(2), own, neigh))
    with pytest.raises(ValueError, match="non-negative"):
        TrimmedMean(-1)


def test_krum_paper_scores_and_selection():
    own = torch.tensor([0.0])
    neigh = torch.tensor([[1.0], [3.0], [20.0]])
    # n = 4, f = 1 -> each model scored on its n - f - 2 = 1 nearest other model
    scores = krum_scores(torch.cat([own[None], neigh]), f=1)
    assert torch.equal(scores, torch.tensor([1.0, 1.0, 4.0, 289.0]))
    assert torch.equal(peer(KrumSelect(f=1), own, neigh), own)  # tie between rows 0 and 1 -> lowest index
    assert torch.equal(peer(KrumSelect(f=1, multi=2), own, neigh), torch.tensor([0.5]))
    assert torch.equal(peer(KrumSelect(f=0, multi=3), own, neigh), torch.tensor([4.0 / 3]))
    with pytest.raises(ValueError, match="n - f - 2"):
        krum_scores(torch.cat([own[None], neigh]), f=2)
    # the rule adapts (fedepic/peer_node.py relies on it): f = 2 with n = 4 runs as f' = n - 3 = 1,
    # and multi is capped at the n models
    assert torch.equal(peer(KrumSelect(f=2), own, neigh), peer(KrumSelect(f=1), own, neigh))
    assert torch.equal(peer(KrumSelect(f=0, multi=5), own, neigh), torch.tensor([6.0]))


@pytest.mark.parametrize("f", [0, 1, 3])
def test_krum_with_one_neighbour_keeps_own(f):
    """n = 2 (own + one neighbour): n - f - 2 < 1 for every f; one neighbour cannot be told apart from
    own, so the node keeps its own model instead of raising."""
    own, neigh = torch.tensor([0.0, 1.0]), torch.tensor([[5.0, -5.0]])
    assert torch.equal(peer(KrumSelect(f=f), own, neigh), own)
    assert torch.equal(peer(KrumSelect(f=f, multi=2), own, neigh), own)
    assert torch.equal(peer(KrumSelect(f=f), own, torch.zeros(0, 2)), own)


def test_krum_with_two_neighbours_lowers_f():
    own, neigh = torch.tensor([0.0]), torch.tensor([[0.5], [9.0]])
    # n = 3 -> f' = 0, k = 1: scores 0.25, 0.25, 72.25 -> own (lowest index of the tie)
    assert torch.equal(peer(KrumSelect(f=2), own, neigh), own)


def test_krum_excludes_outlier():
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 5, generator=gen) * 0.1
    bad = torch.full((1, 5), 50.0)
    out = peer(KrumSelect(f=1), honest[0], torch.cat([honest[1:], bad]))
    assert float(out.abs().max()) < 1.0


def test_scclip_fixed_tau():
    own = torch.tensor([0.0, 0.0])
    neigh = torch.tensor([[0.5, 0.0], [0.0, 30.0], [-3.0, 4.0]])
    w = torch.tensor([0.25, 0.25, 0.25, 0.25])
    out = peer(SelfCenteredClipping(tau=1.0), own, neigh, w)
    clipped = torch.tensor([[0.5, 0.0], [0.0, 1.0], [-0.6, 0.8]])
    assert torch.allclose(out, 0.25 * clipped.sum(dim=0))
    # a huge tau makes it plain gossip
    assert torch.allclose(peer(SelfCenteredClipping(tau=1e9), own, neigh, w), peer(Gossip(), own, neigh, w))


def test_scclip_adaptive_tau():
    own = torch.tensor([0.0])
    neigh = torch.tensor([[1.0], [2.0], [3.0], [100.0]])
    rule = SelfCenteredClipping(tau=None, delta=0.25)
    # distances 1, 2, 3, 100 -> 0.75 quantile (linear) = 3 + 0.25*(100-3) = 27.25
    assert rule.radius(neigh - own) == pytest.approx(27.25)
    out = peer(rule, own, neigh, None)
    assert torch.allclose(out, torch.tensor([(1 + 2 + 3 + 27.25) / 5]))
    with pytest.raises(ValueError, match="exactly one"):
        SelfCenteredClipping(tau=None)
    with pytest.raises(ValueError, match="tau"):
        SelfCenteredClipping(tau=0.0)


def test_registry_builds_every_rule_from_the_config():
    """Each name binds its parameters to the config by signature: the rule the command line runs."""
    cfg = load_config(None, ["mode=decentralized", "strategies=[gossip]", "defense.trim=2", "defense.byzantine=3",
                             "defense.scclip_tau=0.5", "defense.epic.fraction=0.3", "defense.purification.patience=5"])
    built = {name: PEER_RULES.build(name, cfg) for name in PEER_RULES.names()}
    assert built["trimmed_mean"].b == 2 and built["krum"].f == 3 and built["scclip"].tau == 0.5
    assert built["epic"].fraction == 0.3 and built["epic"].threshold == cfg.defense.epic.threshold
    assert built["gp"].patience == 5 and built["exclude"].patience == 5
    assert type(built["exclude"]).__name__ == "ExcludeDetected" and type(built["upper"]) is Gossip
    assert set(PEER_RULES.names("stateful")) == {"exclude", "gp", "gp_epic"}
    assert PEER_RULES.names("local_epic") == ("gp_epic",) and PEER_RULES.names("benign_graph") == ("upper",)
    with pytest.raises(ValueError, match="unknown peer rule 'bulyan'; choose one of gossip"):
        PEER_RULES.build("bulyan", cfg)


@pytest.mark.parametrize("name, params", [
    ("gossip", {}), ("median", {}), ("trimmed_mean", {"b": 1}), ("krum", {"f": 1}),
    ("scclip", {"tau": 1.0}), ("upper", {}),
])
def test_consensus_is_a_fixed_point(name, params):
    x = torch.tensor([1.0, -2.0, 3.0])
    rule = PEER_RULES.get(name).load()(**params)
    out = peer(rule, x, x.repeat(4, 1), torch.full((5,), 0.2))
    assert torch.allclose(out, x)


def test_epic_peer_drops_isolated_update():
    from strategies.epic_peer import EpicPeer, epic_keep_mask

    gen = torch.Generator().manual_seed(0)
    own = torch.zeros(6)
    honest = torch.ones(4, 6) + 0.05 * torch.randn(4, 6, generator=gen)
    neigh = torch.cat([honest[:2], torch.full((1, 6), -20.0), honest[2:]])
    w = torch.full((6,), 1 / 6)
    # k = ceil(0.4 * 5) = 2 medoids: one for the honest group, one alone for the outlier
    keep = epic_keep_mask(own, neigh, fraction=0.4)
    assert keep.tolist() == [True, True, False, True, True]
    out = peer(EpicPeer(fraction=0.4, threshold=1), own, neigh, w)
    assert torch.allclose(out, gossip_subset(own, neigh, w, keep))
    assert torch.allclose(out, honest.sum(dim=0) / 5)
    with pytest.raises(ValueError, match="fraction"):
        EpicPeer(fraction=0.0, threshold=1)


def test_peer_trimmed_mean_has_the_bits_of_the_sorted_mean():
    """The peer rule sorts with the sorting network (strategies.median.sorted_columns) for speed; its
    vector keeps the bits of torch.sort(...).values[b:n - b].mean(0), which it computed before, on
    stacks of every size the network takes and beyond it, with ties."""
    from strategies.median import NETWORK_ROWS
    from strategies.trimmed_mean import TrimmedMean

    generator = torch.Generator().manual_seed(0)
    for n in (3, 5, 11, NETWORK_ROWS, NETWORK_ROWS + 3):
        stack = torch.randn(n, 257, generator=generator)
        stack[:, :16] = torch.round(stack[:, :16])  # ties
        for b in (0, 1, 2):
            k = min(b, (n - 1) // 2)
            expected = torch.sort(stack, dim=0).values[k:n - k].mean(dim=0)
            assert torch.equal(TrimmedMean(b)(stack, 0, None, {}).vector, expected), (n, b)
