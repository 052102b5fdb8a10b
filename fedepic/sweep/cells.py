"""One cell of a sweep: its run, an ordinary run folder written by the mode's runner, and the moves that
bring that folder to ``cells/<name>`` in the sweep folder.

A cell runs in a work folder of its own (its ``output_dir``). When its run ends, on any path, the run
folder moves to ``cells/<name>``: renamed on this machine, or packed into bytes by a Ray worker and
unpacked by the driver, since a cluster's workers share no file system with it. A cell that stopped
before it completed continues in its folder from its last checkpoint (``resume_config``, the resume
of a single run), wherever it runs next.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from fedepic.config import RunConfig
from fedepic.errors import ConfigError, DataError, RunFailed
from fedepic.interrupts import Interrupts

CELLS = "cells"
USER_ERRORS = (ConfigError, DataError, RunFailed)  # their message is the whole story: no traceback


@dataclass
class CellOutcome:
    """How a cell's run ended: ``status`` completed, interrupted or failed; ``folder`` the run folder it
    wrote (None: it stopped before writing one); ``traceback`` for an unexpected exception."""

    status: str
    folder: Optional[Path]
    error: Optional[str] = None
    traceback: Optional[str] = None
    seconds: float = 0.0
    signum: Optional[int] = None


def execute_cell(cfg: RunConfig, workdir: Path, *, interrupts: Interrupts,
                 resume: Optional[Path] = None) -> CellOutcome:
    """Run the cell ``cfg`` with ``workdir`` as its output_dir, or continue its stopped run folder
    ``resume``; never raises for the cell's own failure or interruption (a full disk does raise)."""
    from fedepic.checkpoint import resume_config
    from fedepic.interrupts import STORAGE_ERRNOS
    from fedepic.simulate import runner_for

    started = time.perf_counter()
    try:
        if resume is not None:
            run_cfg, point = resume_config(str(resume), None, [f"output_dir={resume.parent}",
                                                                f"progress={str(cfg.progress).lower()}"])
            folder = runner_for(run_cfg.mode)(run_cfg, interrupts=interrupts, resume=point)
        else:
            run_cfg = dataclasses.replace(cfg, output_dir=str(workdir))
            folder = runner_for(cfg.mode)(run_cfg, interrupts=interrupts)
        return CellOutcome("completed", Path(folder), seconds=time.perf_counter() - started)
    except KeyboardInterrupt as err:  # SIGINT / SIGTERM (or the sweep's stop): the runner wrote "interrupted"
        return CellOutcome("interrupted", _written(workdir, resume), str(err) or "interrupted",
                           seconds=time.perf_counter() - started, signum=getattr(err, "signum", None))
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:
            raise  # a full or read-only disk fails every cell: the sweep stops (exit 2)
        return _failed(err, workdir, resume, started)
    except Exception as err:  # noqa: BLE001 - a failing cell is recorded, and the sweep goes on
        return _failed(err, workdir, resume, started)


def _failed(err: Exception, workdir: Path, resume: Optional[Path], started: float) -> CellOutcome:
    first = str(err).splitlines()[0] if str(err) else ""
    expected = isinstance(err, USER_ERRORS)
    return CellOutcome("failed", _written(workdir, resume), first if expected else f"{type(err).__name__}: {first}",
                       None if expected else traceback.format_exc(), time.perf_counter() - started)


def _written(workdir: Path, resume: Optional[Path]) -> Optional[Path]:
    """The run folder a cell left: its resumed folder, or the one its runner made in ``workdir``."""
    if resume is not None:
        return existing_folder(resume.parent, resume.name)
    made = sorted(p for p in workdir.iterdir() if p.is_dir()) if workdir.is_dir() else []
    return next((p for p in made if not p.name.startswith(".")), made[0] if made else None)


def existing_folder(parent: Path, name: str) -> Optional[Path]:
    """``parent/name``, or its ``.name.partial`` form (a run killed before it could rename it), if either exists."""
    for path in (parent / name, parent / f".{name}.partial"):
        if path.is_dir():
            return path
    return None


def folder_status(folder: Optional[Path]) -> str:
    """A cell folder's status from its summary.json: completed, interrupted or failed; "killed" for a
    folder without a readable summary; "pending" for none."""
    if folder is None:
        return "pending"
    try:
        status = json.loads((folder / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return "killed"
    return status if status in ("completed", "interrupted", "failed") else "killed"


def pack_folder(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), without temporary files."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.endswith(".tmp")}


def unpack_folder(files: Mapping[str, bytes], target: Path) -> Path:
    """Write ``files`` (from :func:`pack_folder`) under ``target``; returns ``target``."""
    for relative, data in files.items():
        path = target / relative
        if target not in path.resolve().parents:
            raise ValueError(f"a packed cell file lies outside its folder: {relative!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return target


def install_folder(files: Mapping[str, bytes], cells: Path, name: str) -> Path:
    """Unpack a packed run folder as ``cells/name``, replacing an earlier one in one rename."""
    incoming = cells / f".{name}.incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    return place_folder(unpack_folder(files, incoming.resolve()), cells, name)


def place_folder(folder: Path, cells: Path, name: str) -> Path:
    """Move the run folder ``folder`` to ``cells/name`` (replacing an earlier attempt's folder)."""
    target = cells / name
    if folder.resolve() == target.resolve():
        return target
    cells.mkdir(parents=True, exist_ok=True)
    old = cells / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(folder, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(cells / f".{name}.partial", ignore_errors=True)  # a killed earlier attempt, now superseded
    return target
