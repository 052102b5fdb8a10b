"""Training and evaluation in the style of airbench: data resident on the device, batched on-device
augmentation, no per-image Python in the hot loop; bf16 autocast and channels_last on CUDA.

The same code runs on the CPU. Per-epoch hooks (the EPIC selector plugs in here) may shrink the
`keep` mask in place; the next epoch trains only on kept rows.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedepic.augment import random_crop_flip
from fedepic.config import CLIENT_MOMENTUM_FORMS, TrainConfig
from fedepic.dropout import draw_masks, has_dropout

EpochHook = Callable[[int, nn.Module], Optional[dict]]


@contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """torch's CPU threads set to ``count`` inside (``train.threads``; None leaves them), restored after:
    a run in a process that runs others (a sweep's cells) leaves the setting as it found it."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available on this machine")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def float_images(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 divided by 255 (into a new tensor); float images converted."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _to_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    out = float_images(x)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def prepare_model(model: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda" and amp:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = True) -> torch.Tensor:
    """Logits for images `x` (uint8 or float in [0,1]) in eval mode; returns float32 on x's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    channels_last = device.type == "cuda" and amp
    outs = []
    for start in range(0, len(x), batch_size):
        xb = _to_input(x[start:start + batch_size].to(device, non_blocking=True), channels_last)
        with _autocast(device, amp):
            outs.append(model(xb).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             num_classes: Optional[int] = None, amp: bool = True) -> dict:
    """Clean accuracy, per-class accuracy, mean loss, and whether the model collapsed (one prediction)."""
    return logit_metrics(predict_logits(model, x, batch_size, amp), y, num_classes)


def logit_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None) -> dict:
    """:func:`evaluate`'s figures from a model's logits [B, C] on the images whose labels are ``y``."""
    y = y.to(logits.device)
    num_classes = num_classes or logits.shape[1]
    loss = F.cross_entropy(logits, y).item() if len(y) else float("nan")
    predicted = logits.argmax(1)
    correct = (predicted == y).float()
    per_class_total = torch.bincount(y, minlength=num_classes).float()
    per_class_hit = torch.bincount(y, weights=correct, minlength=num_classes)
    per_class = torch.where(per_class_total > 0, per_class_hit / per_class_total.clamp_min(1), torch.nan)
    return {
        "accuracy": correct.mean().item() if len(y) else float("nan"),
        "per_class": per_class.tolist(),
        "loss": loss,
        "collapsed": _collapsed(predicted, y, loss, num_classes),
    }


def _collapsed(predicted: torch.Tensor, y: torch.Tensor, loss: float, num_classes: int) -> bool:
    """Every test image predicted as one class (the labels holding several) with a test loss above
    2 ln C, twice that of the uniform prediction: the logits blew up (train.lr=1e6, dead ReLUs), where
    an undertrained model that happens to predict one class stays near ln C. The factor 2 is ours."""
    if len(y) < 2 or bool((y == y[0]).all()) or not bool((predicted == predicted[0]).all()):
        return False
    return not math.isfinite(loss) or loss > 2 * math.log(max(num_classes, 2))


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: Optional[float] = None) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    lr: float
    rows: int
    seconds: float


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                rows: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> float:
    """One pass over `rows` of (x, y) (already on the model's device). Returns the mean training loss.

    `generator` draws the epoch's order, then per batch its augmentation and, for a model with
    dropout (``fedepic.dropout``), its masks: the same seed gives the same masks."""
    device = x.device
    channels_last = device.type == "cuda" and cfg.amp
    model.train()
    dropout = has_dropout(model)
    order = rows[torch.randperm(len(rows), generator=generator, device=generator.device).to(rows.device)]
    total = torch.zeros((), device=device)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        xb = _to_input(x[idx], False)
        if cfg.augment != "none":
            xb = random_crop_flip(xb, cfg.crop_pad, generator, flip=cfg.augment == "crop_flip")
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        masks = draw_masks(model, len(idx), generator) if dropout else None
        with _autocast(device, cfg.amp):
            loss = F.cross_entropy(functional_call(model, masks, (xb,)) if masks else model(xb), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)  # stays on the device: no sync per batch
    return (total / max(len(order), 1)).item()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *, seed: int,
        device: Optional[torch.device] = None, epochs: Optional[int] = None, lr: Optional[float] = None,
        keep: Optional[torch.Tensor] = None, epoch_end: Optional[EpochHook] = None,
        on_epoch: Optional[Callable[[EpochRecord, dict], None]] = None,
        resume: Optional[dict] = None, on_state: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Train `model` with SGD (Nesterov), weight decay and a step LR schedule.

    `keep` (bool [N]) masks the rows trained on; `epoch_end(epoch, model)` runs after each epoch
    (1-based) and may shrink `keep` in place. Returns one record per epoch (loss, lr, hook output).

    `on_state(epoch, state)` gets, after each epoch's hooks, what decides the epochs to come besides
    the model and `keep`: {"epoch", "optimizer", "scheduler", "generator", "history"}. Passing such
    a `state` as `resume` (with the model and `keep` restored by the caller) continues after its
    epoch exactly as the uninterrupted call would have.
    """
    device = device or resolve_device(cfg.device)
    epochs = cfg.epochs if epochs is None else epochs
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    keep = torch.ones(len(y), dtype=torch.bool) if keep is None else keep
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, cfg, lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    history: list[dict] = []
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        history, first = list(resume["history"]), int(resume["epoch"]) + 1
    for epoch in range(first, epochs + 1):
        started = time.perf_counter()
        rows = keep.to(device).nonzero().squeeze(1)
        current_lr = optimizer.param_groups[0]["lr"]
        loss = train_epoch(model, optimizer, x, y, rows, cfg, generator)
        scheduler.step()
        record = EpochRecord(epoch, loss, current_lr, len(rows), time.perf_counter() - started)
        extra = (epoch_end(epoch, model) if epoch_end else None) or {}
        entry = {**record.__dict__, **extra}
        history.append(entry)
        if on_epoch:
            on_epoch(record, extra)
        if on_state:
            on_state(epoch, {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler_state(scheduler),
                             "generator": generator.get_state(), "history": history})
    return history


def scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict:
    """``scheduler.state_dict()`` without its milestones, a ``collections.Counter`` (not a plain
    container: fedepic.checkpoint) that the config gives anyway: a resumed ``fit`` builds its
    scheduler from the same ``train.milestones`` and ``load_state_dict`` keeps them (it updates the
    fields it is given; a checkpoint of an earlier version that holds them sets the same Counter)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "milestones"}


def round_lr(cfg: Any, round_: int, base: Optional[float] = None) -> float:
    """The step schedule of ``train.milestones`` read in cumulative local epochs, fixed within a round
    (in rounds under dsgd / dsgt and the server's per-step protocol, whose ``clients.local_epochs`` is
    1), starting from ``base`` (None: ``train.lr``)."""
    done = (round_ - 1) * cfg.clients.local_epochs
    start = cfg.train.lr if base is None else base
    return start * cfg.train.gamma ** sum(1 for m in cfg.train.milestones if done >= m)


def ema_momentum_(momentum: torch.Tensor, gradient: torch.Tensor, beta: float, *,
                  scratch: bool = False) -> torch.Tensor:
    """The client momentum of the one-step protocols, in place: ``m <- beta m + (1 - beta) g``.

    Karimireddy, He, Jaggi, "Learning from history for Byzantine robust optimization", ICML 2021
    (https://arxiv.org/abs/2012.10333), Algorithm 2: "m_i,t = (1 - beta) g_i(x_t-1) + beta m_i,t-1"
    (their beta is this one; m_i starts at 0: the caller passes zeros). The server's per-step protocol
    (``fedepic.client_work.per_step_results``) and decentralized dsgd (``fedepic.peer_node``, the
    stacked rows of ``fedepic.peer_stacked``) all update their momenta here, with
    beta = ``train.client_momentum``.

    Rounded as ``beta * m + (1 - beta) * g`` is: each product rounded, then the sum. ``add_`` with
    ``alpha = 1 - beta`` would fuse the second product into the sum where the CPU has FMA (one
    rounding fewer) and move the last bits. ``scratch``: ``gradient`` may be overwritten with
    ``(1 - beta) g`` (saves a temporary when the caller is done with it). Cost: O(D) per row, no
    allocation with ``scratch``. Returns ``momentum``.

    >>> m = torch.tensor([1.0, 0.0])
    >>> ema_momentum_(m, torch.tensor([3.0, 2.0]), 0.5)
    tensor([2., 1.])
    >>> m
    tensor([2., 1.])
    """
    scaled = gradient.mul_(1.0 - beta) if scratch else gradient * (1.0 - beta)
    return momentum.mul_(beta).add_(scaled)


def client_momentum_(momentum: torch.Tensor, gradient: torch.Tensor, beta: float, form: str = "ema", *,
                     scratch: bool = False) -> torch.Tensor:
    """The client momentum of the one-step protocols in the form ``train.client_momentum_form`` names,
    in place; returns ``momentum`` (m starts at 0: the caller passes zeros).

    - ``ema``: ``m <- beta m + (1 - beta) g`` (:func:`ema_momentum_`, Karimireddy, He, Jaggi, ICML 2021).
    - ``heavy_ball``: ``m <- beta m + g``, undamped (Polyak, "Some methods of speeding up the convergence
      of iteration methods", USSR Comput. Math. Math. Phys. 4(5), 1964): the form of the EPFL codes that
      fedepic/reproduce/PROTOCOLS.md replays, "``param_state["momentum_buffer"].mul_(self.momentum)
      .add_(p.grad)``" with the first buffer "``torch.clone(p.grad)``" (ClippedGossip's
      codes/worker.py:141-152); from m = 0 the first step gives m = g, the same first buffer. Rounded as
      ``beta * m + g`` is (no fused multiply-add). ``scratch`` is accepted and leaves ``gradient`` alone.

    The two take the same steps when the heavy ball's lr is (1 - beta) times the EMA's: heavy-ball
    m_t = EMA m_t / (1 - beta) exactly in real arithmetic. Cost: O(D) per row.

    >>> client_momentum_(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0]), 0.5, "heavy_ball")
    tensor([3.5000, 2.0000])
    >>> client_momentum_(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0]), 0.5, "ema")
    tensor([2., 1.])
    """
    if form == "ema":
        return ema_momentum_(momentum, gradient, beta, scratch=scratch)
    if form == "heavy_ball":
        return momentum.mul_(beta).add_(gradient)
    raise ValueError(f"unknown client momentum form {form!r}; valid: {', '.join(CLIENT_MOMENTUM_FORMS)}")
