"""Decoded-image cache (part 5): checksummed, never unpickled, keyed by the files and not by the seed."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedepic.config import DataConfig
from fedepic.data import load_dataset


@pytest.fixture()
def tree(tmp_path, data_root) -> Path:
    """images/tiny/{train,test}/{a,b}/: three real CIFAR JPEGs per class."""
    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls, src_cls in (("a", "airplane"), ("b", "bird")):
            for src in sorted((data_root / "cifar10-jpeg" / split / src_cls).iterdir())[:3]:
                dst = root / "tiny" / split / cls / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    return root


@pytest.fixture()
def cfg(tree, tmp_path) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(tree), folder="tiny", cache_dir=str(tmp_path / "cache"))


def _cache_files(cfg: DataConfig) -> list[Path]:
    return sorted(Path(cfg.cache_dir).glob("*.npz"))


def test_cache_is_npz_with_matching_sha256(cfg):
    load_dataset(cfg)
    (npz,) = _cache_files(cfg)
    digest = (npz.parent / (npz.name + ".sha256")).read_text().strip()
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == digest
    with np.load(npz, allow_pickle=False) as blob:  # loads without pickle
        assert blob["train_x"].dtype == np.uint8 and list(blob["classes"]) == ["a", "b"]


def test_corrupt_cache_is_reported_once_and_rebuilt(cfg, capsys):
    first = load_dataset(cfg)
    (npz,) = _cache_files(cfg)
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    capsys.readouterr()
    again = load_dataset(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and npz.name in err[0] and "checksum" in err[0]
    assert torch.equal(first.train_x, again.train_x)
    load_dataset(cfg)  # rebuilt: the next run is silent
    assert capsys.readouterr().err == ""


def test_cache_without_checksum_is_rebuilt(cfg, capsys):
    load_dataset(cfg)
    (npz,) = _cache_files(cfg)
    (npz.parent / (npz.name + ".sha256")).unlink()
    load_dataset(cfg)
    assert "no checksum" in capsys.readouterr().err
    assert (npz.parent / (npz.name + ".sha256")).is_file()


def test_pickled_cache_is_refused_even_with_a_valid_checksum(cfg, capsys):
    load_dataset(cfg)
    (npz,) = _cache_files(cfg)
    buf = io.BytesIO()
    np.savez(buf, train_x=np.zeros((1, 1, 2, 2), np.uint8), train_y=np.array([0]), test_x=np.zeros((1, 1, 2, 2),
             np.uint8), test_y=np.array([0]), classes=np.array([{"evil": 1}], dtype=object))
    npz.write_bytes(buf.getvalue())
    (npz.parent / (npz.name + ".sha256")).write_text(hashlib.sha256(buf.getvalue()).hexdigest())
    data = load_dataset(cfg)
    assert "unreadable" in capsys.readouterr().err
    assert data.class_names == ["a", "b"] and len(data.train_y) == 6


def test_editing_the_folder_changes_the_key(cfg, tree):
    before = load_dataset(cfg)
    extra = tree / "tiny" / "train" / "b" / "zzzz.jpg"
    extra.write_bytes(next((tree / "tiny" / "train" / "a").iterdir()).read_bytes())
    after = load_dataset(cfg)
    assert len(after.train_y) == len(before.train_y) + 1
    assert len(_cache_files(cfg)) == 2
    stamp = extra.stat().st_mtime_ns
    os.utime(extra, ns=(stamp, stamp + 10**9))  # same size, new mtime: a re-export over the old file
    load_dataset(cfg)
    assert len(_cache_files(cfg)) == 3


def test_seed_is_not_in_the_cache_key(cfg):
    from dataclasses import replace

    small = replace(cfg, train_per_class=1)
    a, b = load_dataset(small, seed=0), load_dataset(small, seed=1)
    assert len(_cache_files(cfg)) == 1
    assert len(a.train_y) == len(b.train_y) == 2
    picks = {load_dataset(small, seed=s).train_x[0].sum().item() for s in range(6)}
    assert len(picks) > 1  # subsampling still follows the seed, after the cache
