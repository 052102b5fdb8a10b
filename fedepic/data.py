"""Datasets as uint8 tensors: torchvision datasets, any class-folder tree, and a tiny synthetic set.

Images are decoded once and cached as uint8 tensors (written atomically), so a second run loads
CIFAR-sized data in about a second. Model input is `x.float() / 255`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fedepic.config import DataConfig
from fedepic.errors import DataError
from fedepic.outputs import atomic_torch_save


@dataclass(frozen=True)
class ImageData:
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units (of the training set)
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def default_root(cfg: DataConfig) -> Path:
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("FEDEPIC_DATA"):
        return Path(os.environ["FEDEPIC_DATA"]).expanduser()
    return Path.home() / ".cache" / "fedepic" / "data"


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("FEDEPIC_CACHE"):
        return Path(os.environ["FEDEPIC_CACHE"]).expanduser()
    return Path.home() / ".cache" / "fedepic" / "decoded"


def _mnist_like(cls_name: str, expected: Sequence[str]) -> Callable[[Path, bool], tuple]:
    def load(root: Path, download: bool) -> tuple:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"{cls_name} not found under {root} and could not be downloaded ({str(err).splitlines()[0]}); "
                f"expected {root}/{cls_name}/raw/{{{','.join(expected)}}}"
            ) from None
        return (train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets, list(train.classes))
    return load


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _load_cifar10(root: Path, download: bool) -> tuple:
    import torchvision.datasets as tvd

    try:
        train = tvd.CIFAR10(str(root), train=True, download=download)
        test = tvd.CIFAR10(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise DataError(
            f"CIFAR-10 not found under {root} and could not be downloaded ({str(err).splitlines()[0]}); expected "
            f"{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch}}; offline, use data.name=imagefolder"
        ) from None
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return (to_tensor(train.data), torch.tensor(train.targets), to_tensor(test.data), torch.tensor(test.targets),
            list(train.classes))


def _read_image_folder(folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image under folder/<class>/ with torchvision.io (no PIL round trip)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.is_file())
        for path in files:
            images.append(decode_image(read_file(str(path)), mode=ImageReadMode.UNCHANGED))
            labels.append(label)
    if not images:
        raise DataError(f"no images found under {folder}/<class>/")
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise DataError(f"images under {folder} differ in shape {sorted(shapes)[:3]}; resize them to one size")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _load_image_folder(tree: Path) -> tuple:
    train_dir, test_dir = tree / "train", tree / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(f"image folder not found: expected {train_dir}/<class>/* and {test_dir}/<class>/*")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    if classes != test_classes:
        raise DataError(f"class folders differ between {train_dir} and {test_dir}")
    train_x, train_y = _read_image_folder(train_dir, classes)
    test_x, test_y = _read_image_folder(test_dir, classes)
    return train_x, train_y, test_x, test_y, classes


def _synthetic(cfg: DataConfig, seed: int) -> tuple:
    """Ten 1x28x28 classes: a fixed random prototype per class plus pixel noise. For smoke tests only."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 1, 28, 28, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        x = prototypes[y] * 0.7 + 0.3 * torch.rand(n, 1, 28, 28, generator=gen)
        return (x * 255).round().to(torch.uint8), y

    train_x, train_y = draw(cfg.synthetic_train)
    test_x, test_y = draw(cfg.synthetic_test)
    return train_x, train_y, test_x, test_y, [f"class{i}" for i in range(10)]


def _cache_key(cfg: DataConfig, source: Path, seed: int) -> str:
    ident = f"v1|{cfg.name}|{source.resolve() if source.exists() else source}|{cfg.folder}|{seed}"
    if cfg.name == "synthetic":
        ident += f"|{cfg.synthetic_train}|{cfg.synthetic_test}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _load_raw(cfg: DataConfig, seed: int) -> tuple:
    root = default_root(cfg)
    source = root / cfg.folder if cfg.name == "imagefolder" else root
    cache_file = cache_dir(cfg) / f"{cfg.name}-{_cache_key(cfg, source, seed)}.pt"
    if cache_file.is_file():
        blob = torch.load(cache_file, weights_only=True)
        return blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], list(blob["classes"])
    if cfg.name == "mnist":
        raw = _mnist_like("MNIST", _MNIST_FILES)(root, cfg.download)
    elif cfg.name == "fashion_mnist":
        raw = _mnist_like("FashionMNIST", _MNIST_FILES)(root, cfg.download)
    elif cfg.name == "cifar10":
        raw = _load_cifar10(root, cfg.download)
    elif cfg.name == "imagefolder":
        raw = _load_image_folder(source)
    else:
        raw = _synthetic(cfg, seed)
    train_x, train_y, test_x, test_y, classes = raw
    blob = {"train_x": train_x.to(torch.uint8).contiguous(), "train_y": train_y.to(torch.int64),
            "test_x": test_x.to(torch.uint8).contiguous(), "test_y": test_y.to(torch.int64), "classes": classes}
    if cfg.name != "synthetic":
        atomic_torch_save(blob, cache_file)
    return blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], classes


def _select_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mapping = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    for new, old in enumerate(classes):
        if old < mapping.numel():
            mapping[old] = new
    new_y = mapping[y]
    keep = new_y >= 0
    return x[keep], new_y[keep]


def _per_class_subsample(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    keep = []
    for c in torch.unique(y).tolist():
        rows = order[y[order] == c][:per_class]
        keep.append(rows)
    idx = torch.sort(torch.cat(keep)).values
    return x[idx], y[idx]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = x[: min(len(x), 10000)].float() / 255
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageData:
    """Load `cfg.name` (cached), then restrict to `cfg.classes` and subsample per class when asked."""
    train_x, train_y, test_x, test_y, names = _load_raw(cfg, seed)
    num_classes = len(names)
    if cfg.classes is not None:
        bad = [c for c in cfg.classes if not 0 <= c < num_classes]
        if bad:
            raise DataError(f"data.classes {bad} out of range for {cfg.name} with {num_classes} classes")
        train_x, train_y = _select_classes(train_x, train_y, cfg.classes)
        test_x, test_y = _select_classes(test_x, test_y, cfg.classes)
        names = [names[c] for c in cfg.classes]
        num_classes = len(names)
    if cfg.train_per_class is not None:
        train_x, train_y = _per_class_subsample(train_x, train_y, cfg.train_per_class, seed)
    if cfg.test_per_class is not None:
        test_x, test_y = _per_class_subsample(test_x, test_y, cfg.test_per_class, seed + 1)
    mean, std = _channel_stats(train_x)
    return ImageData(train_x, train_y, test_x, test_y, num_classes, names, mean, std)


def with_train(data: ImageData, train_x: torch.Tensor, train_y: Optional[torch.Tensor] = None) -> ImageData:
    """A copy of `data` with another training set (poisoned, say); statistics stay those of the clean set."""
    return replace(data, train_x=train_x, train_y=data.train_y if train_y is None else train_y)
