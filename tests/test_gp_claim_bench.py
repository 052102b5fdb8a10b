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
