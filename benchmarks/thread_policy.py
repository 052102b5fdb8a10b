"""The in-process engine on a shared machine: OpenMP's wait policy and torch's thread count, quiet and
under background load, in one run.

    python benchmarks/thread_policy.py [--rounds 40] [--load 2] [--repeats 1]

The workload is ByzFL's benchmark row ALIE + trimmed mean (benchmarks/byzfl_compare.py: cnn_mnist,
12 clients, per-step protocol, batch 25) for ``--rounds`` steps with ``engine=local``, on a fixed
random split of MNIST (no ByzFL needed). Each setting runs as its own ``python -m fedepic.simulate``
process: OMP_WAIT_POLICY unset (libgomp's default: spin a while at each barrier, then sleep) and
passive (fedepic's default, see fedepic/__init__.py), each with ``train.threads`` 1 and 2; first with nothing else started here, then
beside ``--load`` busy processes at nice 19 (the situation of a shared machine). Settings take turns,
so a change of the machine's own load falls on all of them alike. Prints one JSON line: per setting
and load the wall seconds of the member (``summary.json``), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# (OMP_WAIT_POLICY, train.threads); "" hands the child an empty value, which libgomp reads as unset (its
# own default: spin a while at each barrier, then sleep) and fedepic's setdefault leaves alone
SETTINGS = {"default-2": ("", 2), "passive-2": ("PASSIVE", 2), "default-1": ("", 1), "passive-1": ("PASSIVE", 1)}


def split(path: Path) -> None:
    rows = np.random.default_rng(0).permutation(60_000)
    np.savez(path, **{f"client_{k}": rows[5000 * k:5000 * (k + 1)] if k < 10 else np.zeros(0, dtype=np.int64)
                      for k in range(12)})


def member_seconds(policy: str, threads: int, rounds: int, split_file: Path, out: Path) -> float:
    args = ["mode=federated", "engine=local", "progress=false", "seed=0", "data.name=mnist", "data.partition=rows",
            f"data.partition_file={split_file}", "model.name=cnn_mnist", "server.protocol=per_step", "train.lr=0.1",
            "train.client_momentum=0.9", "server.weight_decay=1e-4", "train.batch_size=25", "checkpoint_every=0",
            f"rounds={rounds}", f"train.eval_every={rounds}", "clients.count=12", "clients.malicious_ids=[10,11]",
            "attack.model=alie", "attack.alie_z=-1.5", "strategies=[fedtrimmedavg]", "defense.trim=2",
            f"train.threads={threads}", f"output_dir={out}", f"name={(policy or 'default').lower()}-{threads}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "OMP_WAIT_POLICY": policy})
    done = subprocess.run([sys.executable, "-m", "fedepic.simulate", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    folder = Path(done.stdout.strip().splitlines()[-1])
    return float(json.loads((folder / "fedtrimmedavg" / "summary.json").read_text())["seconds"])


def busy(count: int) -> list[subprocess.Popen]:
    """``count`` processes spinning on one core each, at nice 19."""
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--load", type=int, default=2, help="busy background processes in the loaded half")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="thread-policy-"))
    split_file = work / "split.npz"
    split(split_file)
    results: dict = {"quiet": {k: [] for k in SETTINGS}, "loaded": {k: [] for k in SETTINGS}}
    loads: dict = {}
    for phase in ("quiet", "loaded"):
        loads[f"{phase}_before"] = os.getloadavg()[0]
        spinners = busy(args.load) if phase == "loaded" else []
        try:
            time.sleep(1.0 if spinners else 0.0)
            for _ in range(args.repeats):
                for name, (policy, threads) in SETTINGS.items():
                    results[phase][name].append(round(member_seconds(policy, threads, args.rounds, split_file,
                                                                     work / phase), 2))
        finally:
            for proc in spinners:  # stopped by their own pids
                proc.kill()
                proc.wait()
        loads[f"{phase}_after"] = os.getloadavg()[0]
    print(json.dumps({"benchmark": "thread_policy", "rounds": args.rounds, "background": args.load,
                      "cpus": os.cpu_count(), "seconds": results, "load_average": loads}))


if __name__ == "__main__":
    main()
