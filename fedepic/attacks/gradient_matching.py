"""Witches' Brew: clean-label targeted data poisoning by gradient matching.

Geiping et al., "Witches' Brew: Industrial Scale Data Poisoning via Gradient Matching", ICLR 2021,
Algorithm 1. The attacker perturbs a few training images of the adversarial class (within an
l_inf ball of radius eps, labels untouched) so that the training gradient of those images aligns
with the gradient that would make the model classify one target test image as the adversarial
class. Details follow the official code (Geiping et al.'s public implementation): the target gradient is taken
once on the clean model over all trainable parameters, the model stays in eval mode while
brewing, the optimiser is Adam on the sign of the gradient with step decays at 3/8, 5/8, 7/8 of
the steps, perturbations start at randn * eps, differentiable augmentation is on, and the restart
with the lowest loss is kept.

Poisons are stored as uint8 images (the training set's format), rounded so that every pixel
stays within floor(255 * eps) grey levels of the clean pixel.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedepic.attacks.data_attacks import NoDataAttack
from fedepic.augment import random_crop_flip
from fedepic.errors import ConfigError, DataError

FORMAT_VERSION = 1
ProgressFn = Callable[[int, int, float], None]


@dataclass
class BrewConfig:
    """Hyper-parameters of the brew; defaults are the paper's CIFAR-10 settings.

    eps: l_inf radius in [0, 1] pixel units (8/255). budget: poisons as a fraction of the training
    set. restarts: R independent brews, the lowest-loss one is kept. steps: M signAdam steps.
    tau: Adam learning rate. augment/pad/flip: differentiable random crop + flip while brewing.
    batch_size: poisons per double-backprop pass (see `brew_poisons` for what happens above it).
    """

    eps: float = 8 / 255
    budget: float = 0.01
    restarts: int = 8
    steps: int = 250
    tau: float = 0.1
    augment: bool = True
    batch_size: int = 512
    pad: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget must be in (0, 1), got {self.budget}")
        for name in ("restarts", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")


@dataclass
class AttackSetup:
    """Who is attacked: one test image of `target_class`, to be classified as `adversarial_class`."""

    target_index: int
    target_class: int
    adversarial_class: int
    poison_indices: torch.Tensor  # int64 rows of the training set, all of the adversarial class


@dataclass
class PoisonSet:
    """A brewed poison set: the replacement uint8 rows for `indices` of the training set."""

    indices: torch.Tensor
    poisoned_x: torch.Tensor
    target_index: int
    target_class: int
    adversarial_class: int
    eps: float
    loss: float
    alignment: float
    restarts_losses: list[float] = field(default_factory=list)


def choose_setup(
    train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int, budget: float, seed: int,
) -> AttackSetup:
    """Draw target image, adversarial class and poison rows as in the paper's benchmark.

    The target is a random test image; its class is the target class; the adversarial class is a
    different class drawn uniformly; round(budget * N) poisons are drawn without replacement from
    the training images of the adversarial class.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    rng = np.random.default_rng(seed)
    test_np, train_np = test_y.cpu().numpy(), train_y.cpu().numpy()
    target_index = int(rng.integers(len(test_np)))
    target_class = int(test_np[target_index])
    others = [c for c in range(num_classes) if c != target_class]
    adversarial_class = int(rng.choice(others))
    count = max(1, round(budget * len(train_np)))
    candidates = np.flatnonzero(train_np == adversarial_class)
    if len(candidates) < count:
        raise ValueError(
            f"budget {budget} needs {count} poisons but class {adversarial_class} has only "
            f"{len(candidates)} training images"
        )
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    return AttackSetup(target_index, target_class, adversarial_class, torch.from_numpy(chosen).long())


def _params(model: nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters to match gradients on")
    return params


def _flat(grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def target_gradient(model: nn.Module, target_x: torch.Tensor, adversarial_class: int) -> torch.Tensor:
    """Flat gradient of CE(model(x_t), y_adv) over all trainable parameters (model put in eval mode)."""
    model.eval()
    params = _params(model)
    labels = torch.full((target_x.shape[0],), adversarial_class, dtype=torch.long, device=target_x.device)
    loss = F.cross_entropy(model(target_x), labels)
    return _flat(torch.autograd.grad(loss, params)).detach()


def _poison_grad_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    # Summed (not averaged) loss: the gradient of the whole poison set is the sum over its batches.
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return _flat(torch.autograd.grad(loss, _params(model), create_graph=create_graph))


def gradient_alignment(
    model: nn.Module, x_poison: torch.Tensor, y_poison: torch.Tensor, target_grad: torch.Tensor,
    batch_size: int = 512,
) -> float:
    """Cosine between the summed poison gradient (no augmentation, eval mode) and `target_grad`."""
    model.eval()
    total = torch.zeros_like(target_grad)
    for start in range(0, x_poison.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        total += _poison_grad_sum(model, x_poison[sl], y_poison[sl], create_graph=False).detach()
    return float(F.cosine_similarity(total, target_grad, dim=0))


def _alignment_loss(poison_grad: torch.Tensor, target_grad: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    return 1 - (poison_grad * target_grad).sum() / (poison_grad.norm() * target_norm)


def _project(delta: torch.Tensor, clean: torch.Tensor, eps: float) -> None:
    """In place: clip delta to the eps ball, then so that clean + delta stays a valid image."""
    delta.clamp_(-eps, eps)
    delta.copy_(torch.maximum(torch.minimum(delta, 1 - clean), -clean))


def _quantize(clean_u8: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Round clean + delta to uint8 while keeping |poison - clean| <= floor(255 * eps) grey levels."""
    levels = math.floor(eps * 255 + 1e-6)
    clean = clean_u8.to(torch.int16)
    rounded = torch.round((clean.float() / 255 + delta) * 255).to(torch.int16)
    rounded = torch.minimum(torch.maximum(rounded, clean - levels), clean + levels)
    return rounded.clamp(0, 255).to(torch.uint8)


def _brew_once(
    model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, target_grad: torch.Tensor,
    cfg: BrewConfig, gen: torch.Generator, restart: int, progress: ProgressFn | None,
) -> torch.Tensor:
    """One restart of Algorithm 1; returns the final (projected, float) perturbation."""
    target_norm = target_grad.norm()
    delta = torch.randn(clean.shape, generator=gen, device=gen.device).to(clean.device) * cfg.eps
    _project(delta, clean, cfg.eps)
    delta.requires_grad_(True)
    # The official code's step size is tau * eps (tau0 = eps * tau * pbatch / 512 at its default
    # poison batch of 512): each signAdam step moves a pixel by a fraction tau of the budget.
    optimizer = torch.optim.Adam([delta], lr=cfg.tau * cfg.eps)
    milestones = sorted({max(1, int(cfg.steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for step in range(cfg.steps):
        grad = torch.zeros_like(clean)
        loss_sum = torch.zeros((), device=clean.device)
        # Official per-batch scheme: each batch of poisons is matched on its own gradient, the
        # perturbation gradients of all batches are accumulated, then one signAdam step is taken.
        # Only one batch's double-backprop graph is alive at a time, which bounds GPU memory.
        for start in range(0, clean.shape[0], cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            x = clean[sl] + delta[sl]
            if cfg.augment:
                x = random_crop_flip(x, pad=cfg.pad, generator=gen, flip=cfg.flip)
            poison_grad = _poison_grad_sum(model, x, labels[sl], create_graph=True)
            loss = _alignment_loss(poison_grad, target_grad, target_norm)
            grad += torch.autograd.grad(loss, delta)[0]
            loss_sum += loss.detach()
        delta.grad = grad.sign()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            _project(delta, clean, cfg.eps)
        if progress is not None:
            num_batches = math.ceil(clean.shape[0] / cfg.batch_size)
            progress(restart, step, float(loss_sum) / num_batches)
    return delta.detach()


def brew_poisons(
    model: nn.Module,
    train_x_uint8: torch.Tensor,
    train_y: torch.Tensor,
    poison_indices: torch.Tensor,
    target_x: torch.Tensor,
    adversarial_class: int,
    cfg: BrewConfig,
    *,
    seed: int,
    device: torch.device | str,
    target_index: int = -1,
    target_class: int = -1,
    progress: ProgressFn | None = None,
) -> PoisonSet:
    """Brew perturbations for the rows `poison_indices` so that training on them flips `target_x`.

    `target_x` is float [T,C,H,W] in [0, 1] (usually T=1). `target_index` / `target_class` are
    only recorded in the result. Each restart's loss is 1 - cosine of the stored (uint8-rounded,
    un-augmented) poisons: deterministic and measured on what the victim will train on, where the
    official code compares the last, augmented step's loss. The model is moved to `device` and left
    in eval mode. Same seed, same device => same poisons on the CPU; on CUDA the backward of the
    crop's indexing accumulates with atomics, so repeated brews agree only up to float rounding.
    """
    device = torch.device(device)
    indices = torch.as_tensor(poison_indices, dtype=torch.long).cpu()
    if indices.numel() == 0:
        raise ValueError("poison_indices is empty")
    if train_x_uint8.dtype != torch.uint8:
        raise ValueError(f"train_x_uint8 must be uint8, got {train_x_uint8.dtype}")
    if int(indices.min()) < 0 or int(indices.max()) >= train_x_uint8.shape[0]:
        raise ValueError("poison_indices out of range of the training set")
    if target_x.dim() != 4 or target_x.shape[1:] != train_x_uint8.shape[1:]:
        raise ValueError(f"target_x must be [T,{','.join(map(str, train_x_uint8.shape[1:]))}], "
                         f"got {tuple(target_x.shape)}")
    model = model.to(device).eval()
    clean_u8 = train_x_uint8[indices].to(device)
    clean = clean_u8.float() / 255
    labels = train_y[indices].to(device)
    target_grad = target_gradient(model, target_x.to(device).float(), adversarial_class)
    gen = torch.Generator(device=device).manual_seed(seed)

    best_u8, best_loss, losses = None, math.inf, []
    for restart in range(cfg.restarts):
        delta = _brew_once(model, clean, labels, target_grad, cfg, gen, restart, progress)
        poisoned_u8 = _quantize(clean_u8, delta, cfg.eps)
        loss = 1 - gradient_alignment(model, poisoned_u8.float() / 255, labels, target_grad, cfg.batch_size)
        losses.append(loss)
        if loss < best_loss:
            best_u8, best_loss = poisoned_u8, loss
    return PoisonSet(
        indices=indices, poisoned_x=best_u8.cpu(), target_index=int(target_index),
        target_class=int(target_class), adversarial_class=int(adversarial_class), eps=float(cfg.eps),
        loss=float(best_loss), alignment=float(1 - best_loss), restarts_losses=losses,
    )


@torch.no_grad()
def target_prediction(model: nn.Module, target_x: torch.Tensor) -> int:
    """Class predicted for the (first) target image, in eval mode as in the official evaluation."""
    model.eval()
    device = next(model.parameters()).device
    return int(model(target_x[:1].to(device).float()).argmax(1)[0])


def apply_poisons(train_x_uint8: torch.Tensor, poisons: PoisonSet) -> torch.Tensor:
    """Copy of the training images with the poisoned rows replaced."""
    _check_fits(train_x_uint8.shape, poisons)
    out = train_x_uint8.clone()
    out[poisons.indices] = poisons.poisoned_x.to(out.device)
    return out


def poison_mask(n: int, poisons: PoisonSet) -> torch.Tensor:
    """Bool [n], True on the poisoned rows (for measuring how many poisons a defense removes)."""
    _check_fits((n,), poisons)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[poisons.indices] = True
    return mask


def _check_fits(shape: tuple[int, ...] | torch.Size, poisons: PoisonSet) -> None:
    if poisons.indices.numel() and (int(poisons.indices.max()) >= shape[0] or int(poisons.indices.min()) < 0):
        raise ValueError(f"poison indices exceed the training set of {shape[0]} rows")
    if len(shape) > 1 and tuple(poisons.poisoned_x.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"poison images {tuple(poisons.poisoned_x.shape[1:])} do not match "
                         f"training images {tuple(shape[1:])}")


# ---------------------------------------------------------------------------------------------
# Storage: a plain .npz (no pickled objects), with a format version and a sha256 over the arrays.
#
# The sha256 is unkeyed: it detects accidental damage (a truncated copy, flipped bits, an array
# rewritten by a tool that does not know the format), i.e. integrity. It is no proof of origin: anyone
# who can edit the file can recompute it, so it does not protect against a deliberately crafted file
# (authenticity). What a crafted file can do is bounded by `check_poisons`, which every run applies
# before it starts: the images must stay within the eps ball of the clean rows they replace, the rows
# must be distinct, in range and of the adversarial class, and the classes must exist in the dataset.
# There is no secret the simulator could key it with (files are shared between runs and users).

_SCALARS = {"target_index": np.int64, "target_class": np.int64, "adversarial_class": np.int64,
            "eps": np.float64, "loss": np.float64, "alignment": np.float64}


def _arrays(poisons: PoisonSet) -> dict[str, np.ndarray]:
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "indices": poisons.indices.cpu().numpy().astype(np.int64),
        "poisoned_x": poisons.poisoned_x.cpu().numpy().astype(np.uint8),
        "restarts_losses": np.asarray(poisons.restarts_losses, dtype=np.float64),
    }
    for name, dtype in _SCALARS.items():
        arrays[name] = np.array(getattr(poisons, name), dtype=dtype)
    return arrays


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        # Name, dtype and shape are hashed too, so a reshaped or retyped array does not pass.
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def save_poisons(poisons: PoisonSet, path: str | os.PathLike) -> None:
    """Write `poisons` to `path` (.npz of plain arrays + sha256), atomically via a temporary name."""
    path = Path(path)
    arrays = _arrays(poisons)
    arrays["sha256"] = np.array(_checksum(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def check_poisons(poisons: PoisonSet, train_x: torch.Tensor, train_y: torch.Tensor, test_y: torch.Tensor,
                  num_classes: int, eps_255: float, source: str = "attack.poisons") -> PoisonSet:
    """Refuse a poison set that does not fit the data or the budget; return it unchanged otherwise.

    DataError (one line, naming `source`) unless: indices are distinct rows of the training set, the
    images are uint8 of the training images' shape, both classes lie in [0, num_classes) and differ,
    every poisoned row is of the adversarial class (clean-label poisons, as `choose_setup` draws them),
    the target is a test image of the target class, and every pixel is within the file's eps of the
    clean image. ConfigError when the file's eps exceeds the configured `eps_255` (units of 1/255).
    """
    idx, x = poisons.indices, poisons.poisoned_x
    n = len(train_y)
    fail = lambda why: DataError(f"{source}: {why}")  # noqa: E731
    if idx.dim() != 1 or idx.dtype != torch.int64 or len(idx) != len(x):
        raise fail(f"expected {len(x)} int64 row indices, got {idx.dtype} {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise fail(f"poison indices outside the {n} training rows")
    if idx.unique().numel() != idx.numel():
        raise fail("poison indices repeat a row")
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(train_x.shape[1:]):
        raise fail(f"poison images {x.dtype} {tuple(x.shape[1:])} do not match the training images "
                   f"{train_x.dtype} {tuple(train_x.shape[1:])}")
    for name in ("adversarial_class", "target_class"):
        if not 0 <= getattr(poisons, name) < num_classes:
            raise fail(f"{name.replace('_', ' ')} {getattr(poisons, name)} is not one of the {num_classes} classes")
    if poisons.adversarial_class == poisons.target_class:
        raise fail("adversarial class equals the target class")
    if len(idx) and not bool((train_y[idx] == poisons.adversarial_class).all()):
        raise fail(f"poisoned rows are not all of the adversarial class {poisons.adversarial_class}")
    if not 0 <= poisons.target_index < len(test_y) or int(test_y[poisons.target_index]) != poisons.target_class:
        raise fail(f"target index {poisons.target_index} is not a test image of class {poisons.target_class}")
    if not 0 < poisons.eps <= 1:
        raise fail(f"eps {poisons.eps} is not in (0, 1]")
    # The brew rounds its float eps ball onto uint8: allow the half step that rounding can add.
    limit = math.floor(poisons.eps * 255 + 0.5 + 1e-6)
    if len(idx) and int((x.int() - train_x[idx].int()).abs().max()) > limit:
        raise fail(f"poison images move pixels by more than the file's eps {poisons.eps * 255:g}/255")
    if poisons.eps * 255 > eps_255 + 1e-6:
        raise ConfigError(f"attack.poisons: brewed with eps {poisons.eps * 255:g}/255, above attack.eps = {eps_255:g}")
    return poisons


def load_poisons(path: str | os.PathLike) -> PoisonSet:
    """Read a file written by `save_poisons`; raise DataError (one line, naming `path`) if it does
    not check out. Whether the set fits a dataset and budget is `check_poisons`'s job.

    Loaded with allow_pickle=False: a file holding object arrays is rejected, never unpickled.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # zip, header and pickle refusals all mean "not a valid poison file"
        raise DataError(f"{path}: not a readable poison file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    required = {"format_version", "indices", "poisoned_x", "restarts_losses", "sha256", *_SCALARS}
    missing = required - set(arrays)
    if missing:
        raise DataError(f"{path}: poison file lacks {', '.join(sorted(missing))}")
    stored = arrays.pop("sha256")
    if stored.dtype.kind != "U" or stored.shape != () or str(stored) != _checksum(arrays):
        raise DataError(f"{path}: checksum mismatch, the poison file is corrupted or was modified")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise DataError(f"{path}: format version {int(arrays['format_version'])}, expected {FORMAT_VERSION}")
    indices, images = arrays["indices"], arrays["poisoned_x"]
    if images.dtype != np.uint8 or images.ndim != 4 or indices.ndim != 1 or len(indices) != len(images):
        raise DataError(f"{path}: expected uint8 images [P,C,H,W] and P indices, got "
                         f"{images.dtype} {images.shape} and {indices.shape}")
    scalars = {name: arrays[name].item() for name in _SCALARS}
    return PoisonSet(
        indices=torch.from_numpy(indices.astype(np.int64)), poisoned_x=torch.from_numpy(images.copy()),
        restarts_losses=[float(v) for v in arrays["restarts_losses"]],
        **{k: (int(v) if _SCALARS[k] is np.int64 else float(v)) for k, v in scalars.items()},
    )


class GradientMatching(NoDataAttack):
    """Witches' Brew (Jonas Geiping, Liam Fowl, W. Ronny Huang, Wojciech Czaja, Gavin Taylor, Michael
    Moeller, Tom Goldstein, "Witches' Brew: Industrial Scale Data Poisoning via Gradient Matching",
    ICLR 2021, arXiv:2009.02276) as a registry entry (``fedepic.extensions.DATA_ATTACKS``): its poisons are brewed
    per trial (centralized) or read from ``attack.poisons`` (federated), not drawn from rows, so
    ``poison`` leaves rows as they are; success: whether the target image is predicted as the
    adversarial class (one trial)."""

    @torch.no_grad()
    def success(self, model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                target_x: Optional[torch.Tensor] = None, adversarial_class: Optional[int] = None) -> Optional[float]:
        if target_x is None:
            return None
        from fedepic.train import predict_logits

        return float(predict_logits(model, target_x).argmax(1)[0].item() == adversarial_class)

    @torch.no_grad()
    def success_many(self, predict, count, test_x, test_y, num_classes, target_x=None, adversarial_class=None):
        if target_x is None:
            return None
        return (predict(target_x[:1]).argmax(-1)[:, 0] == adversarial_class).float().tolist()
