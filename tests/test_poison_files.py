"""Saved Witches' Brew poison sets (attack.poisons): refused at load unless they fit the data and budget,
with one-line ConfigError / DataError messages, before any run folder exists."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedepic.attacks.gradient_matching import PoisonSet, check_poisons, load_poisons, save_poisons
from fedepic.config import load_config
from fedepic.data import load_dataset
from fedepic.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def data():
    return load_dataset(load_config(None, ["data.name=synthetic"]).data, 0)


def valid_set(data, shift: int = 8) -> PoisonSet:
    rows = (data.train_y == 2).nonzero().flatten()[:5]
    target = int((data.test_y == 1).nonzero()[0])
    images = (data.train_x[rows].int() + shift).clamp(0, 255).to(torch.uint8)
    return PoisonSet(indices=rows, poisoned_x=images, target_index=target, target_class=1, adversarial_class=2,
                     eps=8 / 255, loss=0.5, alignment=0.5)


def check(data, poisons, eps=8.0):
    return check_poisons(poisons, data.train_x, data.train_y, data.test_y, data.num_classes, eps)


def test_a_fitting_set_passes(data):
    poisons = valid_set(data)
    assert check(data, poisons) is poisons


@pytest.mark.parametrize("change, message", [
    (lambda p, d: dataclasses.replace(p, poisoned_x=(p.poisoned_x.int() + 1).clamp(0, 255).to(torch.uint8)), "eps"),
    (lambda p, d: dataclasses.replace(p, poisoned_x=torch.randint(0, 256, p.poisoned_x.shape, dtype=torch.uint8,
                                                                  generator=torch.Generator().manual_seed(0))), "eps"),
    (lambda p, d: dataclasses.replace(p, adversarial_class=99), "adversarial class 99"),
    (lambda p, d: dataclasses.replace(p, target_class=-1), "target class"),
    (lambda p, d: dataclasses.replace(p, indices=torch.cat([p.indices[:4], p.indices[:1]])), "repeat"),
    (lambda p, d: dataclasses.replace(p, indices=p.indices + len(d.train_y)), "outside"),
    (lambda p, d: dataclasses.replace(p, indices=(d.train_y == 3).nonzero().flatten()[:5]), "adversarial class 2"),
    (lambda p, d: dataclasses.replace(p, poisoned_x=p.poisoned_x[:, :, :20]), "do not match"),
    (lambda p, d: dataclasses.replace(p, poisoned_x=p.poisoned_x.float()), "do not match"),
    (lambda p, d: dataclasses.replace(p, indices=p.indices[:3]), "row indices"),
    (lambda p, d: dataclasses.replace(p, target_index=10 ** 7), "target index"),
    (lambda p, d: dataclasses.replace(p, eps=0.0), "eps"),
])
def test_sets_that_do_not_fit_are_refused(data, change, message):
    with pytest.raises(DataError, match=message) as err:
        check(data, change(valid_set(data), data))
    assert "\n" not in str(err.value) and str(err.value).startswith("attack.poisons: ")


def test_a_file_brewed_with_a_larger_eps_than_configured_is_a_config_error(data):
    with pytest.raises(ConfigError, match="attack.eps = 4"):
        check(data, valid_set(data), eps=4.0)


def test_file_errors_are_one_line_data_errors(data, tmp_path):
    path = tmp_path / "p.npz"
    save_poisons(valid_set(data), path)
    assert torch.equal(load_poisons(path).indices, valid_set(data).indices)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["adversarial_class"] = np.array(99, dtype=np.int64)  # edited without recomputing the checksum
    np.savez(tmp_path / "edited.npz", **arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    del arrays["indices"]
    np.savez(tmp_path / "short.npz", **arrays)
    for name, message in (("edited.npz", "checksum"), ("junk.npz", "not a readable"), ("short.npz", "lacks")):
        with pytest.raises(DataError, match=message) as err:
            load_poisons(tmp_path / name)
        assert "\n" not in str(err.value)


def test_a_bad_poison_file_stops_a_centralized_run_before_its_folder(data, tmp_path):
    from fedepic.centralized import run_centralized

    path = tmp_path / "p.npz"
    save_poisons(dataclasses.replace(valid_set(data), adversarial_class=99), path)  # checksum is valid
    out = tmp_path / "runs"
    cfg = load_config(None, ["mode=centralized", "data.name=synthetic", "attack.data=gradient_matching",
                             f"attack.poisons={path}", f"output_dir={out}"])
    with pytest.raises(DataError, match="adversarial class 99"):
        run_centralized(cfg)
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_poison_file_stops_a_federated_run_before_its_folder(data, tmp_path):
    from simulations.federated import run_federated

    path = tmp_path / "p.npz"
    save_poisons(dataclasses.replace(valid_set(data), adversarial_class=99), path)
    out = tmp_path / "runs"
    cfg = load_config(None, ["mode=federated", "data.name=synthetic", "attack.data=gradient_matching",
                             f"attack.poisons={path}", f"output_dir={out}", "strategies=[fedavg]"])
    with pytest.raises(DataError, match="adversarial class 99"):
        run_federated(cfg)  # refused before Ray starts or a folder is made
    assert not out.exists() or not any(out.iterdir())
