"""ByzFL's half of benchmarks/byzfl_compare.py; it runs in a throw-away venv holding only torch,
torchvision and byzfl (the compare script makes it), never in fedepic's.

    python byzfl_side.py split --data DIR --out split.npz [--honest 10] [--byzantine 2] [--seed 0]
    python byzfl_side.py train --data DIR --row alie_tm [--steps 800] [--seed 0] --results DIR

``split`` writes ByzFL's own Dirichlet(0.5) split of MNIST's training set, made the way
``byzfl.benchmark.train.start_training`` makes it (``set_random_seed(data_distribution_seed)``, the
MNIST load, ``random_split`` with size_train_set 1.0, ``DataDistributor(...).split_data()``), as
fedepic's ``data.partition=rows`` file: client_0 .. client_{honest-1} with their rows, then one empty
array per Byzantine client. ``train`` times ``start_training`` itself for one row and prints one
JSON line: the wall time of the call, and the final test accuracy ByzFL wrote.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# the rows of the side-by-side benchmark, in ByzFL's terms: (attack, f, aggregator, pre-aggregators)
ROWS = {
    "none_avg": ("NoAttack", 0, "Average", []),  # ByzFL refuses f > 0 without an attack: 10 honest clients only
    "alie_tm": ("ALittleIsEnough", 2, "TrMean", []),  # tau 1.5 (ByzFL's default)
    "signflip_median": ("SignFlipping", 2, "Median", []),
    "ipm_tm_clip_nnm": ("InnerProductManipulation", 2, "TrMean", ["Clipping", "NNM"]),  # tau 2.0, c 2.0
}


def write_split(data: str, out: str, honest: int, byzantine: int, seed: int, alpha: float) -> None:
    from byzfl import DataDistributor
    from byzfl.utils.misc import set_random_seed
    from torch import Tensor
    from torch.utils.data import random_split
    from torchvision import datasets

    set_random_seed(seed)
    dataset = datasets.MNIST(root=data, train=True, download=False, transform=None)
    dataset.targets = Tensor(dataset.targets).long()
    train, _ = random_split(dataset, [len(dataset), 0])
    loaders = DataDistributor({"data_distribution_name": "dirichlet_niid", "distribution_parameter": alpha,
                               "nb_honest": honest, "data_loader": train, "batch_size": 25}).split_data()
    parts = {f"client_{k}": np.asarray(loader.dataset.indices, dtype=np.int64) for k, loader in enumerate(loaders)}
    parts.update({f"client_{honest + b}": np.zeros(0, dtype=np.int64) for b in range(byzantine)})
    np.savez(out, **parts)


def train_row(data: str, row: str, steps: int, seed: int, results: str, eval_every: int) -> dict:
    from byzfl.benchmark.train import start_training

    attack, f, aggregator, pre = ROWS[row]
    params = {
        "benchmark_config": {"device": "cpu", "training_seed": seed, "data_distribution_seed": seed,
                             "nb_honest_clients": 10, "f": f, "tolerated_f": f, "nb_workers": 10 + f,
                             "size_train_set": 1.0,
                             "data_distribution": {"name": "dirichlet_niid", "distribution_parameter": 0.5},
                             "training_algorithm": {"name": "DSGD", "parameters": {}}, "nb_steps": steps},
        "model": {"name": "cnn_mnist", "dataset_name": "mnist", "nb_labels": 10, "loss": "NLLLoss",
                  "learning_rate": 0.1, "learning_rate_decay": 1.0, "milestones": []},
        "aggregator": {"name": aggregator, "parameters": {"f": f}},
        "pre_aggregators": [{"name": name, "parameters": {"f": f} if name == "NNM" else {}} for name in pre],
        "honest_clients": {"momentum": 0.9, "weight_decay": 1e-4, "batch_size": 25},
        "attack": {"name": attack, "parameters": {}},
        "evaluation_and_results": {"evaluation_delta": eval_every, "batch_size_evaluation": 128,
                                   "evaluate_on_test": True, "store_per_client_metrics": False,
                                   "store_models": False, "data_folder": data, "results_directory": results},
    }
    started = time.perf_counter()
    start_training(params)  # its results land under ``results`` (one folder per row: the caller's)
    seconds = time.perf_counter() - started
    files = list(Path(results).glob(f"**/test_accuracy_tr_seed_{seed}_dd_seed_{seed}.txt"))
    if len(files) != 1:
        raise SystemExit(f"expected one test-accuracy file of ByzFL under {results}, found {len(files)}")
    values = [float(v) for v in files[0].read_text().replace(",", " ").split()]
    return {"row": row, "seconds": seconds, "final_accuracy": values[-1], "evaluations": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split")
    split.add_argument("--data", required=True)
    split.add_argument("--out", required=True)
    split.add_argument("--honest", type=int, default=10)
    split.add_argument("--byzantine", type=int, default=2)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--alpha", type=float, default=0.5)
    train = sub.add_parser("train")
    train.add_argument("--data", required=True)
    train.add_argument("--row", choices=sorted(ROWS), required=True)
    train.add_argument("--steps", type=int, default=800)
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--results", required=True)
    args = parser.parse_args()
    if args.command == "split":
        write_split(args.data, args.out, args.honest, args.byzantine, args.seed, args.alpha)
    else:
        print(json.dumps(train_row(args.data, args.row, args.steps, args.seed, args.results, args.eval_every)))


if __name__ == "__main__":
    main()
