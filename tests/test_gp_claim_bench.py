"""benchmarks/gp_claim.py: its claim check is the issue's three conditions, and it runs end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("gp_claim_bench", REPO / "benchmarks" / "gp_claim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _end(e78: float, spread: float, asr: float, mean: float) -> dict:
    stat = lambda m, s=0.0: {"mean": m, "spread": s}  # noqa: E731
    return {"end": {"exclusive_accuracy": stat(e78, spread), "attack_success": stat(asr),
                    "clean_accuracy": stat(0.9), "mean_accuracy": stat(mean)}}


def test_claim_check_is_the_three_conditions():
    bench = _bench()
    members = {"exclude_start": _end(0.0, 0.02, 0.01, 0.70), "upper": _end(0.0, 0.0, 0.0, 0.64),
               "gp_grad_td20": _end(0.30, 0.05, 0.025, 0.75),  # beats exclude by 0.30 > 0.05, ASR +1.5, >= upper
               "gp_grad_td50": _end(0.04, 0.05, 0.01, 0.75),  # 0.04 is within the seeds' spread: (a) fails
               "gp_grad": _end(0.30, 0.0, 0.05, 0.60)}  # ASR 4 points over exclude's, below upper
    checks = bench.claim_check(members)
    assert checks["gp_grad_td20"]["holds"]
    assert not checks["gp_grad_td50"]["a_78_beats_exclude"] and checks["gp_grad_td50"]["b_asr_within_2pts"]
    assert checks["gp_grad"] == {"a_78_beats_exclude": True, "b_asr_within_2pts": False,
                                 "c_mean_at_least_upper": False, "holds": False}
    assert set(checks) == {"gp_grad_td20", "gp_grad_td50", "gp_grad"}  # only GP on the gradient state


def test_the_benchmark_prints_one_json_line_and_a_table(tmp_path, data_root):
    table = tmp_path / "claim.md"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gp_claim.py"), "--seeds", "0", "1", "--workers", "2",
         "--table", str(table), "rounds=4", "data.train_per_class=20", "data.test_per_class=5",
         "strategies=[exclude_start,upper,gp_grad_td50,stop]"],
        capture_output=True, text=True, check=True, cwd=REPO,
        env={**__import__("os").environ, "FEDEPIC_DATA": str(data_root), "FLWR_TELEMETRY_ENABLED": "0"})
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["seeds"] == [0, 1] and set(result["members"]) == {"exclude_start", "upper", "gp_grad_td50", "stop"}
    gp = result["members"]["gp_grad_td50"]
    assert gp["oracle_round"] == 2 and {"end", "before_td", "at_td", "after_td", "later_td"} <= set(gp)
    assert gp["detection"]["recall"]["mean"] == 1.0  # the oracle confirmed every malicious neighbour
    assert set(result["claim"]) == {"gp_grad_td50"}
    assert "| gp_grad_td50 | 2 |" in table.read_text()


# -- configs/gp_harm.yaml: the six attacks, the harm criterion, the per-attack and averaged checks --------


def test_gp_harm_config_loads_with_the_six_attacks():
    from fedepic.config import load_config, malicious_ids

    bench = _bench()
    cfg = load_config("gp_harm")
    assert bench.attack_list(cfg) == [("label_flip", "none"), ("none", "sign_flip"), ("none", "gaussian"),
                                      ("none", "alie"), ("none", "ipm"), ("none", "minmax")]
    assert [bench.attack_name(a) for a in bench.attack_list(cfg)] == [
        "label_flip", "sign_flip", "gaussian", "alie", "ipm", "minmax"]
    assert bench.attack_name(bench.NO_ATTACK) == "none"
    assert cfg.decentralized.algorithm == "dsgt" and cfg.rounds == 200 and malicious_ids(cfg) == [0, 5, 10, 15]
    assert cfg.strategies == ["gossip", "exclude_start", "upper", "gp_grad_td5", "gp_grad_td20", "gp_grad_td50", "gp_grad"]
    holders = {label: sorted(c for g in cfg.data.label_sets if label in g.labels for c in g.clients) for label in range(10)}
    assert holders[6] == holders[9] == [0, 1, 5, 10, 11, 15]  # 2 benign + the 4 malicious
    assert holders[7] == holders[8] == [0, 5, 10, 15]  # only the malicious nodes
    # gp_claim.yaml has no attack axes: its one attack
    assert bench.attack_list(load_config("gp_claim")) == [("label_flip", "none")]


def test_attack_list_takes_every_combination_without_zip():
    from fedepic.config import load_config

    cfg = load_config("gp_claim", ["sweep.attack.data=[none,label_flip]", "sweep.attack.model=[none,ipm]"])
    assert _bench().attack_list(cfg) == [("none", "none"), ("none", "ipm"), ("label_flip", "none"),
                                         ("label_flip", "ipm")]


def test_harm_check_is_a_five_point_drop_of_benign_label_accuracy():
    bench = _bench()
    stat = lambda m: {"end": {"benign_label_accuracy": {"mean": m, "spread": 0.0}}}  # noqa: E731
    met = bench.harm_check(stat(0.70), stat(0.75))  # exactly 5 points below: met
    assert met["harms"] and abs(met["drop"] - 0.05) < 1e-12 and met["no_attack"] == 0.75 and met["attacked"] == 0.70
    assert not bench.harm_check(stat(0.71), stat(0.75))["harms"]  # 4 points: not met
    assert not bench.harm_check(stat(0.80), stat(0.75))["harms"]  # better than no attack
    assert bench.harm_check(None, stat(0.75)) is None  # no gossip member: nothing to check


def test_claim_check_without_attack_success_is_a_and_c():
    bench = _bench()
    members = {"exclude_start": _end(0.0, 0.0, None, 0.70), "upper": _end(0.0, 0.0, None, 0.64),
               "gp_grad": _end(0.30, 0.0, None, 0.65), "gp_grad_td5": _end(0.30, 0.0, None, 0.60)}
    checks = bench.claim_check(members)
    assert checks["gp_grad"] == {"a_78_beats_exclude": True, "b_asr_within_2pts": None,
                                 "c_mean_at_least_upper": True, "holds": True}
    assert checks["gp_grad_td5"]["holds"] is False  # (c) fails: 0.60 < 0.64


def _records(e78, asr, benign, mean, precision=None) -> list[dict]:
    end = {"round": 200, "exclusive_accuracy": e78, "clean_accuracy": benign, "benign_label_accuracy": benign,
           "mean_accuracy": mean, **({} if asr is None else {"attack_success": asr}),
           **({} if precision is None else {"detection_precision": precision, "detection_recall": 1.0})}
    return [{"round": 100, **{k: v for k, v in end.items() if k != "round"}}, end]


def test_per_attack_reports_each_attack_and_their_average():
    bench = _bench()
    flip, sign = ("label_flip", "none"), ("none", "sign_flip")
    by = {}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        by[(seed, bench.NO_ATTACK, "gossip")] = _records(0.8, None, 0.90 + shift, 0.88)
        by[(seed, flip, "gossip")] = _records(0.7, 0.40, 0.80 + shift, 0.78)  # 10 points below: harms
        by[(seed, sign, "gossip")] = _records(0.0, None, 0.88 + shift, 0.70)  # 2 points below: does not
        for a in (flip, sign):
            by[(seed, a, "exclude_start")] = _records(0.0, 0.01 if a == flip else None, 0.92, 0.74, 1.0)
            by[(seed, a, "upper")] = _records(0.0, 0.01 if a == flip else None, 0.90, 0.72)
            by[(seed, a, "gp_grad")] = _records(0.5 if a == flip else 0.1, 0.02 if a == flip else None, 0.9, 0.80, 0.5)
    out = bench.per_attack(by, [flip, sign], ["gossip", "exclude_start", "upper", "gp_grad"], [0, 1], 200,
                           {"gossip": None, "exclude_start": 1, "upper": None, "gp_grad": None})
    assert list(out["attacks"]) == ["label_flip", "sign_flip"]
    assert out["attacks"]["label_flip"]["harm"]["harms"] and not out["attacks"]["sign_flip"]["harm"]["harms"]
    assert abs(out["attacks"]["label_flip"]["harm"]["drop"] - 0.10) < 1e-9
    assert abs(out["attacks"]["sign_flip"]["harm"]["drop"] - 0.02) < 1e-9
    assert out["attacks"]["label_flip"]["claim"]["gp_grad"]["holds"]  # 0.5 > 0, ASR +1 point, 0.80 >= 0.72
    assert out["attacks"]["sign_flip"]["claim"]["gp_grad"]["b_asr_within_2pts"] is None
    avg = out["average"]["members"]
    assert abs(avg["gp_grad"]["end"]["exclusive_accuracy"]["mean"] - 0.30) < 1e-9  # (0.5 + 0.1) / 2
    assert abs(avg["gossip"]["end"]["benign_label_accuracy"]["mean"] - 0.85) < 1e-9  # (0.81 + 0.89) / 2
    assert abs(avg["gossip"]["end"]["attack_success"]["mean"] - 0.40) < 1e-9  # only label_flip has one
    assert abs(avg["gp_grad"]["detection"]["precision"]["mean"] - 0.5) < 1e-9
    assert abs(out["average"]["harm"]["drop"] - 0.06) < 1e-9  # 0.91 - 0.85
    assert out["average"]["harm"]["harms"] and out["average"]["claim"]["gp_grad"]["holds"]
    table = bench.harm_markdown(out)
    assert "| label_flip | 81.0 ± 1.0 | 10.0 | yes | 40.0 ± 0.0 |" in table
    assert "| sign_flip | 89.0 ± 1.0 | 2.0 | no | n/a |" in table
    assert "| sign_flip | gp_grad | yes | n/a | yes | yes |" in table  # 0.1 beats 0.0 by more than the spread 0
    assert "| average of the two | gp_grad | yes | yes | yes | yes |" in table
    # without gossip: no reference run, no harm check, the claim check as before
    alone = bench.per_attack({k: v for k, v in by.items() if k[2] != "gossip"}, [flip, sign],
                             ["exclude_start", "upper", "gp_grad"], [0, 1], 200,
                             {"exclude_start": 1, "upper": None, "gp_grad": None})
    assert alone["no_attack_gossip"] is None and alone["attacks"]["label_flip"]["harm"] is None
    assert alone["average"]["claim"] == out["average"]["claim"]
    assert "harm criterion" not in bench.harm_markdown(alone)


def test_the_benchmark_runs_gp_harm_per_attack(tmp_path, data_root):
    table, records = tmp_path / "harm.md", tmp_path / "records"
    command = [sys.executable, str(REPO / "benchmarks" / "gp_claim.py"), "--config", "gp_harm", "--seeds", "0",
               "--workers", "2", "--table", str(table), "--records", str(records), "rounds=2",
               "data.train_per_class=20", "data.test_per_class=5", "strategies=[gossip,exclude_start,upper,gp_grad_td50]"]
    base, command = command, [*command, "sweep.attack.data=[label_flip,none]", "sweep.attack.model=[none,ipm]"]
    env = {**__import__("os").environ, "FEDEPIC_DATA": str(data_root), "FLWR_TELEMETRY_ENABLED": "0"}
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO,
                                       env=env).stdout.strip().splitlines()[-1])
    assert list(result["attacks"]) == ["label_flip", "ipm"]
    assert result["attack_free_members"] == ["exclude_start", "upper"]
    assert result["runs"] == 1 + 4 + 2 and result["runs_read_back"] == 0  # no-attack gossip; 4 + 2 members
    assert set(result["attacks"]["ipm"]["members"]) == {"gossip", "exclude_start", "upper", "gp_grad_td50"}
    assert result["attacks"]["label_flip"]["members"]["gossip"]["end"]["attack_success"]["mean"] is not None
    for member in ("gossip", "upper", "exclude_start"):  # a model attack has no attack success
        assert result["attacks"]["ipm"]["members"][member]["end"]["attack_success"]["mean"] is None
    assert result["no_attack_gossip"]["end"]["attack_success"]["mean"] is None
    assert set(result["attacks"]["ipm"]["claim"]) == {"gp_grad_td50"} and "harms" in result["average"]["harm"]
    assert "| average of the two | gp_grad_td50 |" in table.read_text()
    assert len(list(records.glob("*.json"))) == 7
    again = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO,
                                      env=env).stdout.strip().splitlines()[-1])
    assert again["runs_read_back"] == 7 and again["attacks"] == result["attacks"]
    other = json.loads(subprocess.run([*command, "train.lr=0.02"], capture_output=True, text=True, check=True,
                                      cwd=REPO, env=env).stdout.strip().splitlines()[-1])
    assert other["runs_read_back"] == 0  # another config: nothing read back
    assert len(list(records.glob("*.json"))) == 14
    fewer = json.loads(subprocess.run([*base, "sweep.attack.data=[none]", "sweep.attack.model=[ipm]"],
                                      capture_output=True, text=True, check=True, cwd=REPO,
                                      env=env).stdout.strip().splitlines()[-1])
    assert list(fewer["attacks"]) == ["ipm"] and fewer["runs"] == 5 and fewer["runs_read_back"] == 3
    assert fewer["attacks"]["ipm"]["members"]["gossip"] == result["attacks"]["ipm"]["members"]["gossip"]
    one = json.loads(subprocess.run([*base[:-1], "strategies=[gp_grad_td50]", "sweep.attack.data=[label_flip,none]",
                                     "sweep.attack.model=[none,ipm]"], capture_output=True, text=True, check=True,
                                    cwd=REPO, env=env).stdout.strip().splitlines()[-1])
    assert one["runs"] == 2 and one["runs_read_back"] == 2  # another members list reads the same runs back


def test_upper_and_exclude_start_are_the_same_under_any_attack(data_root, monkeypatch):
    """What lets the benchmark run them under the first attack only (attack_free)."""
    import torch

    from fedepic.config import load_config

    monkeypatch.setenv("FEDEPIC_DATA", str(data_root))
    threads = torch.get_num_threads()  # run_one sets one thread
    bench = _bench()
    small = ["rounds=3", "data.train_per_class=20", "data.test_per_class=5", "train.eval_every=1"]
    cfg = load_config("gp_harm", small)
    assert [m for m in cfg.strategies if bench.attack_free(cfg, m)] == ["exclude_start", "upper"]
    keys = ("mean_accuracy", "benign_label_accuracy", "exclusive_accuracy", "per_class")
    for member in ("exclude_start", "upper"):
        runs = [bench.run_one(("gp_harm", 0, attack, member, small, None))[3]
                for attack in (("label_flip", "none"), ("none", "sign_flip"), ("none", "gaussian"))]
        figures = [[{k: r[k] for k in keys} for r in recs if "mean_accuracy" in r] for recs in runs]
        assert len(figures[0]) == 3 and figures[0] == figures[1] == figures[2]
    gossip = [bench.run_one(("gp_harm", 0, attack, "gossip", small, None))[3][-1]["mean_accuracy"]
              for attack in (("label_flip", "none"), ("none", "sign_flip"))]
    torch.set_num_threads(threads)
    assert gossip[0] != gossip[1]  # the attack does reach gossip's nodes
    flip_only = bench.reused([{"round": 1, "mean_accuracy": 0.5, "attack_success": 0.2, "clean_accuracy": 0.6}],
                             ("label_flip", "none"), ("none", "ipm"))
    assert flip_only == [{"round": 1, "mean_accuracy": 0.5}]
