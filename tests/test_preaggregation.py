"""Pre-aggregation (strategies/preaggregation.py): NNM and static clipping against their formulas, and
as a step before a peer rule."""

import doctest

import pytest
import torch

import strategies.preaggregation as pre
from fedepic.config import ConfigError, load_config
from fedepic.peer_node import NodeState, aggregate_vectors, peer_rule
from strategies.gossip import Gossip
from strategies.aggregate import aggregate
from strategies.median import MedianRule


def nnm_by_hand(x: torch.Tensor, f: int) -> torch.Tensor:
    """y_i = mean of the n - f rows closest to x_i (itself included), one row at a time."""
    n = x.shape[0]
    out = []
    for i in range(n):
        d = [(float((x[j] - x[i]).norm()), j) for j in range(n)]
        chosen = [j for _, j in sorted(d)[: n - f]]
        out.append(x[chosen].mean(dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("n,f", [(1, 0), (5, 0), (5, 1), (7, 3), (12, 2)])
def test_nnm_is_the_mean_of_the_n_minus_f_nearest(n, f):
    x = torch.randn(n, 9, generator=torch.Generator().manual_seed(n * 10 + f))
    assert torch.allclose(pre.nearest_neighbor_mixing(x, f), nnm_by_hand(x, f), atol=1e-6)
    with pytest.raises(ValueError, match="nnm"):
        pre.nearest_neighbor_mixing(x, n)


@pytest.mark.parametrize("n,f,dtype,transposed", [(12, 2, torch.float32, False), (12, 2, torch.float32, True),
                                                   (6, 5, torch.float32, False), (9, 3, torch.float16, False)])
def test_nnm_row_by_row_equals_the_gathered_mean_bit_for_bit(n, f, dtype, transposed):
    """NNM averages each row's neighbours one row at a time (cheaper than gathering all of them): the
    result is the gathered vectors[nearest].mean(dim=1) exactly on the CPU, on a long vector as at a
    server, for a strided input, a single neighbour (n - f = 1) and half precision too."""
    x = (torch.randn(n, 100_003, generator=torch.Generator().manual_seed(n + f)) * 1e-2).to(dtype)
    if transposed:
        x = x.T.contiguous().T  # the same values, column-major
    wide = x.double()
    nearest = torch.sort(torch.cdist(wide, wide), dim=1, stable=True).indices[:, : n - f]
    assert torch.equal(pre.nearest_neighbor_mixing(x, f), x[nearest].mean(dim=1))


def test_static_clip_is_the_formula():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.1], [1], [3], [10], [0.5], [2]])
    c = 1.5
    want = torch.stack([v * min(1.0, c / float(v.norm())) for v in x])
    assert torch.allclose(pre.static_clip(x, c), want, atol=1e-6)
    assert torch.equal(pre.static_clip(torch.zeros(2, 3), 1.0), torch.zeros(2, 3))  # a zero row stays zero
    with pytest.raises(ValueError):
        pre.static_clip(x, 0.0)


def test_module_examples():
    assert doctest.testmod(pre).failed == 0


def test_pre_aggregation_runs_before_the_peer_rule_of_a_benign_node_only():
    cfg = load_config("dfl_smoke", ["strategies=[median]", "defense.pre_aggregation=[nnm,clip]",
                                    "defense.clip_radius=2.0", "defense.byzantine=1"])
    gen = torch.Generator().manual_seed(3)
    own, neigh = torch.randn(8, generator=gen), torch.randn(4, 8, generator=gen) * 3
    stack = pre.static_clip(pre.nearest_neighbor_mixing(torch.cat([own[None], neigh]), 1), 2.0)
    want = aggregate(MedianRule(), stack, 0).vector
    rule = peer_rule("median", cfg)
    got = aggregate(rule, torch.cat([own[None], neigh]), 0).vector
    assert isinstance(rule, pre.PreAggregated) and torch.allclose(got, want, atol=1e-6)
    got, _ = aggregate_vectors("median", cfg, own, neigh, [1, 2, 3, 4], None, NodeState("m"))
    assert torch.allclose(got, want, atol=1e-6)
    honest, _ = aggregate_vectors("median", cfg, own, neigh, [1, 2, 3, 4], None, NodeState("m"), malicious=True)
    plain = aggregate(Gossip(), torch.cat([own[None], neigh]), 0).vector
    assert torch.allclose(honest, plain, atol=1e-6)  # a malicious node gossips, undefended


@pytest.mark.parametrize("overrides,key", [
    (["defense.pre_aggregation=[nnm,bogus]"], r"defense\.pre_aggregation\[1\]"),
    (["strategies=[gp]", "defense.pre_aggregation=[nnm]"], r"strategies\[0\]"),
])
def test_bad_pre_aggregation_names_its_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config("dfl_smoke", overrides)
    with pytest.raises(ConfigError, match=r"defense\.pre_aggregation"):
        load_config("centralized_mnist", ["defense.pre_aggregation=[clip]"])


def test_server_side_steps_act_on_the_finite_clients_updates():
    from fedepic.extensions import pre_aggregation_steps
    from fedepic.server_rounds import pre_aggregate_updates

    cfg = load_config("server_noniid", ["defense.pre_aggregation=[nnm,clip]", "defense.clip_radius=0.5",
                                        "defense.byzantine=3"])
    gen = torch.Generator().manual_seed(4)
    reference = torch.randn(6, generator=gen)
    models = reference + torch.randn(4, 6, generator=gen)
    models[2, 1] = float("nan")
    given = models - reference
    out = pre_aggregate_updates(given, pre_aggregation_steps(cfg))
    finite = [0, 1, 3]
    # NNM's f = 3 is capped at the rows it gets (the three finite updates) minus one
    updates = pre.static_clip(nnm_by_hand(given[finite], 2), 0.5)
    assert torch.isnan(out[2, 1]) and torch.equal(out[2, 0], given[2, 0])  # a NaN reply is left as it was
    assert torch.allclose(out[finite], updates, atol=1e-6)


def test_a_federated_round_aggregates_the_pre_aggregated_updates(tmp_path, task_identity):
    """In process (engine=local): clipping every update to 1e-6 leaves the global
    model where it started, so both rounds score what round 1 scores without any training signal."""
    import json

    from test_resume import serve_locally

    def run(out, *extra):
        cfg = load_config(None, [
            "mode=federated", "name=p", f"output_dir={out}", "progress=false", "data.name=synthetic",
            "data.synthetic_train=200", "data.synthetic_test=100", "clients.count=3", "rounds=2",
            "train.batch_size=32", "train.threads=1", "strategies=[fedavg]", *extra])
        folder = serve_locally(cfg)
        return [json.loads(x) for x in (folder / "fedavg" / "metrics.jsonl").read_text().splitlines()]

    clipped = run(tmp_path / "clip", "defense.pre_aggregation=[clip]", "defense.clip_radius=1e-6")
    free = run(tmp_path / "free")
    accuracy = [r["accuracy"] for r in clipped if "accuracy" in r]
    assert len(accuracy) == 2 and accuracy[0] == accuracy[1]  # the global model did not move
    assert [r["accuracy"] for r in free if "accuracy" in r] != accuracy
