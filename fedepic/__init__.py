"""fedepic: defending federated learning against data poisoning (EPIC, Witches' Brew, Gradient Purification).

The core package is pure torch/torchvision/numpy; it never imports flwr or ray.

OpenMP threads sleep instead of spinning between parallel regions (``OMP_WAIT_POLICY=PASSIVE``,
unless the environment sets it): on a machine whose cores other processes share, torch's spinning
intra-op threads wait on each other at every barrier, and a run slowed down several-fold
(benchmarks/thread_policy.py measures it). Set here, before torch loads its OpenMP runtime; it has no
effect in a process that imported torch first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
