"""A sweep two ways in one run: one cell at a time in one process, and as Ray tasks on a local Ray
instance of ``--workers`` workers; the targets issue 16 set for the shipped grid when it had 144 cells (it has 294 now).

    python benchmarks/sweep_speed.py [--config sweep_dfl_attacks.yaml] [--workers 2] [--out DIR] [key=value ...]

Runs ``python -m fedepic.simulate config=CONFIG sweep.parallel=false`` and then the same with
``sweep.parallel=true ray.num_cpus=WORKERS`` (the same overrides, one after the other, never together,
each a whole process into a fresh folder under ``--out``), and prints one JSON line: each way's wall
seconds (start-up, planning, every cell, the aggregation), the ratio sequential / parallel, the load
averages (1, 5, 15 min) before and after each, the number of cells, whether the two sweeps'
aggregates are identical apart from the timing metric ``seconds``, and the targets of issue 16: the
parallel way within 900 s, and at least 1.7x faster than the sequential one.

Both ways run every cell with the same torch threads (the cell's ``train.threads``, from
``sweep.cell_cpus`` = 1), so they compute the same numbers; the sequential way is the issue's baseline,
"the same grid run one cell at a time in one process".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_sweep(config: str, way: list[str], overrides: list[str], out: Path) -> dict:
    """One whole ``fedepic.simulate`` process; its wall time, loads and folder."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedepic.simulate", f"config={config}", f"output_dir={out}",
                           "progress=false", *way, *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(way)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "folder": str(folder)}


def aggregates(folder: str) -> dict:
    summary = json.loads((Path(folder) / "summary.json").read_text())
    assert summary["status"] == "completed", f"{folder}: {summary['status']}"
    return {metric: rows for metric, rows in summary["aggregates"].items() if metric != "seconds"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sweep_dfl_attacks.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/sweep-speed")
    args, overrides = parser.parse_known_args()
    out = Path(args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")  # fresh: a sweep resumes what it finds
    sequential = run_sweep(args.config, ["sweep.parallel=false"], overrides, out / "sequential")
    parallel = run_sweep(args.config, ["sweep.parallel=true", f"ray.num_cpus={args.workers}"], overrides,
                         out / "parallel")
    cells = len(json.loads((Path(parallel["folder"]) / "summary.json").read_text())["cells"])
    ratio = sequential["seconds"] / parallel["seconds"]
    print(json.dumps({
        "benchmark": "sweep_speed", "config": args.config, "overrides": overrides, "cells": cells,
        "workers": args.workers, "cpus": os.cpu_count(), "sequential": sequential, "parallel": parallel,
        "speedup": round(ratio, 2), "same_aggregates": aggregates(sequential["folder"]) == aggregates(parallel["folder"]),
        "targets_hold": {"parallel_within_900_s": parallel["seconds"] <= 900, "speedup_1.7x": ratio >= 1.7},
    }))


if __name__ == "__main__":
    main()
