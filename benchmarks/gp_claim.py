"""Gradient Purification's claim on configs/gp_claim.yaml (or gp_harm.yaml): every member, 3 seeds, the claim check.

    python benchmarks/gp_claim.py [--config gp_claim] [--seeds 0 1 2] [--workers 2] [--table FILE] [key=value ...]

Runs each (seed, member) of the config in process (``fedepic.peer_local``, the engine=local
path) in a pool of ``--workers`` processes (one torch thread each), and prints one JSON line: the wall
time, and per member the mean and spread (max - min) over seeds of, at the end and after rounds
T_d - 1, T_d, T_d + 1 and T_d + 10 of the oracle round T_d: exclusive_accuracy (labels 7/8), attack_success (6 <-> 9), clean_accuracy
(labels 0-5), mean_accuracy. Then the claim check of the issue, for GP on the gradient state against
exclude-from-the-start and upper at each T_d:
  (a) GP's final 7/8 accuracy beats exclude's by more than the seeds' spread (of either),
  (b) GP's final attack success is within 2 points of exclude's,
  (c) GP's final mean accuracy is at least upper's.

With a config whose ``sweep:`` has attack axes (configs/gp_harm.yaml: the six attacks, attack.data and
attack.model zipped), every member runs under each attack, and gossip, when a member, also runs under
no attack (``attack.data=none attack.model=none``) as the harm criterion's reference; the JSON line then holds,
per attack and averaged over the attacks (each seed's figure averaged over the attacks, then mean and
spread over the seeds): the members' figures, the harm check (gossip's benign_label_accuracy at least
``HARM_DROP`` below no-attack gossip's, 3 seeds' means) and the claim check. Only label_flip has an
attack success, so (b) is n/a (null) under a model attack and ``holds`` is then (a) and (c).
A member no malicious message reaches (``upper``, ``exclude_start``: :func:`attack_free`) runs under
the first attack only and stands for the others. ``--records DIR`` saves each run's records and reads
them back on a later call (a run interrupted, or a second call adding members, redoes nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = ("exclusive_accuracy", "attack_success", "clean_accuracy", "benign_label_accuracy", "mean_accuracy")
NO_ATTACK = ("none", "none")  # (attack.data, attack.model): the harm criterion's reference run of gossip
# the harm criterion (docs/results/gp-claim.md, fixed before any GP figure): gossip's benign_label_accuracy
# at least this far below no-attack gossip's (3 seeds' means, round 200)
HARM_DROP = 0.05

Attack = tuple[str, str]  # (attack.data, attack.model)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def attack_name(attack: Attack) -> str:
    """The attack's name: the model attack's, else the data attack's ("none" for no attack)."""
    data, model = attack
    return model if model != "none" else data


def attack_list(cfg) -> list[Attack]:
    """The (attack.data, attack.model) pairs to run: the config's ``sweep:`` attack axes (zipped when
    ``sweep.zip`` pairs them, else every combination), or the config's one attack when it has none."""
    from itertools import product

    from fedepic.config import sweep_section

    settings, axes = sweep_section(cfg)
    data, model = axes.get("attack.data"), axes.get("attack.model")
    if data is None and model is None:
        return [(cfg.attack.data, cfg.attack.model)]
    data, model = data or [cfg.attack.data], model or [cfg.attack.model]
    if any({"attack.data", "attack.model"} <= set(group) for group in settings.zip):
        return list(zip(data, model))
    return list(product(data, model))


def attack_overrides(attack: Attack | None) -> list[str]:
    return [] if attack is None else [f"attack.data={attack[0]}", f"attack.model={attack[1]}"]


def run_one(job: tuple[str, int, Attack | None, str, list[str], Path | None]
            ) -> tuple[int, Attack | None, str, list[dict], float]:
    """One (seed, attack, member) run in process; with a records folder, its records are read from there
    when an earlier call saved the same run (the member's resolved config: 0 s), else saved there."""
    config, seed, attack, member, overrides, folder = job
    from fedepic.config import load_config, member_config, to_yaml

    cfg = load_config(config, [f"seed={seed}", "progress=false", *overrides, *attack_overrides(attack)])
    # the digest is the member's own config (its variant merged), less what no single run reads: the
    # sweep section (the attack list, the seeds) and the other members
    rule, member_cfg = member_config(cfg, member)
    resolved = rule + to_yaml(dataclasses.replace(member_cfg, sweep={}, strategies=[member], variants={}))
    saved = None if folder is None else folder / record_file(config, seed, attack, member, resolved)
    if saved is not None and saved.exists():
        return seed, attack, member, json.loads(saved.read_text()), 0.0
    import torch

    torch.set_num_threads(1)
    from fedepic.peer_local import run_sequential

    started = time.perf_counter()
    records = run_sequential(cfg, member)
    seconds = time.perf_counter() - started
    if saved is not None:
        saved.write_text(json.dumps(records))
    return seed, attack, member, records, seconds


def record_file(config: str, seed: int, attack: Attack | None, member: str, resolved: str) -> str:
    """The records file of one run: its config's name, seed, attack and member, and a digest of the
    resolved config (``resolved``: its YAML), so that an edited config file or other overrides never
    read back another run's records."""
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return f"{config}-seed{seed}-{'config' if attack is None else '_'.join(attack)}-{member}-{digest}.json"


def attack_free(cfg, member: str) -> bool:
    """Whether no malicious message ever reaches the member's benign nodes, so that the attack cannot
    change its run: ``upper`` (the router drops every benign-malicious edge) and an oracle exclusion
    from the first round (``exclude_start``). tests/test_gp_claim_bench.py checks both equal under two attacks."""
    from fedepic.config import member_config
    from fedepic.extensions import PEER_RULES, oracle_round

    rule, member_cfg = member_config(cfg, member)
    return PEER_RULES.has(rule, "benign_graph") or (rule == "exclude" and oracle_round(member_cfg) == 1)


def reused(records: list[dict], ran_under: Attack, attack: Attack) -> list[dict]:
    """An attack-free member's records under ``ran_under`` standing for ``attack``: the figures that
    depend on the data attack's labels (attack_success; clean_accuracy, whose labels exclude the
    flipped ones) are left out when the two data attacks differ."""
    if ran_under[0] == attack[0]:
        return records
    return [{k: v for k, v in r.items() if k not in ("attack_success", "clean_accuracy")} for r in records]


def oracle_round_of(member: str, overrides: list[str], config: str = "gp_claim"):
    from fedepic.config import load_config, member_config
    from fedepic.extensions import oracle_round

    return oracle_round(member_config(load_config(config, overrides), member)[1])


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
    parser.add_argument("--config", default="gp_claim", help="gp_claim, or gp_harm (the six attacks)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", type=Path, default=None, help="also write a Markdown table here")
    parser.add_argument("--records", type=Path, default=None,
                        help="a folder: each run's records are saved there, and read back by a later call")
    args, overrides = parser.parse_known_args()
    from fedepic.config import load_config

    cfg = load_config(args.config, overrides)
    members = list(cfg.strategies)
    attacks = attack_list(cfg) if cfg.sweep else None
    if args.records:
        args.records.mkdir(parents=True, exist_ok=True)
    job = lambda s, a, m: (args.config, s, a, m, overrides, args.records)  # noqa: E731
    if attacks is None:
        jobs = [job(s, None, m) for s in args.seeds for m in members]
    else:  # no-attack gossip first (the harm criterion's reference, with gossip); attack-free members: the first attack
        free = {m for m in members if attack_free(cfg, m)}
        reference = [(NO_ATTACK, ["gossip"])] if "gossip" in members else []
        jobs = [job(s, a, m) for a, ms in [*reference, *((a, members) for a in attacks)]
                for s in args.seeds for m in ms if m not in free or a in (NO_ATTACK, attacks[0])]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - started
    by = {(s, a, m): recs for s, a, m, recs, _ in results}
    if attacks is not None:
        for s, a, m in [(s, a, m) for s in args.seeds for a in attacks[1:] for m in free]:
            by[(s, a, m)] = reused(by[(s, attacks[0], m)], attacks[0], a)
    out: dict = {"benchmark": "gp_claim", "config": args.config, "seeds": args.seeds, "rounds": cfg.rounds,
                 "wall_s": round(wall, 1), "run_s_total": round(sum(r[4] for r in results), 1),
                 "workers": args.workers, "cpus": os.cpu_count(), "overrides": overrides, "runs": len(jobs),
                 "runs_read_back": sum(r[4] == 0.0 for r in results)}
    if attacks is not None:
        out["attack_free_members"] = sorted(free)
    if attacks is None:
        out["members"] = {m: member_summary({s: by[(s, None, m)] for s in args.seeds},
                                            oracle_round_of(m, overrides, args.config), cfg.rounds) for m in members}
        out["claim"] = claim_check(out["members"])
    else:
        out.update(per_attack(by, attacks, members, args.seeds, cfg.rounds,
                              {m: oracle_round_of(m, overrides, args.config) for m in members}))
    print(json.dumps(out))
    if args.table:
        args.table.write_text(markdown(out) if attacks is None else harm_markdown(out))


def member_summary(runs: dict[int, list[dict]], td, rounds: int) -> dict:
    """One member's figures over the seeds (``runs``: seed -> records): at the end and, for an oracle
    round ``td`` > 1, around it."""
    # before: after round T_d - 1; after: after T_d + 1, the first step with a purified tracker (round
    # T_d's step still used the tracker sent before the purification); later: T_d + 10
    points = {"end": rounds, **({"before_td": td - 1, "at_td": td, "after_td": td + 1, "later_td": td + 10}
                                if td and td > 1 else {})}
    last = [recs[-1] for recs in runs.values()]
    detection = {k: summarise([r.get(f"detection_{k}") for r in last]) for k in ("precision", "recall")}
    return {"oracle_round": td, "detection": detection, **{
        name: {k: summarise([at(recs, r)[k] for recs in runs.values()]) for k in METRICS}
        for name, r in points.items()}}


def per_attack(by: dict, attacks: list[Attack], members: list[str], seeds: list[int], rounds: int,
               tds: dict) -> dict:
    """The figures, harm check and claim check per attack, then averaged over the attacks."""
    reference = (member_summary({s: by[(s, NO_ATTACK, "gossip")] for s in seeds}, None, rounds)
                 if "gossip" in members else None)
    result: dict = {"attacks": {}, "no_attack_gossip": reference}
    for a in attacks:
        ms = {m: member_summary({s: by[(s, a, m)] for s in seeds}, tds[m], rounds) for m in members}
        result["attacks"][attack_name(a)] = {"members": ms, "harm": harm_check(ms.get("gossip"), reference),
                                             "claim": claim_check(ms)}
    averaged = {m: member_summary({s: averaged_records([by[(s, a, m)] for a in attacks]) for s in seeds}, None, rounds)
                for m in members}
    result["average"] = {"members": averaged, "harm": harm_check(averaged.get("gossip"), reference),
                         "claim": claim_check(averaged)}
    return result


def averaged_records(runs: list[list[dict]]) -> list[dict]:
    """One seed's evaluated records averaged over the attacks' runs, round by round (a metric a run
    lacks, e.g. attack_success under a model attack, is averaged over the runs that have it)."""
    rounds = sorted(set.intersection(*({r["round"] for r in recs if "mean_accuracy" in r} for recs in runs)))
    out = []
    for round_ in rounds:
        figures = [at(recs, round_) for recs in runs]
        lasts = [recs[-1] for recs in runs]
        record = {"round": round_, **{k: mean_of([f[k] for f in figures]) for k in METRICS}}
        if round_ == rounds[-1]:
            record.update({f"detection_{k}": mean_of([r.get(f"detection_{k}") for r in lasts])
                           for k in ("precision", "recall")})
        out.append(record)
    return out


def mean_of(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def harm_check(gossip: dict | None, reference: dict | None) -> dict | None:
    """The harm criterion: gossip's benign_label_accuracy at round 200 (3 seeds' mean) at least
    ``HARM_DROP`` below no-attack gossip's."""
    if gossip is None or reference is None:
        return None
    attacked = gossip["end"]["benign_label_accuracy"]["mean"]
    clean = reference["end"]["benign_label_accuracy"]["mean"]
    return {"no_attack": clean, "attacked": attacked, "drop": clean - attacked, "harms": clean - attacked >= HARM_DROP}


def claim_check(members: dict) -> dict:
    ex, up = members.get("exclude_start", {}).get("end"), members.get("upper", {}).get("end")
    checks = {}
    for name, m in members.items():
        if not name.startswith("gp_grad") or ex is None or up is None:
            continue
        gp = m["end"]
        margin = max(gp["exclusive_accuracy"]["spread"], ex["exclusive_accuracy"]["spread"])
        asr = gp["attack_success"]["mean"], ex["attack_success"]["mean"]
        checks[name] = {
            "a_78_beats_exclude": gp["exclusive_accuracy"]["mean"] - ex["exclusive_accuracy"]["mean"] > margin,
            # n/a (None) without an attack success: a model attack has none
            "b_asr_within_2pts": None if None in asr else abs(asr[0] - asr[1]) <= 0.02,
            "c_mean_at_least_upper": gp["mean_accuracy"]["mean"] >= up["mean_accuracy"]["mean"],
        }
        checks[name]["holds"] = all(v for v in checks[name].values() if v is not None)
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


def harm_markdown(out: dict) -> str:
    """Three tables for the attacks' run: the harm criterion, the members' figures, the claim check."""
    def cell(s: dict) -> str:
        return "n/a" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['spread'] / 2:.1f}"

    def mark(v) -> str:
        return "n/a" if v is None else ("yes" if v else "no")

    count = len(out["attacks"])
    sections = {**out["attacks"], f"average of the {NUMBER_WORDS.get(count, count)}": out["average"]}
    lines = []
    if out["no_attack_gossip"] is not None:
        ref = out["no_attack_gossip"]["end"]
        lines += [f"No-attack gossip: benign labels {cell(ref['benign_label_accuracy'])}, 7/8 "
                  f"{cell(ref['exclusive_accuracy'])}, mean {cell(ref['mean_accuracy'])}.", "",
                  "| attack | gossip benign labels | drop from no attack | harm criterion met | gossip ASR 6/9 |",
                  "|---|---|---|---|---|"]
        for name, sec in sections.items():
            g, h = sec["members"]["gossip"]["end"], sec["harm"]
            lines.append(f"| {name} | {cell(g['benign_label_accuracy'])} | {100 * h['drop']:.1f} | "
                         f"{mark(h['harms'])} | {cell(g['attack_success'])} |")
        lines.append("")
    lines += ["| attack | member | T_d | 7/8 end | ASR 6/9 end | benign labels end | mean end | detection P / R |",
              "|---|---|---|---|---|---|---|---|"]
    for name, sec in sections.items():
        for member, m in sec["members"].items():
            e = m["end"]
            lines.append(f"| {name} | {member} | {m['oracle_round'] or '-'} | {cell(e['exclusive_accuracy'])} | "
                         f"{cell(e['attack_success'])} | {cell(e['benign_label_accuracy'])} | "
                         f"{cell(e['mean_accuracy'])} | {cell(m['detection']['precision'])} / "
                         f"{cell(m['detection']['recall'])} |")
    lines += ["", "| attack | member | (a) 7/8 beats exclude_start | (b) ASR within 2 pts | (c) mean >= upper | holds |",
              "|---|---|---|---|---|---|"]
    for name, sec in sections.items():
        for member, c in sec["claim"].items():
            lines.append(f"| {name} | {member} | {mark(c['a_78_beats_exclude'])} | {mark(c['b_asr_within_2pts'])} | "
                         f"{mark(c['c_mean_at_least_upper'])} | {mark(c['holds'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
