"""Gradient Purification's claim on configs/gp_claim.yaml: every member, 3 seeds, the claim check.

    python benchmarks/gp_claim.py [--seeds 0 1 2] [--workers 2] [--table FILE] [key=value ...]

Runs each (seed, member) of the config in process (``fedepic.peer_local``, the engine=local
path) in a pool of ``--workers`` processes (one torch thread each), and prints one JSON line: the wall
time, and per member the mean and spread (max - min) over seeds of, at the end and after rounds
T_d - 1, T_d, T_d + 1 and T_d + 10 of the oracle round T_d: exclusive_accuracy (labels 7/8), attack_success (6 <-> 9), clean_accuracy
(labels 0-5), mean_accuracy. Then the claim check of the issue, for GP on the gradient state against
exclude-from-the-start and upper at each T_d:
  (a) GP's final 7/8 accuracy beats exclude's by more than the seeds' spread (of either),
  (b) GP's final attack success is within 2 points of exclude's,
  (c) GP's final mean accuracy is at least upper's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = ("exclusive_accuracy", "attack_success", "clean_accuracy", "mean_accuracy")


def run_one(job: tuple[int, str, list[str]]) -> tuple[int, str, list[dict], float]:
    import torch

    torch.set_num_threads(1)
    from fedepic.config import load_config
    from fedepic.peer_local import run_sequential

    seed, member, overrides = job
    cfg = load_config("gp_claim", [f"seed={seed}", "progress=false", *overrides])
    started = time.perf_counter()
    records = run_sequential(cfg, member)
    return seed, member, records, time.perf_counter() - started


def oracle_round_of(member: str, overrides: list[str]):
    from fedepic.config import load_config, member_config
    from fedepic.extensions import oracle_round

    return oracle_round(member_config(load_config("gp_claim", overrides), member)[1])


def at(records: list[dict], round_: int) -> dict:
    rec = next((r for r in records if r["round"] == round_ and "mean_accuracy" in r), {})
    return {k: rec.get(k) for k in METRICS}


def summarise(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "spread": None}
    return {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", type=Path, default=None, help="also write a Markdown table here")
    args, overrides = parser.parse_known_args()
    from fedepic.config import load_config

    cfg = load_config("gp_claim", overrides)
    members = list(cfg.strategies)
    jobs = [(s, m, overrides) for s in args.seeds for m in members]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - started
    by = {(s, m): recs for s, m, recs, _ in results}
    out: dict = {"benchmark": "gp_claim", "seeds": args.seeds, "rounds": cfg.rounds, "wall_s": round(wall, 1),
                 "run_s_total": round(sum(r[3] for r in results), 1), "workers": args.workers,
                 "cpus": os.cpu_count(), "overrides": overrides, "members": {}}
    for m in members:
        td = oracle_round_of(m, overrides)
        # before: after round T_d - 1; after: after T_d + 1, the first step with a purified tracker (round
        # T_d's step still used the tracker sent before the purification); later: T_d + 10
        points = {"end": cfg.rounds, **({"before_td": td - 1, "at_td": td, "after_td": td + 1, "later_td": td + 10}
                                        if td and td > 1 else {})}
        last = [by[(s, m)][-1] for s in args.seeds]
        detection = {k: summarise([r.get(f"detection_{k}") for r in last]) for k in ("precision", "recall")}
        out["members"][m] = {"oracle_round": td, "detection": detection, **{
            name: {k: summarise([at(by[(s, m)], r)[k] for s in args.seeds]) for k in METRICS}
            for name, r in points.items()}}
    out["claim"] = claim_check(out["members"])
    print(json.dumps(out))
    if args.table:
        args.table.write_text(markdown(out))


def claim_check(members: dict) -> dict:
    ex, up = members.get("exclude_start", {}).get("end"), members.get("upper", {}).get("end")
    checks = {}
    for name, m in members.items():
        if not name.startswith("gp_grad") or ex is None or up is None:
            continue
        gp = m["end"]
        margin = max(gp["exclusive_accuracy"]["spread"], ex["exclusive_accuracy"]["spread"])
        checks[name] = {
            "a_78_beats_exclude": gp["exclusive_accuracy"]["mean"] - ex["exclusive_accuracy"]["mean"] > margin,
            "b_asr_within_2pts": abs(gp["attack_success"]["mean"] - ex["attack_success"]["mean"]) <= 0.02,
            "c_mean_at_least_upper": gp["mean_accuracy"]["mean"] >= up["mean_accuracy"]["mean"],
        }
        checks[name]["holds"] = all(checks[name].values())
    return checks


def markdown(out: dict) -> str:
    def cell(s: dict) -> str:  # mean over seeds, ± half their range
        return "n/a" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['spread'] / 2:.1f}"

    lines = ["| member | T_d | 7/8 end | ASR 6/9 end | 0-5 end | mean end | 7/8 at T_d-1 / T_d+1 / T_d+10 | "
             "ASR at T_d-1 / T_d+1 / T_d+10 | detection P / R |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in out["members"].items():
        e = m["end"]
        around = "-"
        asr = "-"
        if "before_td" in m:
            around = " / ".join(cell(m[p]["exclusive_accuracy"]) for p in ("before_td", "after_td", "later_td"))
            asr = " / ".join(cell(m[p]["attack_success"]) for p in ("before_td", "after_td", "later_td"))
        lines.append(f"| {name} | {m['oracle_round'] or '-'} | {cell(e['exclusive_accuracy'])} | "
                     f"{cell(e['attack_success'])} | {cell(e['clean_accuracy'])} | {cell(e['mean_accuracy'])} | "
                     f"{around} | {asr} | {cell(m['detection']['precision'])} / {cell(m['detection']['recall'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
