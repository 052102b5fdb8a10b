"""Tests for fedepic.topology: graph builders and Metropolis–Hastings weights."""

import networkx as nx
import pytest
import torch

from fedepic.topology import (
    TOPOLOGIES,
    build_topology,
    metropolis_hastings_weights,
    mixing_matrix,
    node_weights,
)


@pytest.mark.parametrize("name", ["ring", "k_regular", "erdos_renyi", "small_world", "complete"])
def test_builders_connected_and_labelled(name):
    graph = build_topology(name, 10, k=4, p=0.3, seed=3)
    assert sorted(graph.nodes) == list(range(10))
    assert nx.is_connected(graph)
    assert nx.number_of_selfloops(graph) == 0


def test_specific_shapes():
    assert build_topology("ring", 6, seed=0).number_of_edges() == 6
    assert build_topology("complete", 5, seed=0).number_of_edges() == 10
    regular = build_topology("k_regular", 8, k=3, seed=1)
    assert {d for _, d in regular.degree()} == {3}


def test_seeded_random_graphs_reproducible():
    for name in ("k_regular", "erdos_renyi", "small_world"):
        a = build_topology(name, 12, k=4, p=0.3, seed=7)
        b = build_topology(name, 12, k=4, p=0.3, seed=7)
        assert sorted(a.edges) == sorted(b.edges)
    er = [sorted(build_topology("erdos_renyi", 12, p=0.4, seed=s).edges) for s in (1, 2)]
    assert er[0] != er[1]


def test_erdos_renyi_resamples_until_connected():
    graph = build_topology("erdos_renyi", 15, p=0.2, seed=0)
    assert nx.is_connected(graph)


def test_explicit_edges():
    graph = build_topology("explicit", 4, edges=[(0, 1), (1, 2), (2, 3)], seed=0)
    assert sorted(graph.edges) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="hexagon", n=5), "hexagon"),
        (dict(name="ring", n=1), "ring"),
        (dict(name="k_regular", n=5, k=3), "k_regular"),
        (dict(name="k_regular", n=5, k=5), "k_regular"),
        (dict(name="erdos_renyi", n=5, p=0.0), "erdos_renyi"),
        (dict(name="erdos_renyi", n=30, p=0.001), "erdos_renyi"),
        (dict(name="small_world", n=5, k=1), "small_world"),
        (dict(name="explicit", n=4, edges=[(0, 1), (1, 4)]), "explicit"),
        (dict(name="explicit", n=4, edges=[(0, 1), (2, 3)]), "not connected"),
        (dict(name="explicit", n=3, edges=[(0, 0), (1, 2)]), "self loop"),
        (dict(name="explicit", n=3, edges=None), "explicit"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_topology(**kwargs, seed=0)


@pytest.mark.parametrize("name", sorted(set(TOPOLOGIES) - {"explicit"}))
def test_mixing_matrix_doubly_stochastic(name):
    graph = build_topology(name, 9, k=4, p=0.4, seed=5)
    w = mixing_matrix(graph)
    assert w.dtype == torch.float64
    assert torch.allclose(w, w.T)
    assert torch.allclose(w.sum(dim=1), torch.ones(9, dtype=torch.float64))
    assert bool((w >= 0).all())
    adjacency = torch.tensor(nx.to_numpy_array(graph, nodelist=range(9))) > 0
    off_diag = ~torch.eye(9, dtype=torch.bool)
    assert bool(((w > 0) & off_diag).eq(adjacency).all())


def test_mh_weights_formula_on_star():
    star = nx.star_graph(3)  # centre 0 with degree 3, leaves of degree 1
    w = metropolis_hastings_weights(star)
    assert w[0][1] == pytest.approx(1 / 4)
    assert w[1][0] == pytest.approx(1 / 4)
    assert w[1][1] == pytest.approx(3 / 4)
    assert w[0][0] == pytest.approx(1 - 3 / 4)


def test_node_weights_match_matrix():
    graph = build_topology("erdos_renyi", 8, p=0.5, seed=2)
    w = mixing_matrix(graph)
    for node in graph.nodes:
        ids, row = node_weights(graph, node)
        assert ids == sorted(graph.neighbors(node))
        assert row[0] == pytest.approx(float(w[node, node]))
        assert torch.allclose(row[1:], w[node, ids])
        assert float(row.sum()) == pytest.approx(1.0)


def test_mixing_matrix_gossip_reaches_average():
    graph = build_topology("ring", 6, seed=0)
    x = torch.arange(6, dtype=torch.float64)
    w = mixing_matrix(graph)
    for _ in range(300):
        x = w @ x
    assert torch.allclose(x, torch.full((6,), 2.5, dtype=torch.float64))
