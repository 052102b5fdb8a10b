"""CI's choice of the datasets (.ci/datasets, which .ci/run uses): FEDEPIC_DATA as set, else the offline
copies of ../shared/data unpacked into .ci-data, else nothing (fedepic downloads them), said in one line;
run in a scratch layout (a clone folder with .ci/ and, or not, a ../shared/data/unpack.sh beside it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout(tmp_path: Path, shared: bool) -> Path:
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "datasets", clone / ".ci" / "datasets")
    if shared:
        unpack = tmp_path / "shared" / "data" / "unpack.sh"
        unpack.parent.mkdir(parents=True)
        unpack.write_text('#!/usr/bin/env bash\nset -e\nmkdir -p "$1"\necho unpacking >&2\ncd "$1" && pwd\n')
    return clone


def _datasets(clone: Path, data: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDEPIC_DATA"}
    if data is not None:
        env["FEDEPIC_DATA"] = data
    return subprocess.run(["bash", str(clone / ".ci" / "datasets")], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_offline_copies_when_shared_is_there(tmp_path: Path) -> None:
    clone = _layout(tmp_path, shared=True)
    out = _datasets(clone, None)
    assert out.returncode == 0 and out.stdout == f"{clone / '.ci-data'}\n"
    assert (clone / ".ci-data").is_dir()


def test_a_set_fedepic_data_is_honoured(tmp_path: Path) -> None:
    for shared in (True, False):
        clone = _layout(tmp_path / str(shared), shared)
        out = _datasets(clone, "/somewhere/data")
        assert out.returncode == 0 and out.stdout == "/somewhere/data\n"
        assert not (clone / ".ci-data").exists()


def test_without_shared_nothing_is_printed_and_one_line_says_why(tmp_path: Path) -> None:
    clone = _layout(tmp_path, shared=False)
    out = _datasets(clone, None)
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "download" in out.stderr and "FEDEPIC_DATA" in out.stderr


def test_ci_run_takes_the_datasets_from_that_script() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert 'data="$(.ci/datasets)"' in text and "../shared/data/unpack.sh" not in text
    assert subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")]).returncode == 0
