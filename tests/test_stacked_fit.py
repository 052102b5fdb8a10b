"""fedepic.stacked_fit: many nodes' local epochs in one vectorized loop are the same training as
``fedepic.train.fit`` run node by node (same seeds, orders, short batches, keep masks, momentum)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fedepic.config import TrainConfig
from fedepic.models import build_classifier
from fedepic.stacked import parameter_layout, split_flat
from fedepic.stacked_fit import NodeRows, stacked_fit
from fedepic.train import fit


def flat_of(model: torch.nn.Module) -> torch.Tensor:
    state = model.state_dict()
    return torch.cat([state[name].reshape(-1) for name, _ in parameter_layout(model)])


def load_row(model: torch.nn.Module, row: torch.Tensor) -> torch.nn.Module:
    params = {k: v[0] for k, v in split_flat(row[None], parameter_layout(model)).items()}
    model.load_state_dict({**model.state_dict(), **params})
    return model


def nodes_of(sizes: list[int], generator: torch.Generator, side: int = 28) -> list[NodeRows]:
    nodes = []
    for k, size in enumerate(sizes):
        x = torch.randint(0, 256, (size, 1, side, side), dtype=torch.uint8, generator=generator)
        y = torch.randint(0, 10, (size,), generator=generator)
        keep = torch.ones(size, dtype=torch.bool)
        keep[torch.randperm(size, generator=generator)[: size // 7]] = False  # some rows dropped already
        nodes.append(NodeRows(x, y, keep, seed=1000 + k))
    return nodes


def drop_first_kept(k: int, epoch: int, params: object, nodes: list[NodeRows]) -> dict:
    """A stand-in for EPIC: after epoch 1, node k drops its first k kept rows."""
    if epoch == 1:
        kept = nodes[k].keep.nonzero().squeeze(1)[:k]
        nodes[k].keep[kept] = False
    return {"dropped": k if epoch == 1 else 0}


@pytest.mark.parametrize("name,augment,momentum", [("mlp", "none", 0.9), ("cnn", "crop_flip", 0.9), ("mlp", "none", 0.0)])
def test_stacked_fit_equals_fit_node_by_node(name: str, augment: str, momentum: float) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_classifier(name, 10, 1, 28, [0.13], [0.31])
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=momentum, weight_decay=5e-4, augment=augment, crop_pad=2)
    sizes = [40, 75, 16, 9, 120]  # short last batches, one node with one batch, one with one short batch
    nodes = nodes_of(sizes, generator)
    start = torch.stack([flat_of(model) + 0.01 * k for k in range(len(sizes))])  # different points per node

    loop_nodes = [dataclasses.replace(n, keep=n.keep.clone()) for n in nodes]
    expected, expected_losses = [], []
    for k, node in enumerate(loop_nodes):
        net = load_row(copy.deepcopy(model), start[k])
        history = fit(net, node.x, node.y, cfg, seed=node.seed, device=torch.device("cpu"), epochs=3, lr=0.05,
                      keep=node.keep, epoch_end=lambda epoch, _net, k=k: drop_first_kept(k, epoch, None, loop_nodes))
        expected.append(flat_of(net))
        expected_losses.append([h["loss"] for h in history])

    got, histories = stacked_fit(model, start, nodes, cfg, epochs=3, lr=0.05,
                                 epoch_end=lambda k, epoch, params: drop_first_kept(k, epoch, params, nodes))
    for k in range(len(sizes)):
        assert torch.equal(nodes[k].keep, loop_nodes[k].keep)
        assert [h["rows"] for h in histories[k]] == [int(loop_nodes[k].keep.sum()) + k] + [int(loop_nodes[k].keep.sum())] * 2
        assert [h["loss"] for h in histories[k]] == pytest.approx(expected_losses[k], rel=1e-4)
        assert histories[k][0]["dropped"] == k
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(got[0], start[0])


def test_a_node_without_rows_does_not_move() -> None:
    """A node whose rows are all dropped takes no step: no weight decay, no momentum, as in its own loop."""
    torch.manual_seed(0)
    model = build_classifier("mlp", 10, 1, 28, [0.13], [0.31])
    nodes = nodes_of([30, 30], torch.Generator().manual_seed(1))
    nodes[1].keep[:] = False
    start = torch.stack([flat_of(model)] * 2)
    got, histories = stacked_fit(model, start, nodes, TrainConfig(batch_size=8, weight_decay=0.1), epochs=2, lr=0.1)
    assert torch.equal(got[1], start[1]) and not torch.equal(got[0], start[0])
    assert [h["rows"] for h in histories[1]] == [0, 0]
