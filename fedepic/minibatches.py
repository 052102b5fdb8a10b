"""Which rows make a node's (or a per-step client's) minibatch: ``train.sampler``.

The one-step protocols (``server.protocol=per_step``, ``decentralized.algorithm=dsgd|dsgt``) take one
minibatch gradient of ``train.batch_size`` = B rows per step. Two ways to pick its rows among a node's
n rows (positions 0 .. n-1 of its ``ClientData``):

- ``replacement`` (the default): B positions drawn uniformly with replacement from all n, by a torch
  generator seeded with the step's seed (seed, round, node); the same as before this key existed.
- ``in_order``: the rows in their stored order, B at a time, wrapping around: batch t holds positions
  ``(t B + j) mod n`` for j = 0 .. B-1, i.e. the rows repeated without end and cut into batches of B.
  With ``train.batches_per_epoch`` = K an epoch is the first K batches and then starts over: batch t is
  batch ``t mod K`` of that stream. The stored order is the order of a ``data.partition=rows`` file as
  saved (every other partition keeps a client's rows in ascending row index).

``in_order`` with K is what an unshuffled torch DataLoader (``drop_last=True``) stopped after K batches
per epoch gives, e.g. ClippedGossip's dumbbell (``--max-batch-size-per-epoch 30``, a loader that is never
re-shuffled; fedepic/reproduce/PROTOCOLS.md 1.2); K = n // B gives a whole ``drop_last`` epoch. Without K
the stream wraps across epochs (a node with n = 5 and B = 2 trains on rows 0 1, 2 3, 4 0, 1 2, ...),
which a ``drop_last`` loader does not (it would skip row 4): set K for that loader.

Batch t is a pure function of t (no state): the caller numbers its steps from 0 (dsgd: round - 1;
dsgt: round, its tracker's first gradient being round 0; per_step: server round - 1). A step a node
misses (``failures``) skips its batch.

Example::

    >>> in_order_rows(5, 2, 2).tolist(), in_order_rows(5, 2, 3).tolist()
    ([4, 0], [1, 2])
    >>> in_order_rows(8, 2, 3, batches_per_epoch=2).tolist()
    [2, 3]
    >>> with_replacement_rows(5, 3, seed=0).tolist()
    [4, 4, 3]

Cost: O(B) per batch for both samplers.
"""

from __future__ import annotations

from typing import Optional

import torch

SAMPLERS = ("replacement", "in_order")


def _check_rows(rows: int) -> None:
    if rows <= 0:
        raise ValueError("a one-step gradient needs at least one training row (this client or node has none)")


def with_replacement_rows(rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """``batch_size`` positions in [0, rows), drawn with replacement from a generator seeded by ``seed``."""
    _check_rows(rows)
    return torch.randint(rows, (batch_size,), generator=torch.Generator().manual_seed(seed))


def in_order_rows(rows: int, batch_size: int, step: int, batches_per_epoch: Optional[int] = None) -> torch.Tensor:
    """Batch ``step`` (from 0) of the positions 0 .. rows-1 repeated without end, ``batch_size`` at a
    time; with ``batches_per_epoch`` = K, batch ``step mod K`` (module docstring)."""
    _check_rows(rows)
    if step < 0:
        raise ValueError(f"in-order batches are numbered from 0, got step {step}")
    position = step if batches_per_epoch is None else step % batches_per_epoch
    start = position * batch_size
    return (torch.arange(start, start + batch_size, dtype=torch.int64) % rows)


def minibatch_positions(sampler: str, rows: int, batch_size: int, seed: int, step: int,
                        batches_per_epoch: Optional[int] = None) -> torch.Tensor:
    """The positions of one step's minibatch under ``sampler`` (``train.sampler``): ``seed`` drives
    ``replacement``, ``step`` (from 0) and ``batches_per_epoch`` drive ``in_order``."""
    if sampler == "replacement":
        return with_replacement_rows(rows, batch_size, seed)
    if sampler == "in_order":
        return in_order_rows(rows, batch_size, step, batches_per_epoch)
    raise ValueError(f"unknown train.sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
