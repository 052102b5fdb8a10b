"""Bad input: one clear line on stderr naming the key, file or value; exit 2; nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}  # this checkout, not an installed copy
    return subprocess.run([sys.executable, "-m", "fedepic.simulate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_INPUTS = [
    (["config=centralized_mnist", "nosuchkey=1"], ["nosuchkey"]),
    (["config=centralized_mnist", "train.nosuch=1"], ["train.nosuch"]),
    (["config=does_not_exist.yaml"], ["does_not_exist.yaml"]),
    (["config=centralized_mnist", "rounds=abc"], ["rounds", "abc"]),
    (["config=centralized_mnist", "rounds=-3"], ["rounds", "-3"]),
    (["config=centralized_mnist", "defense.epic.fraction=0"], ["defense.epic.fraction"]),
    (["config=centralized_mnist", "defense.epic.fraction=1.5"], ["defense.epic.fraction", "1.5"]),
    (["config=centralized_mnist", "clients.malicious_fraction=2"], ["clients.malicious_fraction"]),
    (["config=centralized_mnist", "mode=federated", "clients.count=4", "clients.malicious_ids=[0,1,2,3]"],
     ["clients.malicious_ids"]),
    (["config=centralized_mnist", "clients.count=4", "clients.malicious_ids=[7]"], ["clients.malicious_ids", "7"]),
    (["config=centralized_mnist", "mode=sideways"], ["mode", "sideways"]),
    (["config=centralized_mnist", "data.name=imagenet"], ["data.name", "imagenet"]),
    (["config=centralized_mnist", "strategies=[fedavg,nope]"], ["strategies[1]", "nope"]),
    (["config=centralized_mnist", "attack.poisons=/nonexistent/p.npz"], ["attack.poisons"]),
    (["config=centralized_mnist", "justaword"], ["justaword"]),
]


@pytest.mark.parametrize("args,needles", BAD_INPUTS, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "runs"
    proc = run_cli([*args, f"output_dir={out}"], cwd=tmp_path)
    assert_clean_failure(proc, *needles)
    assert not out.exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("mode: centralized\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    out = tmp_path / "runs"
    proc = run_cli([f"config={bad}", f"output_dir={out}"], cwd=tmp_path)
    assert_clean_failure(proc, "broken.yaml", "line")
    assert not out.exists()


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("mode: centralized\ntrain:\n  epoch: 3\n")
    proc = run_cli([f"config={bad}", f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert_clean_failure(proc, "train.epoch", "typo.yaml")


def test_missing_dataset_offline_names_expected_files(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(["config=centralized_mnist", f"data.root={tmp_path / 'empty'}", "data.download=false",
                    f"output_dir={out}"], cwd=tmp_path, env_extra={"FEDEPIC_CACHE": str(tmp_path / "cache")})
    assert_clean_failure(proc, "MNIST", "train-images-idx3-ubyte")
    assert not out.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_input_does_not_touch_existing_runs(tmp_path):
    out = tmp_path / "runs"
    existing = out / "20200101-000000-old"
    existing.mkdir(parents=True)
    (existing / "summary.json").write_text("{}")
    proc = run_cli(["config=centralized_mnist", "rounds=0", f"output_dir={out}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["20200101-000000-old"]
    assert (existing / "summary.json").read_text() == "{}"


def test_help_exits_zero(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "config=" in proc.stdout


def test_extends_merges_over_its_base_and_refuses_a_loop(tmp_path):
    """A config file may start from another (``extends:``), found beside it or in configs/."""
    from fedepic.config import load_config
    from fedepic.errors import ConfigError

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nrounds: 3\n")
    (tmp_path / "b.yaml").write_text("extends: noniid.yaml\nseed: 7\n")
    cfg = load_config(str(tmp_path / "a.yaml"), ["clients.local_epochs=1"])
    assert (cfg.rounds, cfg.seed, cfg.name, cfg.mode, cfg.clients.local_epochs) == (3, 7, "noniid", "decentralized", 1)
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extend each other in a loop"):
        load_config(str(tmp_path / "a.yaml"), [])
    (tmp_path / "b.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="key 'extends'.*no such config file"):
        load_config(str(tmp_path / "a.yaml"), [])
    (tmp_path / "b.yaml").write_text("extends: noniid.yaml\nrounds: [1]\n")
    with pytest.raises(ConfigError, match=r"key 'rounds' in .*b\.yaml"):
        load_config(str(tmp_path / "a.yaml"), [])
