"""Shared fixtures: the offline datasets (../shared/data unpacked into $FEDEPIC_DATA) and a scratch cache."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Where MNIST/ and cifar10-jpeg/ live: $FEDEPIC_DATA, else unpack ../shared/data into .data/."""
    root = os.environ.get("FEDEPIC_DATA")
    if root and (Path(root) / "MNIST").is_dir():
        return Path(root)
    target = REPO / ".data"
    # every pytest-xdist worker runs this fixture: the first to hold the lock unpacks, the others wait
    # for it instead of reading (or unpacking into) a half-written folder
    with open(REPO / ".data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "MNIST").is_dir():
            unpack = REPO.parent / "shared" / "data" / "unpack.sh"
            if not unpack.is_file():  # one line, not a subprocess traceback
                pytest.fail("the offline datasets are missing: set FEDEPIC_DATA to a folder holding MNIST/ and "
                            "cifar10-jpeg/ (../shared/data/unpack.sh makes one)", pytrace=False)
            subprocess.run([str(unpack), str(target)], check=True, capture_output=True)
    return target


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test shares one decoded-data cache, away from the user's home."""
    cache = tmp_path_factory.getbasetemp() / "decoded-cache"
    monkeypatch.setenv("FEDEPIC_CACHE", str(cache))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="module")
def task_identity():
    """Flower Messages can only be built inside a run; give this process a task identity for a module's tests."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
            patch.setattr(TaskIdentity, key, value)
        yield
