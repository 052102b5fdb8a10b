"""One-off, run with ByzFL's interpreter (byzfl==0.0.11, e.g. /tmp/byzfl-venv/bin/python; see
benchmarks/byzfl_compare.py --help): ByzFL's Optimal_ALittleIsEnough and Optimal_InnerProductManipulation
on seeded float64 stacks of 7 honest vectors, f = 2 Byzantine copies, 20 evaluations, against TrMean(2)
after NNM(2), Median and TrMean(2); inputs and outputs saved to tests/data/byzfl_attacks.json
(tests/test_literature_attacks.py compares fedepic's optimal_alie / optimal_ipm with them).

    /tmp/byzfl-venv/bin/python tests/data/make_byzfl_attacks.py > tests/data/byzfl_attacks.json
"""
import json
import sys

import byzfl
import numpy as np
import torch

cases = []
for seed in range(3):
    x = np.random.default_rng(seed).normal(size=(7, 5)) + 0.5
    for rule, agg, pre in (("trmean_nnm", byzfl.TrMean(f=2), [byzfl.NNM(f=2)]), ("median", byzfl.Median(), []),
                           ("trmean", byzfl.TrMean(f=2), [])):
        for attack, cls in (("alie", byzfl.Optimal_ALittleIsEnough), ("ipm", byzfl.Optimal_InnerProductManipulation)):
            out = cls(agg, pre_agg_list=pre, f=2, evals=20)(torch.tensor(x))
            cases.append({"seed": seed, "rule": rule, "attack": attack, "x": x.tolist(), "out": out.tolist()})
json.dump({"byzfl": byzfl.__version__ if hasattr(byzfl, "__version__") else "0.0.11", "cases": cases}, sys.stdout)
