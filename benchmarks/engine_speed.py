"""engine=local against engine=ray on one config, in one run, with the workload's compute estimate.

    python benchmarks/engine_speed.py [--config noniid.yaml] [key=value ...]

Runs ``python -m fedepic.simulate config=CONFIG engine=ray`` and then ``engine=local`` (the same
overrides, one after the other, never together), and prints one JSON line: each engine's wall time
(the whole process: start-up, data, every member), the ratio ray / local, the largest difference of
the comparison table's accuracy columns between the engines (points), and the compute estimate of
the workload. Target (issue: engine and per-step protocol): local at least 5x faster on noniid.yaml,
the tables within 0.5 points.

Compute estimate, per member, for the decentralized mode with an all-parameter model (mlp, cnn):
training ``6 P`` FLOPs per row and epoch (forward 2P, backward 4P; the multiply-adds of the
parameters, activations and the optimizer left out) over every active node's rows, local epochs and
rounds; evaluation ``2 P`` per test image per benign node and evaluated round (the attack-success
pass and local EPIC's proxies left out). P counts the parameters. An estimate of the work, not a
measurement. Beside it, the ceiling (``benchmarks/ceiling.py``): the machine's best float32 matrix
product, measured in this run, and so the least seconds the workload could take here and the largest
speed-up over the Ray run that any engine could reach. A tighter estimate, ``kernel_floor``: the
run's training and evaluation timed with eager torch kernels alone (``benchmarks/ceiling.py``), so
``ray_seconds / kernel_floor`` estimates the largest speed-up an eager engine could reach before
start-up, data, exchange and figures, which both engines also pay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
ACCURACY_COLUMNS = ("mean_accuracy", "worst_accuracy", "benign_label_accuracy", "clean_accuracy", "exclusive_accuracy",
                    "final_accuracy", "best_accuracy")


def run(config: str, engine: str, overrides: list[str], out: Path) -> tuple[float, Path]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedepic.simulate", f"config={config}", f"engine={engine}",
                           f"output_dir={out}", "progress=false", *overrides], capture_output=True, text=True,
                          env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"engine={engine} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, Path(done.stdout.strip().splitlines()[-1])


def table(folder: Path) -> dict[str, dict]:
    import csv

    with open(folder / "comparison.csv", newline="") as handle:
        return {row["strategy"]: row for row in csv.DictReader(handle)}


def largest_gap(a: dict[str, dict], b: dict[str, dict]) -> float:
    gaps = [0.0]
    for member, row in a.items():
        for column in ACCURACY_COLUMNS:
            if row.get(column) not in (None, "") and b[member].get(column) not in (None, ""):
                gaps.append(abs(float(row[column]) - float(b[member][column])) * 100)
    return max(gaps)


@dataclass
class Workload:
    """What a run computes, read once from its folder for the estimate and the floor: its resolved
    config, data, model and each node's row count."""

    cfg: Any
    data: Any
    model: Any
    rows: list[int]
    benign_rows: list[int]


def load_workload(folder: Path) -> Workload:
    sys.path.insert(0, str(REPO))
    from fedepic.config import load_config, malicious_ids
    from fedepic.data import load_dataset
    from fedepic.models import model_for_data
    from fedepic.client_data import client_partition

    cfg = load_config(str(folder / "config.yaml"), [])
    data = load_dataset(cfg.data, cfg.seed)
    rows = [len(p) for p in client_partition(cfg, data)]
    malicious = set(malicious_ids(cfg))
    return Workload(cfg, data, model_for_data(cfg.model.name, data, 0), rows,
                    [n for i, n in enumerate(rows) if i not in malicious])


def compute_estimate(work: Workload) -> dict:
    """GFLOP of training and evaluation per member (module docstring), from the run's resolved config."""
    from fedepic.peer_node import eval_due

    cfg = work.cfg
    params = sum(p.numel() for p in work.model.parameters())
    evaluations = sum(eval_due(cfg, r) for r in range(1, cfg.rounds + 1))
    train = 6 * params * sum(work.rows) * cfg.clients.local_epochs * cfg.rounds / 1e9
    evaluation = 2 * params * len(work.data.test_y) * len(work.benign_rows) * evaluations / 1e9
    return {"parameters": params, "train_gflop": round(train, 1), "eval_gflop": round(evaluation, 1),
            "members": len(cfg.strategies), "total_gflop": round((train + evaluation) * len(cfg.strategies), 1)}


def kernel_floor(work: Workload) -> Optional[dict]:
    """An estimate of the least seconds eager torch kernels need for the run's training and evaluation,
    every overhead left out (benchmarks/ceiling.py: each node's local epochs, the faster of a loop over
    nodes and nodes stacked by row count; each benign node's forward pass over the test set), summed over
    the members, each with its own rounds, evaluated rounds and active nodes (a ``benign_graph`` rule
    such as ``upper`` leaves the malicious nodes out). Not a proof: EPIC's drops shrink some nodes'
    rows, and another layout or a compiled kernel could go somewhat lower. None where the run is not
    decentralized D-PSGD (local epochs), which is all the floor times."""
    from benchmarks.ceiling import evaluation_floor, local_epochs_floor
    from fedepic.config import member_config
    from fedepic.extensions import PEER_RULES, algorithm_has
    from fedepic.peer_node import eval_due

    cfg, data, model = work.cfg, work.data, work.model
    if cfg.mode != "decentralized" or not algorithm_has(cfg, "local_optimizer"):
        return None
    shape = tuple(data.test_x.shape[1:])
    rounds: dict[tuple, dict[str, float]] = {}  # (benign only, epochs, batch) -> seconds by layout
    evaluation = evaluation_floor(model, len(work.benign_rows), len(data.test_y), shape)
    seconds = 0.0
    for entry in cfg.strategies:
        rule, member = member_config(cfg, entry)
        t, benign_only = member.train, PEER_RULES.has(rule, "benign_graph")
        key = (benign_only, member.clients.local_epochs, t.batch_size)
        if key not in rounds:
            rounds[key] = local_epochs_floor(model, work.benign_rows if benign_only else work.rows, t.batch_size,
                                             member.clients.local_epochs, t.lr, t.momentum, t.weight_decay,
                                             t.nesterov, shape, data.num_classes)
        evaluations = sum(eval_due(member, r) for r in range(1, member.rounds + 1))
        seconds += member.rounds * min(rounds[key].values()) + evaluations * evaluation
    return {"round_train_seconds": {f"{'benign' if b else 'all'} nodes, {e} epochs, batch {n}":
                                    {layout: round(v, 4) for layout, v in by_layout.items()}
                                    for (b, e, n), by_layout in rounds.items()},
            "evaluation_seconds": round(evaluation, 4), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="noniid.yaml")
    parser.add_argument("--out", default="runs/engine-speed")
    args, overrides = parser.parse_known_args()
    out = Path(args.out)
    sys.path.insert(0, str(REPO))
    from benchmarks.ceiling import ceiling, gemm_peak_gflops

    peak = gemm_peak_gflops()  # before the runs, with nothing of ours running beside it
    ray_seconds, ray_folder = run(args.config, "ray", overrides, out)
    local_seconds, local_folder = run(args.config, "local", overrides, out)
    work = load_workload(local_folder)  # after the runs: the run's own resolved config
    estimate = compute_estimate(work)
    gap = largest_gap(table(local_folder), table(ray_folder))
    floor = kernel_floor(work)
    print(json.dumps({
        "benchmark": "engine_speed", "config": args.config, "overrides": overrides, "cpus": os.cpu_count(),
        "ray_seconds": round(ray_seconds, 1), "local_seconds": round(local_seconds, 1),
        "speedup": round(ray_seconds / local_seconds, 2), "largest_accuracy_gap_points": round(gap, 2),
        "local_gflop_per_second": round(estimate["total_gflop"] / local_seconds, 1), "compute": estimate,
        "gemm_peak_gflops": round(peak, 1), "ceiling": ceiling(estimate["total_gflop"], peak, ray_seconds),
        "kernel_floor": floor and {**floor, "seconds": round(floor["seconds"], 2),  # unrounded in the ratio
                                   "max_possible_speedup": round(ray_seconds / floor["seconds"], 2)},
        "load_average": os.getloadavg(),
        "targets_hold": {"speed_5x": ray_seconds / local_seconds >= 5.0, "table_0.5_points": gap <= 0.5},
    }))


if __name__ == "__main__":
    main()
