"""Partitions are disjoint, complete and reproducible, on the real MNIST labels."""

from __future__ import annotations

import numpy as np
import pytest

from fedepic.config import DataConfig, LabelGroup
from fedepic.data import load_dataset
from fedepic.partition import label_histograms, partition


@pytest.fixture(scope="module")
def mnist_labels(data_root) -> np.ndarray:
    return load_dataset(DataConfig(name="mnist", root=str(data_root), download=False)).train_y.numpy()


SCHEMES = [
    DataConfig(partition="iid"),
    DataConfig(partition="dirichlet", alpha=0.5),
    DataConfig(partition="dirichlet", alpha=0.05, min_per_client=1),
    DataConfig(partition="shards", shards_per_client=2),
    DataConfig(partition="label_sets", label_sets=[
        LabelGroup(clients=list(range(16)), labels=[0, 1, 2, 3, 4, 5]),
        LabelGroup(clients=[16, 17], labels=[6, 9]), LabelGroup(clients=[18, 19], labels=[7, 8])]),
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: f"{c.partition}-{c.alpha}")
def test_disjoint_complete_reproducible(mnist_labels, cfg):
    parts = partition(mnist_labels, 20, cfg, seed=3)
    allrows = np.concatenate(parts)
    assert len(allrows) == len(mnist_labels), "complete"
    assert len(np.unique(allrows)) == len(allrows), "disjoint"
    again = partition(mnist_labels, 20, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again)), "reproducible"
    other = partition(mnist_labels, 20, cfg, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other)), "seed matters"


def test_label_sets_hold_exactly_their_labels(mnist_labels):
    parts = partition(mnist_labels, 20, SCHEMES[-1], seed=0)
    hist = np.array(label_histograms(mnist_labels, parts, 10))
    assert set(np.flatnonzero(hist[:16].sum(0))) == {0, 1, 2, 3, 4, 5}
    assert set(np.flatnonzero(hist[16])) == {6, 9} and set(np.flatnonzero(hist[18])) == {7, 8}
    assert hist.sum() == len(mnist_labels)


def test_dirichlet_small_alpha_is_skewed_iid_is_not(mnist_labels):
    skewed = np.array(label_histograms(mnist_labels, partition(mnist_labels, 10, SCHEMES[2], 0), 10))
    flat = np.array(label_histograms(mnist_labels, partition(mnist_labels, 10, SCHEMES[0], 0), 10))
    share = lambda h: (h.max(1) / h.sum(1)).mean()  # noqa: E731
    assert share(skewed) > 0.5 > 0.15 > share(flat)


def test_shards_give_few_labels_per_client(mnist_labels):
    hist = np.array(label_histograms(mnist_labels, partition(mnist_labels, 20, SCHEMES[3], 0), 10))
    assert (np.count_nonzero(hist, axis=1) <= 4).all()


def test_label_sets_reject_orphan_labels(mnist_labels):
    cfg = DataConfig(partition="label_sets", label_sets=[LabelGroup(clients=[0, 1], labels=[0, 1])])
    with pytest.raises(ValueError, match="held by no client"):
        partition(mnist_labels, 2, cfg, seed=0)


def test_saved_rows_are_read_as_they_are(tmp_path, mnist_labels):
    """partition=rows: a split made elsewhere (another framework's, e.g. ByzFL's) is taken as saved;
    clients may be empty and rows may belong to nobody."""
    path = tmp_path / "split.npz"
    np.savez(path, client_0=np.array([5, 1, 3]), client_1=np.array([], dtype=np.int64), client_2=np.array([59_999]))
    parts = partition(mnist_labels, 3, DataConfig(partition="rows", partition_file=str(path)), seed=0)
    assert [p.tolist() for p in parts] == [[1, 3, 5], [], [59_999]]


@pytest.mark.parametrize("arrays, message", [
    ({"client_0": [1, 2]}, "expected the arrays client_0 .. client_1"),
    ({"client_0": [1, 2], "client_1": [2]}, "client_1 repeats a row"),
    ({"client_0": [1.5], "client_1": [2]}, "integer row indices"),
    ({"client_0": [-1], "client_1": [2]}, "negative row index"),
])
def test_a_bad_saved_split_is_one_line_naming_the_key(tmp_path, arrays, message):
    from fedepic.config import load_config
    from fedepic.errors import ConfigError

    path = tmp_path / "split.npz"
    np.savez(path, **{k: np.array(v) for k, v in arrays.items()})
    with pytest.raises(ConfigError, match=f"'data.partition_file'.*{message}"):
        load_config(None, ["data.partition=rows", f"data.partition_file={path}", "clients.count=2"])
    with pytest.raises(ConfigError, match="'data.partition_file'.*cannot read"):
        load_config(None, ["data.partition=rows", f"data.partition_file={tmp_path / 'none.npz'}", "clients.count=2"])


def test_saved_rows_beyond_the_dataset_are_refused(tmp_path, mnist_labels):
    from fedepic.errors import ConfigError

    path = tmp_path / "split.npz"
    np.savez(path, client_0=np.array([60_000]))
    with pytest.raises(ConfigError, match="row 60000 is beyond the 60000 training rows"):
        partition(mnist_labels, 1, DataConfig(partition="rows", partition_file=str(path)), seed=0)


def test_saved_rows_index_the_full_training_set(tmp_path):
    from fedepic.config import load_config
    from fedepic.errors import ConfigError

    path = tmp_path / "split.npz"
    np.savez(path, client_0=np.array([1]), client_1=np.array([2]))
    with pytest.raises(ConfigError, match="'data.train_per_class'.*full training set"):
        load_config(None, ["data.partition=rows", f"data.partition_file={path}", "clients.count=2",
                           "data.train_per_class=10"])


def test_rows_shared_between_clients_need_shared_rows(tmp_path, mnist_labels):
    """data.shared_rows=true: a row may belong to several clients (the Byzantine workers of Karimireddy
    et al.'s bucketing experiments hold IID rows that honest workers hold too); without it the overlap
    is refused with one line, and a row twice in one client is refused either way."""
    from fedepic.config import load_config
    from fedepic.errors import ConfigError

    path = tmp_path / "shared.npz"
    np.savez(path, client_0=np.array([7, 3, 5]), client_1=np.array([5, 9]), client_2=np.array([3, 5, 7]))
    args = ["data.partition=rows", f"data.partition_file={path}", "clients.count=3"]
    with pytest.raises(ConfigError, match="'data.partition_file'.*client_1 repeats a row of another client.*"
                                          "data.shared_rows=true"):
        load_config(None, args)
    cfg = load_config(None, [*args, "data.shared_rows=true"])
    parts = partition(mnist_labels, 3, cfg.data, seed=0)
    assert [p.tolist() for p in parts] == [[3, 5, 7], [5, 9], [3, 5, 7]]
    hist = np.array(label_histograms(mnist_labels, parts, 10))
    assert hist.sum() == 8  # a shared row counts once per client that holds it
    twice = tmp_path / "twice.npz"
    np.savez(twice, client_0=np.array([4, 4]), client_1=np.array([1]))
    with pytest.raises(ConfigError, match="client_0 repeats a row \\(a client holds each row once\\)"):
        load_config(None, ["data.partition=rows", f"data.partition_file={twice}", "clients.count=2",
                           "data.shared_rows=true"])
    with pytest.raises(ConfigError, match="'data.shared_rows'.*only under data.partition=rows"):
        load_config(None, ["data.shared_rows=true"])


def test_a_shared_row_is_each_clients_own_copy(tmp_path, data_root):
    """A malicious client's label flip changes its copy of a shared row, not the honest client's."""
    from fedepic.client_data import build_client_data, client_partition
    from fedepic.config import load_config

    path = tmp_path / "shared.npz"
    data = load_dataset(DataConfig(name="mnist", root=str(data_root), download=False))
    sixes = np.flatnonzero(data.train_y.numpy() == 6)[:4]
    np.savez(path, client_0=sixes, client_1=sixes[::-1].copy())
    cfg = load_config(None, ["data.partition=rows", f"data.partition_file={path}", "clients.count=2",
                             "data.shared_rows=true", "clients.malicious_ids=[0]", "attack.data=label_flip",
                             "attack.flip=map", "attack.flip_map=[[6,9]]", f"data.root={data_root}"])
    parts = client_partition(cfg, data)
    bad, good = (build_client_data(cfg, data, k, parts) for k in (0, 1))
    assert bad.y.tolist() == [9, 9, 9, 9] and good.y.tolist() == [6, 6, 6, 6]
    assert np.array_equal(bad.rows, good.rows) and bool(bad.poisoned.all()) and not good.poisoned.any()


def test_the_in_order_sampler_reads_a_rows_file_in_its_order(tmp_path, data_root):
    """train.sampler=in_order reads the rows in their stored order: the file's, not ascending (the
    replacement sampler keeps the ascending order it always had, so its draws are unchanged)."""
    from fedepic.client_data import client_partition
    from fedepic.config import load_config

    path = tmp_path / "ordered.npz"
    np.savez(path, client_0=np.array([50, 10, 30]), client_1=np.array([20, 40]))
    data = load_dataset(DataConfig(name="mnist", root=str(data_root), download=False))
    base = ["data.partition=rows", f"data.partition_file={path}", "clients.count=2", "mode=decentralized",
            "decentralized.algorithm=dsgd", "model.name=mlp", "strategies=[gossip]",
            f"data.root={data_root}"]
    in_order = client_partition(load_config(None, [*base, "train.sampler=in_order"]), data)
    assert [p.tolist() for p in in_order] == [[50, 10, 30], [20, 40]]
    assert [p.tolist() for p in client_partition(load_config(None, base), data)] == [[10, 30, 50], [20, 40]]
