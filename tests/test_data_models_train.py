"""Datasets from ../shared/data, the models' interface, augmentation, and the training loop on real MNIST."""

from __future__ import annotations

import time

import pytest
import torch

from fedepic.augment import random_crop_flip
from fedepic.config import DataConfig, TrainConfig
from fedepic.data import DataError, ImageData, load_dataset
from fedepic.models import build_classifier, model_for_data
from fedepic.train import ema_momentum_, evaluate, fit


def test_mnist_loads_exactly_and_caches(data_root):
    cfg = DataConfig(name="mnist", root=str(data_root), download=False)
    data = load_dataset(cfg)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10000, 1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.train_y).tolist()[:2] == [5923, 6742]  # the official MNIST class counts
    started = time.perf_counter()
    again = load_dataset(cfg)
    assert time.perf_counter() - started < 3.0
    assert torch.equal(again.train_x, data.train_x)


def test_imagefolder_reads_cifar_jpeg_copy_with_class_subset(data_root):
    cfg = DataConfig(name="imagefolder", root=str(data_root), classes=[3, 5], train_per_class=50, test_per_class=20)
    data = load_dataset(cfg, seed=1)
    assert data.train_x.shape == (100, 3, 32, 32) and data.class_names == ["cat", "dog"]
    assert torch.bincount(data.test_y).tolist() == [20, 20]


def test_missing_imagefolder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="expected .*train"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))


@pytest.mark.parametrize("name,channels,size", [("cnn", 1, 28), ("mlp", 1, 28), ("resnet18", 3, 32), ("cnn", 3, 32)])
def test_models_expose_features_and_classifier(name, channels, size):
    model = build_classifier(name, 10, channels, size, (0.5,) * channels, (0.25,) * channels).eval()
    x = torch.rand(3, channels, size, size)
    feats = model.features(x)
    assert feats.shape[0] == 3 and model.classifier.in_features == feats.shape[1]
    assert torch.allclose(model(x), model.classifier(feats), atol=1e-6)


def test_resnet18_has_cifar_stem():
    model = build_classifier("resnet18", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    assert model.body.conv1.kernel_size == (3, 3) and model.body.conv1.stride == (1, 1)
    assert isinstance(model.body.maxpool, torch.nn.Identity)


def test_crop_flip_keeps_shape_and_content_and_is_seeded():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    a = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    nonzero = a[a > 0]
    assert set(nonzero.tolist()) <= set(x.flatten().tolist())  # only original pixels or zero padding
    assert torch.equal(random_crop_flip(x, 0, None, flip=False), x)


def test_small_cnn_reaches_97_percent_on_mnist_in_one_epoch_on_cpu(data_root):
    data = load_dataset(DataConfig(name="mnist", root=str(data_root), download=False))
    torch.manual_seed(0)
    model = build_classifier("cnn", 10, 1, 28, data.mean, data.std)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, device="cpu")
    history = fit(model, data.train_x, data.train_y, cfg, seed=0)
    result = evaluate(model, data.test_x, data.test_y)
    assert len(history) == 1 and history[0]["rows"] == 60000
    assert result["accuracy"] >= 0.97, result["accuracy"]
    assert min(result["per_class"]) > 0.9


def test_keep_mask_limits_training_rows():
    torch.manual_seed(0)
    x = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    y = torch.arange(64) % 10
    keep = torch.zeros(64, dtype=torch.bool)
    keep[:20] = True

    def shrink(epoch, model):
        keep[:10] = False
        return {"dropped": 10}

    model = build_classifier("mlp", 10, 1, 28, (0.5,), (0.25,))
    hist = fit(model, x, y, TrainConfig(epochs=2, batch_size=8, device="cpu"), seed=0, keep=keep, epoch_end=shrink)
    assert [h["rows"] for h in hist] == [20, 10] and hist[0]["dropped"] == 10


def test_same_seed_same_training():
    x = (torch.rand(128, 1, 28, 28) * 255).to(torch.uint8)
    y = torch.arange(128) % 10

    def run() -> torch.Tensor:
        torch.manual_seed(1)
        model = build_classifier("cnn", 10, 1, 28, (0.5,), (0.25,))
        fit(model, x, y, TrainConfig(epochs=1, batch_size=16, augment="crop_flip", device="cpu"), seed=5)
        return torch.nn.utils.parameters_to_vector(model.parameters())

    assert torch.equal(run(), run())


def test_model_for_data_follows_the_data_and_the_seed():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    data = ImageData(images, torch.zeros(4, dtype=torch.long), images, torch.zeros(4, dtype=torch.long), 7,
                     [str(c) for c in range(7)], (0.5,) * 3, (0.25,) * 3)
    before = torch.random.get_rng_state()
    a, b = model_for_data("cnn", data, seed=3), model_for_data("cnn", data, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    other = model_for_data("cnn", data, seed=4)
    assert not torch.equal(a.classifier.weight, other.classifier.weight)
    assert a(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_client_momentum_is_the_moving_average_rounded_as_written():
    """m <- beta m + (1 - beta) g, in place: by hand, from m = 0, and to the last bit what the expression
    beta * m + (1 - beta) * g gives (each product rounded, then the sum; an FMA would differ)."""
    m = torch.tensor([1.0, -2.0, 0.0])
    out = ema_momentum_(m, torch.tensor([3.0, 2.0, 4.0]), 0.75)
    assert out is m and m.tolist() == [1.5, -1.0, 1.0]  # 0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 2, 0.25 * 4
    zero = torch.zeros(2)
    assert ema_momentum_(zero, torch.tensor([8.0, -4.0]), 0.5).tolist() == [4.0, -2.0]  # m(0) = 0: (1 - beta) g
    gen = torch.Generator().manual_seed(3)
    for beta in (0.9, 0.99, 0.3):
        before, gradient = torch.randn(16, 4097, generator=gen), torch.randn(16, 4097, generator=gen)
        want = beta * before + (1.0 - beta) * gradient
        assert torch.equal(ema_momentum_(before.clone(), gradient, beta), want)
        scratch = gradient.clone()
        assert torch.equal(ema_momentum_(before.clone(), scratch, beta, scratch=True), want)
        assert torch.equal(scratch, gradient * (1.0 - beta))  # the scratch gradient now holds (1 - beta) g
