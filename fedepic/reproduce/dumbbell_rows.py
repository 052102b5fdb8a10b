"""The rows each node of ClippedGossip's dumbbell trains on, as a ``data.partition=rows`` file.

Paper: Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust decentralized learning via
ClippedGossip", arXiv 2022, https://arxiv.org/abs/2202.01545 (Fig. 4, the dumbbell); code:
github.com/epfml/byzantine-robust-decentralized-optimizer (commit 5387d60). The protocol with every
quote: fedepic/reproduce/PROTOCOLS.md 1.2.

    python -m fedepic.reproduce.dumbbell_rows --split noniid --out dumbbell_noniid.npz
    python -m fedepic.reproduce.dumbbell_rows --split iid --out dumbbell_iid.npz

then (the exact-data variant of configs/reproduce/dumbbell_clippedgossip.yaml, whose comment shows it)
``data.partition=rows data.partition_file=dumbbell_noniid.npz train.sampler=in_order``.

What is replayed, step by step (``-n 20 -f 0``: 20 nodes, ranks 0-19, no Byzantine node; batch 32;
``--max-batch-size-per-epoch 30``; the MNIST training set in torchvision's order, ``dataset.targets``):

IID (``--noniid 0``): "``DecentralizedMixedSampler(noniid_percent=0, num_replicas=num_replicas,
rank=rank % num_replicas, shuffle=True, dataset=x)``" (dumbbell.py:138-145), whose ``__iter__``
(codes/sampler.py:121-165) does, with n = 60,000:

1. "``g = torch.Generator()``", "``g.manual_seed(0)``" (:125-126); "``all_indices =
   torch.randperm(len(self.dataset), generator=g).tolist()``" (:128);
2. "``iid_count = int((1 - self.noniid_percent) * len(all_indices))``", "``iid_count = iid_count -
   (iid_count % self.num_replicas)``" (:130-131): 60,000, so every row is in ``iid_indices`` and the
   non-IID list built at :135-153 is empty (its padding, :144, adds nothing: ``total_size`` = 3,000 x 20);
3. "``indices += iid_indices[self.rank: iid_count: self.num_replicas]``" (:155): rows r, r + 20, ... of
   the permutation, 3,000 per node;
4. "``g = torch.Generator()``", "``g.manual_seed(self.epoch)``", "``idx_idx = torch.randperm(len(indices),
   generator=g).tolist()``", "``indices = [indices[i] for i in idx_idx]``" (:159-163), with
   ``self.epoch`` = 0 (:40) in every epoch (step 6).

Non-IID (``--noniid 1``): "``DumbbellSampler(dataset=x, noniid_percent=args.noniid,
num_replicas=num_replicas, rank=rank, shuffle=True)``" (dumbbell.py:148-150; codes/sampler.py:237-304):

1. "``clique1_labels = list(range(nlabels // 2))``", "``clique2_labels = list(range(nlabels // 2,
   nlabels))``" (:248-249): labels 0-4 and 5-9; "``self.clique_index = int(rank >= num_replicas // 2)``"
   (:243): nodes 0-9 in clique 1, 10-19 in clique 2;
2. one generator seeded 0 (:252-253) draws four permutations in this order: the pooled rows of labels
   0-4 (each label's "``torch.nonzero(self.dataset.targets == i)``" in turn, :255-259) permuted
   (:260-261), then those of labels 5-9 (:263-269), then, after the cut of step 3, each pool again
   (:284-287);
3. "``min_size = min(len(clique1_indices), len(clique2_indices))``", "``self.num_samples = min_size //
   (self.num_replicas // 2)``", "``min_size = self.num_samples * (self.num_replicas // 2)``" and both
   pools cut to their first ``min_size`` rows (:271-277): 29,400 rows each (labels 5-9 hold 29,404);
4. "``exchanged = int((1 - self.noniid_percent) * min_size / 2)``" (:280): 0, no row crosses the bridge;
5. "``indices = clique1_indices[self.rank::self.num_replicas//2]``", or for clique 2
   "``clique2_indices[self.rank - self.num_replicas//2::self.num_replicas//2]``" (:290-294): 2,940
   rows per node; then the same epoch shuffle as IID step 4 (:298-302).

Both splits, the loader and the epochs:

6. the sampler's epoch stays 0: ``set_epoch`` is reached only "``if hasattr(trainer.workers[0],
   "sampler")``" (template.py:271-275), and the workers (``SGDMWorker``, codes/worker.py) have no
   ``sampler`` attribute (PROTOCOLS.md 1.2; inferred there from codes/worker.py:10-36 and
   codes/tasks/async_loader.py:70-72): every epoch iterates the same order;
7. the loader takes the sampler's order, "``batch_size=args.batch_size``", "``drop_last=True``"
   (template.py:411-421; codes/tasks/mnist.py:62-70), and each epoch re-creates its iterator
   ("``self.iterators = [iter(loader.dataloader) for loader in self.dataloaders]``",
   codes/tasks/async_loader.py:138-139);
8. an epoch runs "``for batch_idx in range(self.max_batches_per_epoch)``" (codes/simulator.py:158), 30
   batches (run.sh's ``--max-batch-size-per-epoch 30``): so every epoch a node trains on the first 30 x 32
   = 960 rows of its order, in that order (inferred from 6-8, as PROTOCOLS.md 1.2 says), and these 960
   rows, in that order, are what this module writes per node.

Deviations and inferences: the permutations are those of the torch installed here; the authors pinned
torch 1.8.0 (requirements.txt), and we take CPU ``torch.randperm`` under a seeded generator to give the
same permutation in both versions (inferred, not checked against torch 1.8). MNIST's rows are taken in
torchvision's order (``fedepic.data`` keeps it: ``torch.tensor(train.targets)``). The step-6 reading is
PROTOCOLS.md's inference. Python lists become int64 tensors; the padding steps of the samplers add
nothing for 60,000 rows and 20 nodes, and this module checks that instead of replaying them.

Example (hand-made labels: 8 rows, 2 nodes, one batch of 2 per epoch)::

    >>> targets = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    >>> [r.tolist() for r in iid_rows(targets, nodes=2, rows_per_node=2)]
    [[4, 7], [0, 3]]
    >>> [sorted(targets[r].tolist()) for r in noniid_rows(targets, nodes=2, rows_per_node=2)]
    [[0, 0], [1, 1]]

Cost: four or two permutations of at most 60,000 rows and one of each node's rows: well under a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

NODES = 20  # -n 20 -f 0 (run.sh, dumbbell())
BATCH_SIZE = 32  # --batch-size 32
BATCHES_PER_EPOCH = 30  # --max-batch-size-per-epoch 30
ROWS_PER_NODE = BATCH_SIZE * BATCHES_PER_EPOCH  # 960: the rows a node ever trains on (step 8)
SPLITS = ("iid", "noniid")


def _seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _permuted(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[rows[i] for i in torch.randperm(len(rows), generator=g)]`` (the samplers' reordering)."""
    return rows[torch.randperm(len(rows), generator=generator)]


def _epoch_order(rows: torch.Tensor, rows_per_node: Optional[int]) -> torch.Tensor:
    """Step 4 / :298-302 with epoch 0, then the first ``rows_per_node`` rows (steps 6-8; None: all)."""
    ordered = _permuted(rows, _seeded(0))
    return ordered if rows_per_node is None else ordered[:rows_per_node]


def iid_rows(targets: torch.Tensor, nodes: int = NODES, rows_per_node: Optional[int] = ROWS_PER_NODE
             ) -> list[torch.Tensor]:
    """Each node's rows under ``--noniid 0`` in its loader's order (module docstring, IID steps 1-4)."""
    total = len(targets)
    if total % nodes:
        raise ValueError(f"{total} rows do not split evenly among {nodes} nodes: the sampler would pad")
    everything = torch.randperm(total, generator=_seeded(0))  # step 1
    return [_epoch_order(everything[rank::nodes], rows_per_node) for rank in range(nodes)]  # steps 3-4


def noniid_rows(targets: torch.Tensor, nodes: int = NODES, rows_per_node: Optional[int] = ROWS_PER_NODE
                ) -> list[torch.Tensor]:
    """Each node's rows under ``--noniid 1`` in its loader's order (module docstring, non-IID steps 1-5)."""
    if nodes % 2:
        raise ValueError(f"the dumbbell needs an even number of nodes, got {nodes}")
    labels = int(targets.max()) + 1  # nlabels = len(self.dataset.classes): every class occurs in MNIST
    half = nodes // 2
    generator = _seeded(0)
    pools = []
    for clique_labels in (range(labels // 2), range(labels // 2, labels)):  # step 1
        pooled = torch.cat([torch.nonzero(targets == label).flatten() for label in clique_labels])
        pools.append(_permuted(pooled, generator))  # step 2, first two permutations
    per_node = min(len(p) for p in pools) // half  # step 3
    pools = [_permuted(p[:per_node * half], generator) for p in pools]  # step 3 cut; step 2, last two
    return [_epoch_order(pools[rank // half][rank % half::half], rows_per_node) for rank in range(nodes)]  # step 5


def dumbbell_rows(targets: torch.Tensor, split: str, nodes: int = NODES,
                  rows_per_node: Optional[int] = ROWS_PER_NODE) -> dict[str, np.ndarray]:
    """The ``data.partition=rows`` arrays (client_0 .. client_{nodes-1}) of ``split`` (iid | noniid)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    rows = (iid_rows if split == "iid" else noniid_rows)(targets, nodes, rows_per_node)
    return {f"client_{k}": r.numpy().astype(np.int64) for k, r in enumerate(rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedepic.reproduce.dumbbell_rows",
                                     description="Write ClippedGossip's dumbbell rows as a data.partition=rows file.")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--all-rows", action="store_true",
                        help="every row of a node in its loader's order (3,000 or 2,940), not only the 960 "
                             "it trains on")
    parser.add_argument("--data-root", default=None, help="MNIST's folder (else $FEDEPIC_DATA)")
    args = parser.parse_args(argv)
    from fedepic.config import DataConfig
    from fedepic.data import load_dataset

    data = load_dataset(DataConfig(name="mnist", root=args.data_root))
    arrays = dumbbell_rows(data.train_y, args.split, rows_per_node=None if args.all_rows else ROWS_PER_NODE)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    sizes = sorted({len(a) for a in arrays.values()})
    print(f"wrote {args.out}: {len(arrays)} nodes, {'/'.join(map(str, sizes))} rows each ({args.split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
