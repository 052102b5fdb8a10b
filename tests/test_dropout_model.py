"""mnist_net (the ClippedGossip / bucketing codes' MNIST Net) and seeded dropout (fedepic/dropout.py) on
every training path: fit, the vectorized per-node gradients (vmap and the grouped kernel), the vectorized
local epochs, and short decentralized and server runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedepic import stacked
from fedepic.config import TrainConfig, load_config
from fedepic.dropout import MaskedDropout, draw_masks, mask_seed
from fedepic.models import ImageClassifier, build_classifier
from fedepic.stacked import parameter_layout, split_flat, stacked_gradients
from fedepic.stacked_fit import NodeRows, stacked_fit
from fedepic.train import fit

MEAN, STD = [0.13], [0.31]


def mnist_net() -> ImageClassifier:
    torch.manual_seed(0)
    return build_classifier("mnist_net", 10, 1, 28, MEAN, STD)


def flat_of(model: nn.Module) -> torch.Tensor:
    state = model.state_dict()
    return torch.cat([state[name].reshape(-1) for name, _ in parameter_layout(model)])


def load_row(model: nn.Module, row: torch.Tensor) -> nn.Module:
    params = {k: v[0] for k, v in split_flat(row[None], parameter_layout(model)).items()}
    model.load_state_dict({**model.state_dict(), **params})
    return model


def batches(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, size, 1, 28, 28, generator=generator),
            torch.randint(0, 10, (n, size), generator=generator))


def eager_gradient(model: nn.Module, row: torch.Tensor, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """One node's gradient by ordinary autograd on the module, masks from a generator seeded ``seed``."""
    net = load_row(copy.deepcopy(model), row).train()
    masks = draw_masks(net, len(y), torch.Generator().manual_seed(seed))
    F.cross_entropy(functional_call(net, masks, (x,)), y).backward()
    params = dict(net.named_parameters())
    return torch.cat([params[name].grad.reshape(-1) for name, _ in parameter_layout(net)])


def vmap_only(model, flat, xb, yb, seeds):
    """stacked_gradients with the grouped kernel switched off (the vmap path at a shared point)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked, "grouped_gradients", lambda *args: None)
        return stacked_gradients(model, flat, xb, yb, mask_seeds=seeds)


def test_mnist_net_shape_parameters_and_exchanged_state():
    model = mnist_net()
    assert sum(p.numel() for p in model.parameters()) == 1_199_882  # 320 + 18,496 + 1,179,776 + 1,290
    assert model.eval()(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert [m.p for m in model.modules() if isinstance(m, MaskedDropout)] == [0.25, 0.5]
    assert not any("mask" in name for name in model.state_dict())  # the masks are never exchanged


def test_dropout_acts_in_training_and_not_in_evaluation():
    model = mnist_net()
    x = torch.rand(16, 1, 28, 28)
    masks = draw_masks(model, 16, torch.Generator().manual_seed(3))
    channel = masks["body.4.mask"]
    assert channel.shape == (16, 64, 1, 1) and set(channel.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # whole channels
    assert masks["body.8.mask"].shape == (16, 128) and set(masks["body.8.mask"].unique().tolist()) == {0.0, 2.0}
    evaluated = model.eval()(x)
    model.train()
    trained = functional_call(model, masks, (x,))
    ones = functional_call(model, {k: torch.ones_like(v) for k, v in masks.items()}, (x,))
    assert not torch.allclose(trained, evaluated)
    torch.testing.assert_close(ones, evaluated)  # evaluation is the network without dropout
    with pytest.raises(RuntimeError, match="needs its mask"):  # training without masks is never silent
        model(x)


def test_fit_draws_its_masks_from_its_seed():
    """fit trains with dropout (against the same stream with p = 0) and the same seed gives the same model."""
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9)

    def trained(seed: int, p: float = None) -> torch.Tensor:
        net = mnist_net()
        if p is not None:
            for m in net.modules():
                if isinstance(m, MaskedDropout):
                    m.p = p
        fit(net, x, y, cfg, seed=seed, device=torch.device("cpu"), epochs=1)
        return flat_of(net)

    first = trained(7)
    assert torch.equal(first, trained(7))
    assert not torch.equal(first, trained(8))
    assert not torch.allclose(first, trained(7, p=0.0))  # same orders, no dropout: another model


def test_same_seeds_same_gradients_other_seeds_other_gradients():
    model = mnist_net()
    start = flat_of(model)
    points = torch.stack([start + 0.01 * k for k in range(3)])
    xb, yb = batches(3, 8)
    first = stacked_gradients(model, points, xb, yb, mask_seeds=[11, 12, 13])
    assert torch.equal(first, stacked_gradients(model, points, xb, yb, mask_seeds=[11, 12, 13]))
    other = stacked_gradients(model, points, xb, yb, mask_seeds=[11, 12, 99])
    assert torch.equal(first[:2], other[:2]) and not torch.allclose(first[2], other[2])
    alone = stacked_gradients(model, points[1:2], xb[1:2], yb[1:2], mask_seeds=[12])  # as a Ray node computes it
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dropout seed per row"):
        stacked_gradients(model, points, xb, yb)
    assert mask_seed(0, 1, 2) != mask_seed(0, 1, 3) and mask_seed(0, 1, 2) == mask_seed(0, 1, 2)


@pytest.mark.parametrize("path", ["vmap", "shared_grouped", "shared_vmap"])
def test_vectorized_gradient_equals_the_eager_gradient_with_the_same_masks(path):
    model = mnist_net()
    start = flat_of(model)
    seeds = [21, 22, 23]
    xb, yb = batches(3, 8, seed=4)
    if path == "vmap":  # every node at its own point
        points = torch.stack([start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(k))
                              for k in range(3)])
        got = stacked_gradients(model, points, xb, yb, mask_seeds=seeds)
    else:  # one shared point (the server's per-step round): the grouped kernel, or vmap with it off
        points = start.expand(3, -1)
        got = (stacked_gradients(model, start, xb, yb, mask_seeds=seeds) if path == "shared_grouped"
               else vmap_only(model, start, xb, yb, seeds))
    for k in range(3):
        want = eager_gradient(model, points[k], xb[k], yb[k], seeds[k])
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-6)


def test_vectorized_local_epochs_with_dropout_equal_fit_node_by_node():
    """stacked_fit draws each node's masks from its own generator in fit's order (an MLP with dropout:
    the cnn-like mnist_net trains node by node, ``LocalMember.vectorized_training``)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), MaskedDropout(0.5, (32,)))
    model = ImageClassifier(body, 32, 10, MEAN, STD)
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    nodes = []
    for k, size in enumerate([40, 9, 33]):  # short last batches
        x = torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8, generator=generator)
        nodes.append(NodeRows(x, torch.randint(0, 10, (size,), generator=generator),
                              torch.ones(size, dtype=torch.bool), seed=100 + k))
    start = torch.stack([flat_of(model) + 0.01 * k for k in range(3)])
    got, _ = stacked_fit(model, start, nodes, cfg, epochs=2, lr=0.05)
    for k, node in enumerate(nodes):
        net = load_row(copy.deepcopy(model), start[k])
        fit(net, node.x, node.y, cfg, seed=node.seed, device=torch.device("cpu"), epochs=2, lr=0.05)
        torch.testing.assert_close(got[k], flat_of(net), rtol=1e-4, atol=1e-5)


def small_mnist(*extra: str):
    return load_config("dfl_smoke", ["engine=local", "data.name=mnist", "data.download=false",
                                     "data.train_per_class=6", "data.test_per_class=2", "model.name=mnist_net",
                                     "clients.count=3", "topology.name=complete", "strategies=[gossip]", "rounds=2",
                                     *extra])


def records_without_time(records: list[dict]) -> str:
    """The records without their timings, as text (NaN equals NaN there)."""
    return repr([{k: v for k, v in r.items() if "second" not in k} for r in records])


@pytest.mark.parametrize("extra", [
    [],                                                                     # dpsgd: fit, node by node
    ["decentralized.algorithm=dsgd", "train.client_momentum=0.9"],          # dsgd: the stacked rows
    ["decentralized.algorithm=dsgt"],                                       # dsgt: its all-nodes form
])
def test_a_short_decentralized_run_with_mnist_net_is_deterministic(extra):
    from fedepic.peer_local import run_sequential

    cfg = small_mnist(*extra)
    first = run_sequential(cfg, "gossip")
    assert len(first) == 2 and 0.0 <= first[-1]["mean_accuracy"] <= 1.0
    assert records_without_time(first) == records_without_time(run_sequential(cfg, "gossip"))


def test_dsgd_node_step_equals_the_stacked_rows():
    """The per-node dsgd step (what a Ray node runs) draws the same masks as the stacked in-process rows:
    the dropout seed is (seed, round, node, draw) whichever rows share the call."""
    from fedepic.peer_node import dropout_seeds, dsgt_gradients, node_batch

    cfg = small_mnist("decentralized.algorithm=dsgd", "train.batch_size=8")
    model = mnist_net()
    x = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 10, (60,), generator=torch.Generator().manual_seed(6))
    points = torch.stack([flat_of(model) + 0.01 * k for k in range(3)])
    batches_ = [node_batch(x[20 * k:20 * k + 20], y[20 * k:20 * k + 20], cfg, 1, k) for k in range(3)]
    together = dsgt_gradients(model, points, batches_, cfg, dropout_seeds(cfg, model, 1, [0, 1, 2]))
    for k in range(3):
        alone = dsgt_gradients(model, points[k:k + 1], [batches_[k]], cfg, dropout_seeds(cfg, model, 1, [k]))
        torch.testing.assert_close(alone[0], together[k], rtol=1e-5, atol=1e-6)
    assert dropout_seeds(cfg, build_classifier("cnn_mnist", 10, 1, 28, MEAN, STD), 1, [0]) is None
