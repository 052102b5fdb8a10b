"""ClippedGossip's dumbbell rows (fedepic/reproduce/dumbbell_rows.py) against a line-by-line list
transcription of the authors' two samplers (codes/sampler.py:121-165 and :237-304, written here
again in their own list style), on hand-made labels and on MNIST, and the file a run reads."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from fedepic.reproduce import dumbbell_rows as module
from fedepic.reproduce.dumbbell_rows import ROWS_PER_NODE, dumbbell_rows, iid_rows, noniid_rows


def mixed_sampler_iid(targets: torch.Tensor, num_replicas: int, rank: int) -> list[int]:
    """DecentralizedMixedSampler(noniid_percent=0).__iter__ with epoch 0, as a list program."""
    n = len(targets)
    num_samples = int(math.ceil(n * 1.0 / num_replicas))
    total_size = num_samples * num_replicas
    g = torch.Generator()
    g.manual_seed(0)
    all_indices = torch.randperm(n, generator=g).tolist()
    iid_count = int((1 - 0) * len(all_indices))
    iid_count = iid_count - (iid_count % num_replicas)
    iid_indices = all_indices[:iid_count]
    indices: list[int] = []
    indices += indices[: (total_size - iid_count - len(indices))]
    per_node = num_samples - iid_count // num_replicas
    indices = indices[rank * per_node:(rank + 1) * per_node]
    indices += iid_indices[rank:iid_count:num_replicas]
    assert len(indices) == num_samples
    g = torch.Generator()
    g.manual_seed(0)  # self.epoch, never set
    idx_idx = torch.randperm(len(indices), generator=g).tolist()
    return [indices[i] for i in idx_idx]


def dumbbell_sampler(targets: torch.Tensor, num_replicas: int, rank: int) -> list[int]:
    """DumbbellSampler(noniid_percent=1).__iter__ with epoch 0, as a list program."""
    nlabels = int(targets.max()) + 1
    g = torch.Generator()
    g.manual_seed(0)
    cliques = []
    for labels in (list(range(nlabels // 2)), list(range(nlabels // 2, nlabels))):
        pooled: list[int] = []
        for i in labels:
            pooled += torch.nonzero(targets == i).flatten().tolist()
        permuted = torch.randperm(len(pooled), generator=g).tolist()
        cliques.append([pooled[i] for i in permuted])
    min_size = min(len(c) for c in cliques)
    num_samples = min_size // (num_replicas // 2)
    min_size = num_samples * (num_replicas // 2)
    cliques = [c[:min_size] for c in cliques]
    exchanged = int((1 - 1) * min_size / 2)
    assert exchanged == 0
    for k in range(2):
        permuted = torch.randperm(len(cliques[k]), generator=g).tolist()
        cliques[k] = [cliques[k][i] for i in permuted]
    if rank < num_replicas // 2:
        indices = cliques[0][rank::num_replicas // 2]
    else:
        indices = cliques[1][rank - num_replicas // 2::num_replicas // 2]
    g = torch.Generator()
    g.manual_seed(0)
    idx_idx = torch.randperm(len(indices), generator=g).tolist()
    return [indices[i] for i in idx_idx]


def loader_rows(order: list[int], batch_size: int, batches: int) -> list[int]:
    """An unshuffled drop_last DataLoader's first ``batches`` batches over ``order``, concatenated."""
    out: list[int] = []
    for b in range(batches):
        batch = order[b * batch_size:(b + 1) * batch_size]
        if len(batch) < batch_size:
            break
        out += batch
    return out


def test_the_module_doctests_pass():
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_hand_made_labels_give_the_transcribed_samplers_rows():
    targets = torch.tensor([0, 1, 2, 3] * 10 + [0, 0, 3, 1, 2, 2])  # 46 rows, 4 labels
    for nodes in (2, 4):
        iid_targets = targets[:44]  # the IID sampler pads unless the rows split evenly
        got = [r.tolist() for r in iid_rows(iid_targets, nodes, rows_per_node=6)]
        assert got == [loader_rows(mixed_sampler_iid(iid_targets, nodes, r), 3, 2) for r in range(nodes)]
        got = [r.tolist() for r in noniid_rows(targets, nodes, rows_per_node=None)]
        assert got == [dumbbell_sampler(targets, nodes, r) for r in range(nodes)]
        for r, rows in enumerate(got):  # clique 1 holds labels 0-1, clique 2 labels 2-3
            assert set(targets[rows].tolist()) <= ({0, 1} if r < nodes // 2 else {2, 3})


@pytest.fixture(scope="module")
def mnist_targets(data_root) -> torch.Tensor:
    from fedepic.config import DataConfig
    from fedepic.data import load_dataset

    targets = load_dataset(DataConfig(name="mnist", root=str(data_root), download=False)).train_y
    assert targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # torchvision's order
    return targets


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_mnist_rows_are_the_first_960_of_the_authors_order(mnist_targets, split):
    arrays = dumbbell_rows(mnist_targets, split)
    sampler = mixed_sampler_iid if split == "iid" else dumbbell_sampler
    for rank in (0, 9, 10, 19):
        assert arrays[f"client_{rank}"].tolist() == loader_rows(sampler(mnist_targets, 20, rank), 32, 30), rank
    assert list(arrays) == [f"client_{k}" for k in range(20)]
    assert {len(a) for a in arrays.values()} == {ROWS_PER_NODE}
    everything = np.concatenate(list(arrays.values()))
    assert len(np.unique(everything)) == len(everything)  # no node shares a row
    if split == "noniid":
        labels = mnist_targets.numpy()
        assert all(labels[arrays[f"client_{k}"]].max() <= 4 for k in range(10))
        assert all(labels[arrays[f"client_{k}"]].min() >= 5 for k in range(10, 20))
        full = dumbbell_rows(mnist_targets, split, rows_per_node=None)
        assert {len(a) for a in full.values()} == {2940}  # 29,404 rows of labels 5-9 cut to 29,400


def test_the_written_file_is_a_valid_in_order_rows_partition(tmp_path, mnist_targets, data_root):
    """The CLI's file loads as data.partition=rows and, under train.sampler=in_order, node k's batch of
    round r is rows 32 (r - 1) .. 32 r - 1 of its array, as the authors' loader gives them."""
    from fedepic.client_data import build_client_data, client_partition
    from fedepic.config import load_config
    from fedepic.data import load_dataset
    from fedepic.peer_node import node_batch

    out = tmp_path / "dumbbell_noniid.npz"
    assert module.main(["--split", "noniid", "--out", str(out), "--data-root", str(data_root)]) == 0
    cfg = load_config("reproduce/dumbbell_clippedgossip", [
        "data.partition=rows", f"data.partition_file={out}", "train.sampler=in_order", "train.batches_per_epoch=30",
        f"data.root={data_root}", "sweep={}"])
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    saved = np.load(out)
    node = build_client_data(cfg, data, 12, parts)
    assert node.rows.tolist() == saved["client_12"].tolist()
    for round_, batch in ((1, 0), (2, 1), (31, 0), (900, 29)):
        _, labels = node_batch(node.x, node.y, cfg, round_, 12)
        assert labels.tolist() == data.train_y[saved["client_12"][32 * batch:32 * (batch + 1)]].tolist()
