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
