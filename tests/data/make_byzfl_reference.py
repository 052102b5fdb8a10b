"""ByzFL's outputs on seeded random stacks, saved to tests/data/byzfl_reference.pt for tests/test_byzfl_rules.py.

Runs in a venv holding torch, numpy and byzfl only, never fedepic (it imports nothing of fedepic):

    /tmp/byzfl-venv/bin/python tests/data/make_byzfl_reference.py [OUT]

(benchmarks/byzfl_compare.py's ``byzfl_python`` makes such a venv; the reference was made with byzfl 0.0.11.)
Every stack is float64 numpy, which ByzFL keeps in float64 (torch input it casts to float32). Each case
is a dict: ``rule``, its parameters, ``stack`` [n, D] (or ``stacks`` for a rule with memory), and
ByzFL's ``out``. Rows are Gaussian, some (the ``outliers``) scaled by 50 and shifted, so that clipping,
the nearest-neighbour choices and the Weiszfeld weights all have something to do.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import numpy as np
import torch
import byzfl

SIZES = [(4, 1, 3), (7, 2, 5), (10, 3, 17), (15, 4, 40), (12, 5, 8)]  # n, f, D


def stack(rng: np.random.Generator, n: int, d: int, outliers: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    if outliers:
        rows = rng.choice(n, size=outliers, replace=False)
        x[rows] = 50.0 * x[rows] + 20.0
    return x


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def cases() -> list[dict]:
    rng = np.random.default_rng(2024)
    out: list[dict] = []
    for n, f, d in SIZES:
        for tau, iters in ((0.5, 1), (5.0, 3), (100.0, 1)):  # CC: two calls, the centre carried over
            agg = byzfl.CenteredClipping(L=iters, tau=tau)
            xs = [stack(rng, n, d, f), stack(rng, n, d, f)]
            outs = [np.array(agg(x.copy()), dtype=np.float64) for x in xs]
            out.append({"rule": "centered_clipping", "tau": tau, "iterations": iters,
                        "stacks": [t(x) for x in xs], "outs": [t(o) for o in outs]})
        for nu, iters in ((0.1, 3), (1e-6, 20), (2.0, 1)):
            x = stack(rng, n, d, f)
            out.append({"rule": "geometric_median", "nu": nu, "iterations": iters, "stack": t(x),
                        "out": t(byzfl.GeometricMedian(nu=nu, T=iters)(x.copy()))})
        for idx in (0, n - 1, n // 2):
            ff = min(f, (n - 1) // 2)
            x = stack(rng, n, d, f)
            out.append({"rule": "monna", "f": ff, "idx": idx, "stack": t(x),
                        "out": t(byzfl.MoNNA(f=ff, idx=idx)(x.copy()))})
        for s in (1, 2, 3):
            x = stack(rng, n, d, f)
            seed = int(rng.integers(2**31))
            np.random.seed(seed)
            permuted = byzfl.Bucketing(s=1)(x.copy())  # s = 1: the permuted rows themselves
            perm = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in permuted]
            np.random.seed(seed)
            out.append({"rule": "bucketing", "s": s, "stack": t(x), "permutation": torch.tensor(perm),
                        "out": t(byzfl.Bucketing(s=s)(x.copy()))})
        for ff in sorted({0, 1, f, n // 2}):
            x = stack(rng, n, d, min(f, n // 2))
            out.append({"rule": "arc", "f": ff, "stack": t(x), "out": t(byzfl.ARC(f=ff)(x.copy()))})
    return out


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "tests/data/byzfl_reference.pt"
    torch.save({"byzfl": version("byzfl"), "cases": cases()}, path)
    print(path)
