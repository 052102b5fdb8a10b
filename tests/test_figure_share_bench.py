"""benchmarks/figure_share.py: the figures' and report's CPU share of a local run, and its replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str) -> dict:
    done = subprocess.run([sys.executable, "benchmarks/figure_share.py", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_figure_share_times_each_writer_and_replays_them(tmp_path):
    result = bench("--config", "dfl_smoke.yaml", "--out", str(tmp_path))
    assert set(result["parts_cpu_s"]) == {"curves", "comparison", "report_html"}
    assert 0 < result["figures_report_cpu_s"] < result["run_cpu_s"]
    # the share is of the unrounded seconds; the seconds are reported rounded to 0.01 s
    assert result["share"] == pytest.approx(result["figures_report_cpu_s"] / result["run_cpu_s"], abs=2e-3)
    assert result["command"].startswith("python -m fedepic.simulate config=dfl_smoke.yaml engine=local")
    assert result["load_average_before"].count("/") == 2 and result["commit"]
    folder = Path(result["folder"])
    assert {"gossip/curves.png", "gp/curves.pdf", "comparison.pdf", "report.html"} <= {
        str(p.relative_to(folder)) for p in folder.rglob("*")}
    replayed = bench("--replay", str(tmp_path), "--repeats", "1")
    assert set(replayed["parts_cpu_s"]) == {"curves", "comparison", "report_html"}
    assert len(replayed["all_cpu_s"]) == 1 and 0 < replayed["share"] < 1
