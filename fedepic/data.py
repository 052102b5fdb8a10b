"""Datasets as uint8 tensors: torchvision datasets, any class-folder tree, and a tiny synthetic set.

Images are decoded once and cached as uint8 arrays in an uncompressed `.npz` (read with
allow_pickle=False, never unpickled) with its sha256 beside it, so a second run loads CIFAR-sized
data in about a second; a cache file that fails its checksum is rebuilt. The cache key is the
dataset and a fingerprint of its files (relative paths, sizes, mtimes), never the seed: seeded
subsampling happens after loading. Model input is `x.float() / 255`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fedepic.config import DataConfig, data_root, decoded_cache_dir
from fedepic.errors import DataError
from fedepic.extensions import DATASETS
from fedepic.outputs import atomic_write_bytes, atomic_write_text, first_missing


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
    return data_root(cfg)


def cache_dir(cfg: DataConfig) -> Path:
    return decoded_cache_dir(cfg)[0]


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format), its header checked against its size."""
    data = path.read_bytes()
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is corrupt: {len(data)} bytes, shorter than its {header}-byte header")
    if data[:4] != bytes((0, 0, 8, ndim)):
        raise DataError(f"{path} is corrupt: header magic {data[:4].hex()}, expected {bytes((0, 0, 8, ndim)).hex()}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        why = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is corrupt: {why} ({len(data)} bytes, header {dims} needs {expected})")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def _read_mnist_split(raw: Path, prefix: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte", 3)
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", 1).to(torch.int64)
    if len(images) != len(labels):
        raise DataError(f"{raw}/{prefix}-*: {len(images)} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{raw}/{prefix}-labels-idx1-ubyte is corrupt: label {int(labels.max())} >= {num_classes}")
    return images.unsqueeze(1), labels


def _mnist_like(cls_name: str, expected: Sequence[str]) -> Callable[[Path, bool], tuple]:
    def load(root: Path, download: bool) -> tuple:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        raw = root / cls_name / "raw"
        if not all((raw / name).is_file() for name in expected):
            try:  # torchvision only downloads; the files are parsed (and checked) below
                with _removed_on_failure(raw):
                    cls(str(root), train=True, download=download)
                    cls(str(root), train=False, download=download)
            except (RuntimeError, OSError) as err:
                raise DataError(
                    f"{cls_name} not found under {root} and could not be downloaded ({str(err).splitlines()[0]}); "
                    f"expected {raw}/{{{','.join(expected)}}}"
                ) from None
        classes = list(cls.classes)
        train_x, train_y = _read_mnist_split(raw, "train", len(classes))
        test_x, test_y = _read_mnist_split(raw, "t10k", len(classes))
        return train_x, train_y, test_x, test_y, classes
    return load


@contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """The folders a failed download made on the way to ``folder`` are removed again while empty: a
    refused run writes nothing (torchvision makes them before it tries the network). Only empty ones:
    another process (a sweep's cell) may be downloading into the same root."""
    made = first_missing(folder)
    try:
        yield
    except BaseException:
        current = folder
        while made is not None and made in (current, *current.parents):
            try:
                current.rmdir()
            except OSError:
                break
            if current == made:
                break
            current = current.parent
        raise


def _load_cifar10(root: Path, download: bool) -> tuple:
    import torchvision.datasets as tvd

    try:
        with _removed_on_failure(root):
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
            images.append(_decode(path, decode_image, read_file, ImageReadMode.UNCHANGED))
            labels.append(label)
    if not images:
        raise DataError(f"no images found under {folder}/<class>/")
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise DataError(f"images under {folder} differ in shape {sorted(shapes)[:3]}; resize them to one size")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _decode(path: Path, decode_image: Callable, read_file: Callable, mode: object) -> torch.Tensor:
    if path.stat().st_size == 0:
        raise DataError(f"image file {path} is empty")
    try:
        return decode_image(read_file(str(path)), mode=mode)
    except RuntimeError as err:  # torchvision prefixes "function, source.cpp:line, "
        why = re.sub(r"^\w+, \S+:\d+, ", "", str(err).splitlines()[0])
        raise DataError(f"cannot decode image file {path}: {why}") from None


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


@dataclass(frozen=True)
class DatasetSource:
    """How one dataset of ``fedepic.extensions.DATASETS`` is read.

    ``folder``: where its files lie under the data root (None: ``data.folder``), the files whose
    fingerprint keys the decoded cache; ``read(cfg, root, seed)`` returns (train_x, train_y, test_x,
    test_y, class names); ``cached``: False for data generated from the seed (never cached).
    """

    folder: Optional[str]
    read: Callable[[DataConfig, Path, int], tuple]
    cached: bool = True


MNIST = DatasetSource("MNIST/raw", lambda cfg, root, seed: _mnist_like("MNIST", _MNIST_FILES)(root, cfg.download))
FASHION_MNIST = DatasetSource("FashionMNIST/raw",
                              lambda cfg, root, seed: _mnist_like("FashionMNIST", _MNIST_FILES)(root, cfg.download))
CIFAR10 = DatasetSource("cifar-10-batches-py", lambda cfg, root, seed: _load_cifar10(root, cfg.download))
IMAGE_FOLDER = DatasetSource(None, lambda cfg, root, seed: _load_image_folder(root / cfg.folder))
SYNTHETIC = DatasetSource(None, lambda cfg, root, seed: _synthetic(cfg, seed), cached=False)


def _dataset(cfg: DataConfig) -> DatasetSource:
    return DATASETS.get(cfg.name).load()


def _source_dir(cfg: DataConfig) -> Path:
    """The folder whose files the decoded data comes from."""
    return default_root(cfg) / (_dataset(cfg).folder or cfg.folder)


def fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path, size and mtime under `folder`: an edit changes the cache key."""
    digest = hashlib.sha256()
    for rel, size, mtime in sorted(_file_stats(folder, "")):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _file_stats(folder: Path, prefix: str, seen: frozenset = frozenset()) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file below `folder`; scandir: one stat per file (60k for CIFAR).

    Links are followed (a dataset may link its files from elsewhere); a link loop, or a folder linked
    inside itself (``seen``: the folders above, by device and inode), is a DataError naming it.
    """
    stats = []
    try:
        entries = list(os.scandir(folder))
        here = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        return stats
    except OSError as err:
        raise DataError(f"cannot read the data folder {folder}: {err.strerror}") from None
    seen = seen | {(here.st_dev, here.st_ino)}
    for entry in entries:
        try:
            stat = entry.stat()  # follows links
        except OSError as err:
            raise DataError(f"cannot read data file {entry.path}: {err.strerror}") from None
        if entry.is_dir():
            if (stat.st_dev, stat.st_ino) in seen:
                raise DataError(f"the data folder {entry.path} links to a folder above it (a loop)")
            stats += _file_stats(Path(entry.path), f"{prefix}{entry.name}/", seen)
        elif entry.is_file():
            stats.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))
    return stats


def _cache_file(cfg: DataConfig) -> Path:
    source = _source_dir(cfg)
    ident = f"v2|{cfg.name}|{source.resolve() if source.exists() else source}|{fingerprint(source)}"
    return cache_dir(cfg) / f"{cfg.name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"


_ARRAYS = ("train_x", "train_y", "test_x", "test_y", "classes")


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_cache(path: Path) -> Optional[tuple]:
    """The cached arrays, or None when there are none; a file failing its checksum is deleted and reported."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        stored = _checksum_file(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        stored = None
    why = "no checksum beside it" if stored is None else None
    if why is None and hashlib.sha256(data).hexdigest() != stored:
        why = "checksum mismatch"
    if why is None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = [npz[name] for name in _ARRAYS]
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
            why = f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if why is not None:
        print(f"fedepic: warning: decoded cache {path} is corrupt ({why}); rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
        _checksum_file(path).unlink(missing_ok=True)
        return None
    tensors = [torch.from_numpy(a.copy()) for a in arrays[:4]]
    return (*tensors, [str(c) for c in arrays[4]])


def write_cache(path: Path, blob: dict) -> None:
    """Write the arrays, then their sha256 (a file without one is treated as corrupt); no pickle."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(blob[k].numpy() if k != "classes" else [str(c) for c in blob[k]])
                     for k in _ARRAYS})
    data = buf.getvalue()
    try:
        atomic_write_bytes(path, data)
        atomic_write_text(_checksum_file(path), hashlib.sha256(data).hexdigest() + "\n")
    except OSError as err:
        path.unlink(missing_ok=True)
        raise DataError(f"cannot write the decoded cache {path}: {err.strerror} "
                        "(free space, or point data.cache_dir / $FEDEPIC_CACHE elsewhere)") from None


def _load_raw(cfg: DataConfig, seed: int) -> tuple:
    """The full decoded dataset; `seed` only generates the synthetic set, which is never cached."""
    root, source = default_root(cfg), _dataset(cfg)
    if not source.cached:
        raw = source.read(cfg, root, seed)
        return raw[0], raw[1].to(torch.int64), raw[2], raw[3].to(torch.int64), raw[4]
    cached = read_cache(_cache_file(cfg))
    if cached is not None:
        return cached
    raw = source.read(cfg, root, seed)
    train_x, train_y, test_x, test_y, classes = raw
    blob = {"train_x": train_x.to(torch.uint8).contiguous(), "train_y": train_y.to(torch.int64),
            "test_x": test_x.to(torch.uint8).contiguous(), "test_y": test_y.to(torch.int64), "classes": classes}
    write_cache(_cache_file(cfg), blob)  # keyed after a download, so the next run finds it
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
