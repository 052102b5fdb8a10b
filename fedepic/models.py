"""Models selected by name (``fedepic.extensions.MODELS``); every one exposes its penultimate features and its last linear layer.

Inputs are float images in [0, 1]; normalisation lives inside the model so that attacks (eps-balls
in pixel space) and defenses see the same input space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from fedepic.dropout import MaskedDropout
from fedepic.extensions import MODELS

if TYPE_CHECKING:  # data does not import models; the annotation only needs the name
    from fedepic.data import ImageData


# ImageClassifier's input-normalisation buffers: fixed statistics of the training set, identical in every
# copy of a run's model, so decentralized nodes neither exchange nor train them
FIXED_BUFFERS = ("mean", "std")


class ImageClassifier(nn.Module):
    """A feature extractor `body` followed by one linear `classifier`; the interface EPIC's proxies need."""

    def __init__(
        self, body: nn.Module, feature_dim: int, num_classes: int,
        mean: Sequence[float], std: Sequence[float],
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.body = body
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, D] of images `x` in [0, 1]."""
        return self.body((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18_body(in_channels: int) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 conv, stride 1, no max-pool (He et al. 2016, Sec. 4.2)."""
    from torchvision.models import resnet18  # lazy: importing torchvision costs seconds in every Ray actor

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def cnn_body(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """Two conv blocks and a hidden layer: the usual small CNN for 28x28 digits (also runs on 32x32)."""
    side = image_size // 4
    body = nn.Sequential(
        nn.Conv2d(in_channels, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(inplace=True),
    )
    return body, 128


def cnn_mnist_body(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """ByzFL's ``cnn_mnist`` (LPD-EPFL/byzfl, fed_framework/models.py, 431,080 parameters on 28x28):
    two unpadded 5x5 convolutions (20, 50 channels), each followed by ReLU and 2x2 max-pooling, then a
    hidden layer of 500. Its log-softmax output and NLL loss are our logits and cross-entropy."""
    side = ((image_size - 4) // 2 - 4) // 2
    body = nn.Sequential(
        nn.Conv2d(in_channels, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(50 * side * side, 500), nn.ReLU(inplace=True),
    )
    return body, 500


def mnist_net_body(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """The MNIST ``Net`` of Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust
    decentralized learning via ClippedGossip", arXiv:2202.01545, 2022
    (epfml/byzantine-robust-decentralized-optimizer, codes/tasks/mnist.py:11-33; the same class in
    Karimireddy, He, Jaggi's bucketing code,
    epfml/byzantine-robust-noniid-optimizer, codes/tasks/mnist.py:9-31): 1,199,882 parameters on 28x28.

    conv 3x3 (32), ReLU, conv 3x3 (64), 2x2 max-pool (no ReLU between the second convolution and the
    pool, as in the authors' ``forward``), ``Dropout2d(0.25)`` (whole channels of [B, 64, 12, 12]),
    flatten, linear 9216 -> 128, ReLU, ``Dropout2d(0.5)`` on the 2-D [B, 128], then the classifier
    128 -> 10. The second dropout is element-wise: inferred from torch's ``dropout2d`` on a 2-D input
    (``feature_dropout`` draws its noise of shape [B, C] followed by a 1 per further dimension, so with
    none it is per entry; torch 1.7.1, the bucketing code's requirements.txt, and 2.x alike; 2.x warns).
    Both are :class:`fedepic.dropout.MaskedDropout` (seeded masks). The authors normalise with
    MNIST's (0.1307, 0.3081) in the data loader and return log-softmax for ``nll_loss``; here the
    training set's mean and std normalise inside the model and the logits go to cross-entropy, the same
    loss."""
    side = (image_size - 4) // 2
    body = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, 1), nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3, 1), nn.MaxPool2d(2),
        MaskedDropout(0.25, (64, 1, 1)), nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
        MaskedDropout(0.5, (128,)),
    )
    return body, 128


def mlp_body(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """Two hidden layers (256, 128) on the flattened image."""
    body = nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 256), nn.ReLU(inplace=True),
        nn.Linear(256, 128), nn.ReLU(inplace=True),
    )
    return body, 128




def build_classifier(
    name: str, num_classes: int, in_channels: int, image_size: int,
    mean: Sequence[float], std: Sequence[float],
) -> ImageClassifier:
    """Build model `name` (a body of ``fedepic.extensions.MODELS``, bound to the image shape by its
    signature, plus the linear classifier). Seed torch before calling for reproducible weights."""
    body, feature_dim = MODELS.build(name, None, {"in_channels": in_channels, "image_size": image_size})
    return ImageClassifier(body, feature_dim, num_classes, mean, std)


def model_for_data(name: str, data: "ImageData", seed: Optional[int] = None) -> ImageClassifier:
    """:func:`build_classifier` for ``data``'s classes, image shape and normalisation.

    With ``seed`` the initial weights come from that seed and the global RNG is left as it was;
    without it they come from the global RNG (the caller seeds it, or loads weights over them).
    """
    def build() -> ImageClassifier:
        return build_classifier(name, data.num_classes, data.in_channels, data.image_size, data.mean, data.std)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
