"""fedepic.grouped_gradients: per-client gradients at one shared model from one batched pass equal the
``torch.func.vmap`` path of ``fedepic.stacked.stacked_gradients`` (the kernel switched off), and
models it does not handle fall back to that path.

Tolerance: the largest absolute difference is at most 1e-5 times the largest absolute entry of the
vmap gradients (float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedepic.stacked as stacked
from fedepic.grouped_gradients import grouped_gradients, supported
from fedepic.models import build_classifier
from fedepic.stacked import parameter_layout, stacked_gradients

RELATIVE = 1e-5


def assert_same_gradients(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert scale > 0
    assert (got - want).abs().max().item() <= RELATIVE * scale


def vmap_gradients(model, flat, xb, yb, weight_decay=0.0):
    """stacked_gradients with the grouped kernel switched off: the vmap path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked, "grouped_gradients", lambda *args: None)
        return stacked_gradients(model, flat, xb, yb, weight_decay)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[name].detach().reshape(-1) for name, _ in parameter_layout(model)])


def minibatches(n: int, batch: int, channels: int, side: int, classes: int = 10, uint8: bool = True):
    generator = torch.Generator().manual_seed(n * 1000 + batch * 10 + channels)
    xb = torch.randint(0, 256, (n, batch, channels, side, side), dtype=torch.uint8, generator=generator)
    yb = torch.randint(0, classes, (n, batch), generator=generator)
    return (xb if uint8 else xb.float().div(255)), yb


@pytest.fixture(scope="module")
def classifiers():
    torch.manual_seed(0)
    return {(name, channels, side): build_classifier(name, 10, channels, side, [0.4] * channels, [0.25] * channels)
            for name in ("cnn", "cnn_mnist", "mlp") for channels, side in ((1, 28), (3, 32))}


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float"])
@pytest.mark.parametrize("batch", [1, 5, 25])
@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize("channels,side", [(1, 28), (3, 32)], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ["cnn", "cnn_mnist", "mlp"])
def test_the_grouped_gradients_equal_the_vmap_path(classifiers, name, channels, side, n, batch, uint8):
    model = classifiers[(name, channels, side)]
    assert supported(model)
    # a point other than the model's own parameters: the gradient is taken at flat, not at the model
    flat = flat_parameters(model) + 0.01 * torch.randn(sum(p.numel() for p in model.parameters()),
                                                       generator=torch.Generator().manual_seed(n))
    xb, yb = minibatches(n, batch, channels, side, uint8=uint8)
    want = vmap_gradients(model, flat, xb, yb)
    got = grouped_gradients(model, flat, xb, yb)
    assert got is not None
    assert_same_gradients(got, want)
    assert_same_gradients(stacked_gradients(model, flat, xb, yb), want)  # the shared path takes the kernel
    if uint8:  # the same images as floats in [0, 1]: the same conversion as float_images
        assert_same_gradients(grouped_gradients(model, flat, xb.float().div(255), yb), want)


def test_weight_decay_is_added_on_the_grouped_path(classifiers):
    model = classifiers[("cnn_mnist", 1, 28)]
    flat = flat_parameters(model)
    xb, yb = minibatches(3, 5, 1, 28)
    assert_same_gradients(stacked_gradients(model, flat, xb, yb, 0.01), vmap_gradients(model, flat, xb, yb, 0.01))
    torch.testing.assert_close(stacked_gradients(model, flat, xb, yb, 0.01),
                               stacked_gradients(model, flat, xb, yb) + 0.01 * flat)


def test_mode_requires_grad_and_hooks_are_left_as_found(classifiers):
    model = classifiers[("cnn", 1, 28)]
    xb, yb = minibatches(3, 5, 1, 28)
    flat = flat_parameters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    want = vmap_gradients(model, flat, xb, yb)
    first = next(model.parameters())
    for training, frozen in ((False, True), (True, False)):
        model.train(training)
        first.requires_grad_(not frozen)
        with torch.no_grad():  # the kernel takes its own gradients even where the caller turned them off
            got = stacked_gradients(model, flat, xb, yb)
        assert_same_gradients(got, want)
        assert model.training is training and all(m.training is training for m in model.modules())
        assert first.requires_grad is (not frozen)
        assert all(p.requires_grad for p in model.parameters() if p is not first)
        assert all(p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    first.requires_grad_(True)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


class TwiceLinear(nn.Module):
    """A strided dilated asymmetrically padded bias-free convolution, one Linear applied twice on
    [N, C, H, W] rows, and one whose output the loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=(2, 1), bias=False)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(4 * 7 * 6, 5)
        self.unused = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [N, 4, 7, 6] on 14x14 inputs
        h = self.mix(torch.tanh(self.mix(h)))  # the same layer twice, on the last dim of a 4-d tensor
        self.unused(h)
        return self.head(h.flatten(1))


def test_strides_dilation_padding_no_bias_a_layer_called_twice_and_an_unused_one():
    torch.manual_seed(1)
    model = TwiceLinear()
    assert supported(model)
    flat = flat_parameters(model)
    xb, yb = minibatches(4, 3, 2, 14, classes=5, uint8=False)
    got = grouped_gradients(model, flat, xb, yb)
    assert got is not None
    assert_same_gradients(got, vmap_gradients(model, flat, xb, yb))


def tiny(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), *middle, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


@pytest.mark.parametrize("model", [
    tiny(nn.BatchNorm2d(3, track_running_stats=False)),
    tiny(nn.GroupNorm(1, 3)),
    nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 8 * 8, 4)),
    nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)),
    nn.Sequential(nn.Conv2d(1, 3, 3, padding="same"), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)),
], ids=["batchnorm-batch-statistics", "groupnorm", "grouped-conv", "reflect-padding", "same-padding"])
def test_other_models_fall_back_to_the_vmap_path(model):
    """Unsupported, without running buffers: the vmap path runs, and it equals one backward per client."""
    assert not supported(model)
    channels = model[0].in_channels
    flat = flat_parameters(model)
    xb, yb = minibatches(3, 5, channels, 8, classes=4, uint8=False)
    assert grouped_gradients(model, flat, xb, yb) is None
    got = stacked_gradients(model, flat, xb, yb)
    for k in range(3):
        model.zero_grad()
        F.cross_entropy(model(xb[k]), yb[k]).backward()
        want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert_same_gradients(got[k], want)
    model.zero_grad(set_to_none=True)


def test_running_buffers_and_dropout_are_not_supported():
    assert not supported(tiny(nn.BatchNorm2d(3)))
    assert not supported(tiny(nn.Dropout(0.1)))
    with pytest.raises(ValueError, match="running buffers"):  # stacked_gradients refuses them, as before
        stacked_gradients(tiny(nn.BatchNorm2d(3)), torch.zeros(3 * 9 + 3 + 6 + 3 * 64 * 4 + 4),
                          *minibatches(2, 3, 1, 8, classes=4))


@pytest.mark.parametrize("limit", [1, 2**40], ids=["one-client-per-chunk", "one-chunk"])
def test_the_chunks_of_unfolded_input_do_not_change_the_gradients(classifiers, monkeypatch, limit):
    model = classifiers[("cnn", 3, 32)]
    flat = flat_parameters(model)
    xb, yb = minibatches(3, 5, 3, 32)
    want = vmap_gradients(model, flat, xb, yb)
    monkeypatch.setattr("fedepic.grouped_gradients.UNFOLD_BYTES", limit)
    assert_same_gradients(grouped_gradients(model, flat, xb, yb), want)
