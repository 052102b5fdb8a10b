"""Flower + Ray wall time against an in-process sequential loop doing exactly the same work, in one run.

Both sides run the same round engine (`fedepic.server_rounds`, through `simulations.server_app.serve`:
the same client work `fedepic.client_work.local_train`, the same server-side evaluation); the
sequential side is the in-process backend (`fedepic.local_backend`: each client in turn, the tensor
FedAvg), the Flower side sends each client's work as a Message to its ClientApp and aggregates with
Flower's FedAvg. The Flower side is `run_federated` on a local Ray cluster with one actor per core
(Ray gives each actor OMP_NUM_THREADS=1). Default workload: 50 clients on synthetic 28x28 data, the
small CNN, 40 rows and one local epoch per client, 3 rounds.

Torch threads in this process (`--threads`, default 1) apply to the sequential clients and to the
server-side evaluation of both sides. One thread is the fair sequential baseline on a small shared
machine: with 2 intra-op threads and other load on the 2 cores, the small CNN's local training was
measured 20x slower per client (0.60 s vs 0.027 s), OpenMP threads spinning against each other.

Reported (one JSON line on stdout):
- ratio: Flower total wall time / sequential total (Flower's includes Ray start and shutdown);
- ratio_steady: mean round time from round 2 on (actors warm), Flower / sequential;
- per_round_overhead_s: that Flower round time minus the sequential one (negative = Flower faster,
  because two actors train in parallel);
- per_round_overhead_vs_ideal_parallel_s: Flower round time minus (the clients' own training time
  spread perfectly over the actors + the server-side work of the sequential round): what Flower,
  Ray and message passing add per round;
- flower_startup_s: Flower total minus the sum of its rounds (Ray start, actors' imports and data
  loading in the warm-up query before round 1, shutdown);
- data_ship: cost of shipping the dataset in the ClientApp closure (pickled with every message) vs
  loading it once per actor from the uint8 cache (what client_app.py does).

    .venv/bin/python benchmarks/bench_flower_overhead.py [--clients 50] [--rounds 3] [--rows 40] [--model cnn]
        [--ray-address HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from fedepic.config import RunConfig, load_config  # noqa: E402
from fedepic.data import load_dataset  # noqa: E402
from simulations.flower_runtime import quiet_flower  # noqa: E402
from simulations.federated import run_federated  # noqa: E402
from simulations.server_app import open_run, serve  # noqa: E402


def bench_config(args: argparse.Namespace, out: Path, name: str) -> RunConfig:
    cluster = [f"ray.address={args.ray_address}"] if args.ray_address else [f"ray.num_cpus={os.cpu_count()}"]
    return load_config(None, [
        "mode=federated", f"name={name}", f"output_dir={out}", "progress=false", "data.name=synthetic",
        f"data.synthetic_train={args.clients * args.rows}", "data.synthetic_test=500", f"model.name={args.model}",
        f"clients.count={args.clients}", f"rounds={args.rounds}", "strategies=[fedavg]", "train.batch_size=32",
        *cluster,
    ])


def round_seconds(folder: Path) -> list[tuple[float, float]]:
    """Per round: (wall seconds, summed client training seconds as the clients measured them)."""
    records = [json.loads(line) for line in (folder / "fedavg" / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["seconds"], sum(c["train_seconds"] for c in r["clients"])) for r in records]


def sequential(args: argparse.Namespace, out: Path) -> tuple[float, list[tuple[float, float]]]:
    cfg = bench_config(args, out, "sequential")
    started = time.perf_counter()
    load_dataset(cfg.data, cfg.seed)
    with open_run(cfg) as life:
        serve(None, cfg, life, threading.Event())
    total = time.perf_counter() - started
    return total, round_seconds(life.path)


def flower(args: argparse.Namespace, out: Path) -> tuple[float, list[tuple[float, float]]]:
    cfg = bench_config(args, out, "flower")
    started = time.perf_counter()
    folder = run_federated(cfg)
    return time.perf_counter() - started, round_seconds(folder)


def data_shipping() -> dict:
    """MNIST-sized data (60k x 1x28x28 uint8): pickling it per message vs one cached load per actor."""
    cfg = load_config(None, ["data.name=mnist", "data.download=false"])
    try:
        started = time.perf_counter()
        data = load_dataset(cfg.data, cfg.seed)
        load_s = time.perf_counter() - started
    except ValueError:
        return {"note": "MNIST not available"}
    started = time.perf_counter()
    blob = pickle.dumps(data, protocol=5)
    pickle.loads(blob)
    return {"pickle_roundtrip_s_per_message": time.perf_counter() - started, "pickle_mb": len(blob) / 2**20,
            "cached_load_s_per_actor": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40, help="training rows per client")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--ray-address", default=None,
                        help="attach the Flower side to this running cluster (e.g. one `ray start --head` "
                             "with one CPU per core) instead of starting a local one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_flower()
    out = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    try:
        seq_total, seq_rounds = sequential(args, out)
        flw_total, flw_rounds = flower(args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steady = slice(1, None) if args.rounds > 1 else slice(None)
    mean = lambda pairs, i: sum(p[i] for p in pairs) / len(pairs)  # noqa: E731
    seq_round, flw_round = mean(seq_rounds[steady], 0), mean(flw_rounds[steady], 0)
    actors = os.cpu_count() or 1  # ray.num_cpus = cores, one CPU per client actor
    print(json.dumps({
        "benchmark": "flower_overhead", "clients": args.clients, "rounds": args.rounds, "rows_per_client": args.rows,
        "model": args.model, "cpus": os.cpu_count(), "threads": args.threads, "ray_address": args.ray_address,
        "sequential_s": round(seq_total, 2), "flower_s": round(flw_total, 2), "ratio": round(flw_total / seq_total, 3),
        "sequential_round_s": round(seq_round, 3), "flower_round_s": round(flw_round, 3),
        "ratio_steady": round(flw_round / seq_round, 3), "per_round_overhead_s": round(flw_round - seq_round, 3),
        "flower_client_train_s_per_round": round(mean(flw_rounds[steady], 1), 3),
        "per_round_overhead_vs_ideal_parallel_s": round(flw_round - mean(flw_rounds[steady], 1) / actors
                                                        - (seq_round - mean(seq_rounds[steady], 1)), 3),
        "flower_first_round_s": round(flw_rounds[0][0], 2),
        "flower_startup_s": round(flw_total - sum(p[0] for p in flw_rounds), 2), "data_ship": data_shipping(),
    }))


if __name__ == "__main__":
    main()
