"""fedepic against ByzFL on ByzFL's own benchmark scenario, side by side, on this machine, in one run.

    python benchmarks/byzfl_compare.py [--steps 800] [--rows none_avg,alie_tm,...] [--markdown]

The scenario (ByzFL 0.0.11's benchmark defaults where the issue does not fix a value):
- MNIST, all 60,000 training rows (ByzFL's size_train_set 1.0: no validation split), 10 honest
  clients with ByzFL's own Dirichlet(0.5) split made under its data_distribution_seed 0
  (benchmarks/byzfl_side.py ``split``), and 2 Byzantine clients holding no rows;
- ByzFL's ``cnn_mnist`` (fedepic: ``model.name=cnn_mnist``, the same layers);
- the per-step protocol: batch 25, client momentum 0.9 (m <- 0.9 m + 0.1 g), server SGD with lr 0.1
  and weight decay 1e-4 on the aggregate, 800 steps, test accuracy every 50 steps.

Rows, and what each side runs:

| row | ByzFL | fedepic |
|---|---|---|
| none_avg | NoAttack, Average, n = 10 (ByzFL refuses f > 0 without an attack) | fedavg, 10 clients |
| alie_tm | ALittleIsEnough (mean + 1.5 std, ddof 1), TrMean f = 2 | alie with attack.alie_z=-1.5 (fedepic's ALIE is mean - z std), fedtrimmedavg trim 2 |
| signflip_median | SignFlipping (-mean of the honest vectors), Median | ipm with attack.ipm_eps=1 (the same vector; fedepic's sign_flip flips the attacker's own update, and these attackers hold no rows), fedmedian |
| ipm_tm_clip_nnm | InnerProductManipulation tau 2, [Clipping c = 2, NNM f = 2], TrMean f = 2 | ipm eps 2, pre_aggregation [clip, nnm], clip_radius 2, trim 2 |

Known differences: ByzFL draws minibatches without replacement (a shuffled loader per client, a
short last batch per epoch), fedepic with replacement; the initial weights differ (each side's own
seeding); ByzFL normalises with MNIST's usual (0.1307, 0.3081), fedepic with statistics of its own
training images; ByzFL evaluates at step 0 too (17 evaluations), fedepic at steps 50, 100, ..., 800 (16).

Timing: ByzFL's is the wall time of its ``start_training`` call (data loading included); fedepic's is
the wall time of the whole ``python -m fedepic.simulate`` process (interpreter start, imports, data
loading included), so the ratio is conservative for fedepic. Both run with the machine's torch
threads, one after the other, never together. ByzFL is installed from the registry into a throw-away
venv (``--venv``, made on first use: torch 2.14.1 and torchvision 0.29.1 as fedepic's lock, then byzfl
0.0.11). Prints one JSON line: per row both sides' seconds and final accuracies, the speed-up
(ByzFL / fedepic) and the accuracy gap, and whether the targets hold (at least 1.6x without an attack,
2.5x on the rows with a robust aggregator; accuracy within 2 points).

Beside each row, the compute ceiling (``benchmarks/ceiling.py``): the FLOPs both sides must spend
(the 10 honest clients' forward and backward passes on 25 images per step, and ByzFL's 17
evaluations on the 10,000 test images, as torch's FlopCounterMode counts them for ``cnn_mnist``), the
least seconds they take at this machine's best float32 matrix product (measured in this run), and so
the largest speed-up over ByzFL that any implementation could reach here; and the tighter kernel
floor (``ceiling.kernel_floor``): the same gradients and evaluations timed with torch kernels alone (no
messages, no aggregation, no data loading), the best of an eager loop of per-client backward passes,
vmap, and fedepic's batched per-client kernel (``fedepic/grouped_gradients.py``), so the floor is
tighter wherever the batched kernel beats eager torch; and that floor plus the row's own aggregation
as ``engine=local`` runs it (``rule_seconds``: the pre-aggregation and the tensor rule on a stack of
the row's size, best of 5, times the steps).
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

REPO = Path(__file__).resolve().parent.parent
# ByzFL runs with the caller's environment: importing fedepic (the ceiling's models) sets
# OMP_WAIT_POLICY=PASSIVE in this process (fedepic/__init__.py), which is fedepic's choice, not ByzFL's
CALLER_ENV = dict(os.environ)
SIDE = REPO / "benchmarks" / "byzfl_side.py"
BYZFL = "byzfl==0.0.11"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")

COMMON = ["mode=federated", "engine=local", "progress=false", "seed=0", "data.name=mnist", "data.partition=rows",
          "model.name=cnn_mnist", "server.protocol=per_step", "train.lr=0.1", "train.client_momentum=0.9",
          "server.weight_decay=1e-4", "train.batch_size=25", "checkpoint_every=0"]
FEDEPIC_ROWS = {
    "none_avg": ["clients.count=10", "strategies=[fedavg]"],
    "alie_tm": ["clients.count=12", "clients.malicious_ids=[10,11]", "attack.model=alie", "attack.alie_z=-1.5",
                "strategies=[fedtrimmedavg]", "defense.trim=2"],
    "signflip_median": ["clients.count=12", "clients.malicious_ids=[10,11]", "attack.model=ipm", "attack.ipm_eps=1.0",
                        "strategies=[fedmedian]"],
    "ipm_tm_clip_nnm": ["clients.count=12", "clients.malicious_ids=[10,11]", "attack.model=ipm", "attack.ipm_eps=2.0",
                        "strategies=[fedtrimmedavg]", "defense.trim=2", "defense.pre_aggregation=[clip,nnm]",
                        "defense.clip_radius=2.0", "defense.byzantine=2"],
}
ROBUST = {"alie_tm", "signflip_median", "ipm_tm_clip_nnm"}


def byzfl_python(venv: Path) -> Path:
    """The throw-away venv's python, made (and ByzFL installed) when missing."""
    python, ready = venv / "bin" / "python", venv / ".fedepic-ready"
    if not ready.exists():  # a venv whose install failed half-way is installed into again
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in (TORCH, (BYZFL,)):
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        ready.write_text(BYZFL + "\n")
    return python


def run_json(cmd: list[str], env: dict) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fedepic_row(row: str, split: Path, steps: int, eval_every: int, out: Path, env: dict) -> dict:
    args = [*COMMON, f"data.partition_file={split}", f"rounds={steps}", f"train.eval_every={eval_every}",
            f"output_dir={out}", f"name={row}", *FEDEPIC_ROWS[row]]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedepic.simulate", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fedepic row {row} failed:\n{done.stderr[-3000:]}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    member = json.loads(next(folder.glob("*/summary.json")).read_text())
    return {"seconds": seconds, "member_seconds": member["seconds"], "final_accuracy": member["final_accuracy"],
            "evaluations": len(member["curves"]["accuracy"])}


def scenario_gflop(steps: int, evaluations: int, honest: int = 10, batch: int = 25, test_images: int = 10_000) -> float:
    """FLOPs (GFLOP) of the scenario's gradients and evaluations for ``cnn_mnist`` on 28x28 MNIST."""
    import torch

    from benchmarks.ceiling import model_flops
    from fedepic.models import build_classifier

    model = build_classifier("cnn_mnist", 10, 1, 28, [0.1307], [0.3081])
    images = torch.rand(batch, 1, 28, 28)
    train = model_flops(model, images, backward=True) / batch
    evaluate = model_flops(model, images, backward=False) / batch
    return (steps * honest * batch * train + evaluations * test_images * evaluate) / 1e9


def scenario_kernel_floor(steps: int, evaluations: int) -> dict:
    """The least seconds eager torch kernels need for the scenario's gradients and evaluations here
    (benchmarks/ceiling.py ``kernel_floor``): what no implementation in eager torch can go below."""
    from benchmarks.ceiling import kernel_floor
    from fedepic.models import build_classifier

    return kernel_floor(build_classifier("cnn_mnist", 10, 1, 28, [0.1307], [0.3081]), 10, 25, steps, evaluations,
                        10_000)


def rule_seconds(row: str, repeats: int = 5) -> float:
    """Best seconds of one aggregation of the row as ``engine=local`` runs it: the pre-aggregation steps
    and the tensor rule (``SERVER_RULES``, through ``strategies.aggregate.aggregate``) on a stack of as
    many ``cnn_mnist`` updates as the row's rounds have."""
    import torch

    from fedepic.config import load_config
    from fedepic.extensions import SERVER_RULES, expected_clients, pre_aggregation_steps
    from fedepic.models import build_classifier
    from strategies.aggregate import aggregate

    common = [item for item in COMMON if not item.startswith("data.partition=")]
    cfg = load_config(None, [*common, *FEDEPIC_ROWS[row], "data.partition=dirichlet"])
    rule = SERVER_RULES.build(cfg.strategies[0], cfg)
    steps = pre_aggregation_steps(cfg)
    size = sum(p.numel() for p in build_classifier("cnn_mnist", 10, 1, 28, [0.1307], [0.3081]).parameters())
    stack = torch.randn(expected_clients(cfg), size, generator=torch.Generator().manual_seed(0)) * 1e-2
    weights = torch.full((stack.shape[0],), 25.0, dtype=torch.float64)

    def once() -> None:
        rows = stack
        for step in steps:
            rows = step(rows)
        aggregate(rule, rows, None, weights, {})

    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--rows", default=",".join(FEDEPIC_ROWS))
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "fedepic-byzfl-venv"))
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(FEDEPIC_ROWS))
    if unknown:
        raise SystemExit(f"unknown --rows {', '.join(unknown)}; choose from {', '.join(FEDEPIC_ROWS)}")
    data = os.environ.get("FEDEPIC_DATA")
    if not data or not (Path(data) / "MNIST" / "raw").is_dir():
        raise SystemExit("set FEDEPIC_DATA to a folder holding MNIST/raw (../shared/data/unpack.sh DIR prints one)")
    env = {**CALLER_ENV, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO)}
    sys.path.insert(0, str(REPO))
    from benchmarks.ceiling import ceiling, gemm_peak_gflops

    peak = gemm_peak_gflops()  # before the runs, with nothing of ours beside it
    work_gflop = scenario_gflop(args.steps, args.steps // args.eval_every + 1)
    floor = scenario_kernel_floor(args.steps, args.steps // args.eval_every + 1)
    seconds_per_rule = {row: rule_seconds(row) for row in rows}
    python = byzfl_python(Path(args.venv))
    work = Path(tempfile.mkdtemp(prefix="byzfl-compare-"))
    splits = {}
    for byzantine in (0, 2):
        splits[byzantine] = work / f"split_{byzantine}.npz"
        subprocess.run([str(python), str(SIDE), "split", "--data", data, "--out", str(splits[byzantine]),
                        "--byzantine", str(byzantine)], check=True, env=env)
    results = {}
    for row in rows:
        theirs = run_json([str(python), str(SIDE), "train", "--data", data, "--row", row, "--steps", str(args.steps),
                           "--eval-every", str(args.eval_every), "--results", str(work / "byzfl" / row)], env)
        ours = fedepic_row(row, splits[0 if row == "none_avg" else 2], args.steps, args.eval_every, work / "fedepic", env)
        speedup = theirs["seconds"] / ours["seconds"]
        gap = abs(ours["final_accuracy"] - theirs["final_accuracy"]) * 100
        results[row] = {"byzfl": theirs, "fedepic": ours, "speedup": round(speedup, 2), "accuracy_gap_points": round(gap, 2),
                        "speed_target": 2.5 if row in ROBUST else 1.6,
                        "ceiling": ceiling(work_gflop, peak, theirs["seconds"]),
                        "kernel_floor_seconds": floor["seconds"],
                        "max_possible_speedup_kernels": round(theirs["seconds"] / floor["seconds"], 2),
                        "rule_seconds_per_step": round(seconds_per_rule[row], 5),
                        "max_possible_speedup_with_rule": round(
                            theirs["seconds"] / (floor["seconds"] + args.steps * seconds_per_rule[row]), 2)}
    holds = {"speed": all(r["speedup"] >= r["speed_target"] for r in results.values()),
             "accuracy": all(r["accuracy_gap_points"] <= 2.0 for r in results.values())}
    import torch

    print(json.dumps({"benchmark": "byzfl_compare", "steps": args.steps, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "gemm_peak_gflops": round(peak, 1), "rows": results,
                      "targets_hold": holds, "load_average": os.getloadavg()}))
    if args.markdown:
        print("| row | ByzFL s | fedepic s (process / training) | speed-up | target | most possible (GEMM peak / "
              "kernel floor / kernel floor + the rule) | ByzFL acc | fedepic acc |", file=sys.stderr)
        print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
        for row, r in results.items():
            b, f = r["byzfl"], r["fedepic"]
            print(f"| {row} | {b['seconds']:.1f} | {f['seconds']:.1f} / {f['member_seconds']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['speed_target']:g}x | {r['ceiling']['max_possible_speedup']:.2f}x / "
                  f"{r['max_possible_speedup_kernels']:.2f}x / {r['max_possible_speedup_with_rule']:.2f}x | "
                  f"{100 * b['final_accuracy']:.2f} | "
                  f"{100 * f['final_accuracy']:.2f} |",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
