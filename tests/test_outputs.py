"""Run folders appear whole: built under a hidden partial name, renamed at the end, files atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedepic.outputs import LOCK_FILE, RunWriter, atomic_write_json, lock_record

REPO = Path(__file__).resolve().parent.parent


def test_run_folder_is_renamed_into_place(tmp_path):
    with RunWriter(tmp_path, "demo", stamp="20260101-000000") as writer:
        assert writer.dir.name.startswith(".") and writer.dir.name.endswith(".partial")
        writer.log({"epoch": 1, "accuracy": 0.5})
        writer.write_summary({"accuracy": 0.5})
        assert not writer.path.exists()
    assert writer.path == tmp_path / "20260101-000000-demo" and writer.path.is_dir()
    assert json.loads((writer.path / "summary.json").read_text())["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["20260101-000000-demo"]


def test_summary_records_the_lock(tmp_path):
    import hashlib

    from importlib.metadata import version

    lock = tmp_path / "uv.lock"
    lock.write_text(f"""version = 1
[[package]]
name = "fedepic"
version = "0.1.0"
source = {{ editable = "." }}
dependencies = [
    {{ name = "torch" }},
    {{ name = "numpy", marker = "python_full_version >= '3.0'" }},
    {{ name = "pytest", marker = "sys_platform == 'no-such-platform'" }},
    {{ name = "no-such-package-fedepic" }},
]
[package.optional-dependencies]
extra = [{{ name = "also-not-installed-fedepic" }}, {{ name = "pyyaml" }}]

[[package]]
name = "torch"
version = "{version('torch')}"
[[package]]
name = "numpy"
version = "0.0.1"
[[package]]
name = "pytest"
version = "0.0.2"
[[package]]
name = "no-such-package-fedepic"
version = "1.0"
dependencies = [{{ name = "no-such-dependency-fedepic" }}]
[[package]]
name = "no-such-dependency-fedepic"
version = "2.0"
[[package]]
name = "also-not-installed-fedepic"
version = "3.0"
[[package]]
name = "pyyaml"
version = "0.0.3"
""")
    record = lock_record(lock)
    assert record["file"] == "uv.lock" and record["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    # the marker that does not hold is skipped; torch matches; an extra that is not installed is no
    # difference, an installed one at another version is; a dependency's dependency counts
    assert record["differs"] == [
        "no-such-dependency-fedepic: not installed, locked 2.0",
        "no-such-package-fedepic: not installed, locked 1.0",
        f"numpy: installed {version('numpy')}, locked 0.0.1",
        f"pyyaml: installed {version('pyyaml')}, locked 0.0.3",
    ]
    assert lock_record(tmp_path / "absent.lock") == {"file": "absent.lock", "sha256": None, "differs": None}
    with RunWriter(tmp_path, "run") as run:
        run.write_summary({})
    summary = json.loads((run.path / "summary.json").read_text())
    assert LOCK_FILE.name == "uv.lock" and summary["lock"]["file"] == "uv.lock"
    assert summary["lock"]["sha256"] == hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()


def test_a_run_reads_its_versions_and_lock_once_for_every_summary(tmp_path, monkeypatch):
    import fedepic.outputs as outputs

    reads = []
    real, real_versions = outputs.lock_record, outputs.environment_versions
    monkeypatch.setattr(outputs, "lock_record", lambda: reads.append("lock") or real())
    monkeypatch.setattr(outputs, "environment_versions", lambda: reads.append("versions") or real_versions())
    with RunWriter(tmp_path, "run") as run:
        for name in ("a", "b"):
            with RunWriter(run.dir, name, parent=run) as member:
                member.write_summary({})
        run.write_summary({})
    summaries = [json.loads((run.path / sub / "summary.json").read_text()) for sub in ("", "a", "b")]
    assert sorted(reads) == ["lock", "versions"]
    assert all(s["lock"] == summaries[0]["lock"] and s["versions"] == summaries[0]["versions"] for s in summaries)
    assert summaries[0]["lock"]["sha256"] == real()["sha256"]


def test_interrupted_run_keeps_what_is_done(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(tmp_path, "demo", stamp="s") as writer:
            writer.log({"epoch": 1})
            raise KeyboardInterrupt
    assert (writer.path / "metrics.jsonl").read_text().count("\n") == 1


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_centralized_mnist_config_writes_the_run_folder(tmp_path, data_root):
    env = {**os.environ, "FEDEPIC_DATA": str(data_root)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedepic.simulate", "config=centralized_mnist", f"output_dir={tmp_path}",
         "data.train_per_class=200", "data.test_per_class=100", "progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "comparison.md", "comparison.png", "comparison.pdf",
            "per_class.png", "per_class.pdf", "report.html"} <= names  # one epoch: no per-class over epochs
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rows"][0]["accuracy"] > 0.5  # chance is 0.1; 16 SGD steps
    assert "torch" in summary["versions"] and summary["wall_seconds"] > 0
    member = run_dir / "none"
    lines = (member / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    assert len(json.loads(lines[0])["per_class"]) == 10  # the per-class heatmap's source


def test_write_comparison(tmp_path):
    from fedepic.report import write_comparison

    with RunWriter(tmp_path, "cmp") as writer:
        rows = [{"strategy": "a", "final_accuracy": 0.5}, {"strategy": "b", "final_accuracy": 0.25}]
        curves = {"a": {"accuracy": [0.1, 0.5]}, "b": {"accuracy": [0.2, 0.25]}}
        write_comparison(writer, rows, ["strategy", "final_accuracy"], curves, ["accuracy", "attack_success"], "T")
    folder = writer.path
    assert (folder / "comparison.md").read_text().startswith("# T")
    assert (folder / "comparison.csv").read_text().splitlines() == ["strategy,final_accuracy", "a,0.5", "b,0.25"]
    assert (folder / "comparison.png").stat().st_size > 1000 and (folder / "comparison.pdf").is_file()
