"""1,000 decentralized nodes in process: wall time and peak memory of configs/scale_dfl.yaml, in one run.

    python benchmarks/scale_dfl.py [--config scale_dfl.yaml] [--compare-rounds 1] [key=value ...]

Runs ``python -m fedepic.simulate config=CONFIG`` (engine=local, decentralized.algorithm=dsgd: the
stacked engine of fedepic/peer_stacked.py) in a child process and prints one JSON line: the
child's wall time (start-up, data, every round), its peak resident memory (``ru_maxrss``), the mean
seconds of a round with and without evaluation, the final mean accuracy, and the compute estimate.
Then, with ``--compare-rounds N > 0``, the same config's first N rounds (none evaluated) through the
node-by-node in-process member (``tests/test_dfl_stacked.py::NodeByNodeDsgd``, one state dict per node)
in another child, for the ratio of the per-round times. Targets (issue: engine and per-step protocol): at most 300 s and 8 GB.

Compute estimate (GFLOP, an estimate of the work, not a measurement): training ``6 P`` per minibatch
row (forward 2P, backward 4P) times batch size, active nodes and rounds; evaluation ``2 P`` per test
image, benign node and evaluated round (the attack-success pass left out). P counts the parameters.
Beside it, the machine's best float32 matrix product measured in this run (``benchmarks/ceiling.py``)
and the least seconds the workload could take at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the node-by-node member for the first N rounds, in a child process of its own (its memory and
# threads apart from the stacked run's); prints the per-round seconds as one JSON list
NODE_BY_NODE = """
import json, sys
from fedepic.config import load_config
from fedepic import peer_local, peer_stacked
from tests.test_dfl_stacked import NodeByNodeDsgd  # the node-by-node dsgd member lives with its test
peer_stacked.member_class = lambda cfg: NodeByNodeDsgd
cfg = load_config(sys.argv[1], sys.argv[3:] + [f"rounds={sys.argv[2]}"])
records = []
class Sink(peer_local._Collect):
    def round(self, member, record):
        records.append(record["seconds"])
from types import SimpleNamespace
from fedepic.config import malicious_ids, member_config
from fedepic.data import load_dataset
from fedepic.client_data import client_partition, partition_report
from fedepic.peer_routing import communication_graph, routing_for, run_label_roles
data = load_dataset(cfg.data, cfg.seed)
parts = client_partition(cfg, data)
roles = run_label_roles(cfg, partition_report(cfg, data, parts)["label_histograms"], data.num_classes)
rule, _ = member_config(cfg, cfg.strategies[0])
member = SimpleNamespace(name=cfg.strategies[0], strategy=cfg.strategies[0],
                         routing=routing_for(rule, communication_graph(cfg), malicious_ids(cfg),
                                             cfg.topology.mixing))
peer_local.run_local_member(cfg, member, Sink(), data, parts, roles)
print(json.dumps(records))
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO)}


def stacked_run(config: str, overrides: list[str], out: Path) -> tuple[float, int, Path]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedepic.simulate", f"config={config}", f"output_dir={out}",
                           "progress=false", *overrides], capture_output=True, text=True, env=child_env(), cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KB, the largest child so far
    return seconds, peak_kb, Path(done.stdout.strip().splitlines()[-1])


def node_by_node_rounds(config: str, rounds: int, overrides: list[str]) -> list[float]:
    done = subprocess.run([sys.executable, "-c", NODE_BY_NODE, config, str(rounds), *overrides],
                          capture_output=True, text=True, env=child_env(), cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the node-by-node rounds failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compute_estimate(folder: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from fedepic.config import load_config, malicious_ids
    from fedepic.data import load_dataset
    from fedepic.models import model_for_data
    from fedepic.peer_node import eval_due

    cfg = load_config(str(folder / "config.yaml"), [])
    data = load_dataset(cfg.data, cfg.seed)
    params = sum(p.numel() for p in model_for_data(cfg.model.name, data, 0).parameters())
    benign = cfg.clients.count - len(malicious_ids(cfg))
    evaluations = sum(eval_due(cfg, r) for r in range(1, cfg.rounds + 1))
    train = 6 * params * cfg.train.batch_size * cfg.clients.count * cfg.rounds / 1e9
    evaluation = 2 * params * len(data.test_y) * benign * evaluations / 1e9
    return {"parameters": params, "train_gflop": round(train, 1), "eval_gflop": round(evaluation, 1),
            "evaluations": evaluations, "test_images": len(data.test_y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="scale_dfl.yaml")
    parser.add_argument("--out", default="runs/scale-dfl")
    parser.add_argument("--compare-rounds", type=int, default=1)
    args, overrides = parser.parse_known_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.ceiling import ceiling, gemm_peak_gflops

    peak = gemm_peak_gflops()  # before the run, with nothing of ours beside it
    seconds, peak_kb, folder = stacked_run(args.config, overrides, Path(args.out))
    member = json.loads((folder / "summary.json").read_text())["finished"][0]
    records = [json.loads(line) for line in (folder / member / "metrics.jsonl").read_text().splitlines()]
    plain = [r["seconds"] for r in records if "mean_accuracy" not in r]
    evaluated = [r["seconds"] for r in records if "mean_accuracy" in r]
    estimate = compute_estimate(folder)
    result = {
        "benchmark": "scale_dfl", "config": args.config, "overrides": overrides, "cpus": os.cpu_count(),
        "seconds": round(seconds, 1), "peak_rss_gb": round(peak_kb / 2 ** 20, 2),
        "round_seconds": round(sum(plain) / max(len(plain), 1), 3),
        "evaluated_round_seconds": round(sum(evaluated) / max(len(evaluated), 1), 3),
        "final_mean_accuracy": records[-1].get("mean_accuracy"), "rounds": len(records), "compute": estimate,
        "gflop_per_second": round((estimate["train_gflop"] + estimate["eval_gflop"]) / seconds, 1),
        "gemm_peak_gflops": round(peak, 1),
        "ceiling": ceiling(estimate["train_gflop"] + estimate["eval_gflop"], peak),
        "load_average": os.getloadavg(),
        "targets_hold": {"300_seconds": seconds <= 300, "8_gb": peak_kb / 2 ** 20 <= 8},
    }
    if args.compare_rounds > 0:
        # the last of the N rounds evaluates (the run's end): compare the N - 1 before it, which do not
        loop = node_by_node_rounds(args.config, args.compare_rounds + 1, overrides)[:-1]
        first = [r["seconds"] for r in records[:args.compare_rounds]]
        result["node_by_node_round_seconds"] = [round(s, 2) for s in loop]
        result["stacked_round_seconds"] = [round(s, 2) for s in first]
        result["stacked_speedup_per_round"] = round(sum(loop) / sum(first), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
