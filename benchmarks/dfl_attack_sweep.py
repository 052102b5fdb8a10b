"""Every strategy of a decentralized config under each of the six attacks, in-process.

Uses ``simulations.dfl_sequential.run_sequential`` (the node and router functions of the Flower run,
without Flower or Ray; tests/test_decentralized.py checks that both give the same numbers), so the
whole sweep takes minutes on 2 cores. Prints one JSON line: for each attack and strategy, the
final-round mean and worst benign accuracy, accuracy on the labels only benign nodes hold and on those
only malicious nodes hold, and (GP / exclude) the detection precision and recall per round.

    python benchmarks/dfl_attack_sweep.py [--config noniid.yaml] [--attacks label_flip,gaussian] \
        [--markdown] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fedepic.config import load_config
from fedepic.data import load_dataset
from fedepic.outputs import markdown_table
from simulations.dfl_sequential import run_sequential

ATTACKS = {  # attack name -> config overrides (label_flip keeps the config's flip map)
    "label_flip": ["attack.data=label_flip", "attack.model=none"],
    "sign_flip": ["attack.data=none", "attack.model=sign_flip"],
    "gaussian": ["attack.data=none", "attack.model=gaussian"],
    "alie": ["attack.data=none", "attack.model=alie"],
    "ipm": ["attack.data=none", "attack.model=ipm"],
    "minmax": ["attack.data=none", "attack.model=minmax"],
}


def summarise(records: list[dict]) -> dict:
    last = records[-1]
    row = {
        "mean": round(100 * last["mean_accuracy"], 1),
        "worst": round(100 * last["worst_accuracy"], 1),
        "benign_labels": round(100 * last["benign_label_accuracy"], 1),
        "exclusive_labels": round(100 * last["exclusive_accuracy"], 1),
        "per_class": [round(100 * v, 1) for v in last["per_class"]],
    }
    if "detection_precision" in last:
        row["precision_by_round"] = [round(r["detection_precision"], 2) for r in records]
        row["recall_by_round"] = [round(r["detection_recall"], 2) for r in records]
    return row


def markdown(results: dict, strategies: list[str], key: str) -> str:
    """One row per attack, one column per strategy, cells ``results[attack][strategy][key]``."""
    rows = [{"attack": attack, **{s: by_strategy[s][key] for s in strategies}} for attack, by_strategy in results.items()]
    return markdown_table(rows, ["attack", *strategies])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="noniid.yaml")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--strategies", default=None, help="comma list (default: the config's)")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)  # as in the Ray workers, so float sums match the Flower run
    started = time.perf_counter()
    results: dict[str, dict] = {}
    strategies: list[str] = []
    for attack in args.attacks.split(","):
        cfg = load_config(args.config, [*ATTACKS[attack], *overrides])
        strategies = args.strategies.split(",") if args.strategies else list(cfg.strategies)
        data = load_dataset(cfg.data, cfg.seed)
        results[attack] = {s: summarise(run_sequential(cfg, s, data)) for s in strategies}
    print(json.dumps({"bench": "dfl_attack_sweep", "config": args.config, "overrides": overrides,
                      "seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
                      "results": results}))
    if args.markdown:
        for key in ("mean", "worst", "benign_labels", "exclusive_labels"):
            print(f"\n{key}\n{markdown(results, strategies, key)}")


if __name__ == "__main__":
    main()
