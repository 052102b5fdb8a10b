"""Run folders written atomically: `output_dir/<timestamp>-<name>/` with config, metrics, summary and plots.

A run is built in a hidden `.<timestamp>-<name>.partial` folder and renamed into place when it ends
(also when it is interrupted, with status "interrupted"), and every file inside is written to a
temporary name and renamed, so no reader ever sees a half-written summary.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import stat
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _named(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` when it names no file (a write that fills the disk names none)."""
    if err.filename is None:
        err.filename = str(path)
    return err


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path`` (a link at
    ``path`` is replaced, never written through)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _named(err, path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _named(err, path)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _named(err, path)
        raise


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    from importlib.metadata import PackageNotFoundError, version

    # metadata only: the core never imports flwr or ray
    for package in ("flwr", "ray", "numpy", "numba", "omegaconf", "matplotlib", "jinja2"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    versions["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    return versions


LOCK_FILE = Path(__file__).resolve().parents[1] / "uv.lock"  # beside pyproject.toml in a checkout
PROJECT = "fedepic"


def _applies(entry: Mapping[str, Any], marker_type: Any) -> bool:
    """Whether a uv.lock dependency entry's environment marker (if any) holds on this machine."""
    marker = entry.get("marker")
    return not marker or marker_type(marker).evaluate({"extra": ""})


def _locked_versions(lock: Mapping[str, Any], marker_type: Any) -> dict[str, tuple[str, bool]]:
    """Every package uv.lock installs here, from the project down: name -> (version, required).

    ``required`` is True for what the project's own dependencies need, False for what only its
    extras and dependency groups add (a plain `pip install -e .` leaves those out). Where the lock
    holds two versions of a package (one per environment marker), the dependency entry names its
    ``version``.
    """
    packages: dict[str, list[Mapping[str, Any]]] = {}
    for package in lock.get("package", []):
        packages.setdefault(package["name"], []).append(package)

    def find(entry: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        candidates = [p for p in packages.get(entry["name"], []) if entry.get("version") in (None, p.get("version"))]
        return candidates[0] if candidates else None

    found: dict[str, tuple[str, bool]] = {}
    seen: set[tuple[str, str, bool]] = set()

    def walk(entry: Mapping[str, Any], required: bool) -> None:
        package = find(entry)
        if package is None:
            return
        extras = tuple(entry.get("extra", ()))
        key = (package["name"] + str(package.get("version")), ",".join(extras), required)
        if key in seen:
            return
        seen.add(key)
        if package["name"] != PROJECT:
            version_, was_required = found.get(package["name"], (package["version"], False))
            found[package["name"]] = (version_, was_required or required)
        children = [(d, required) for d in package.get("dependencies", [])]
        for extra in extras:
            children += [(d, required) for d in package.get("optional-dependencies", {}).get(extra, [])]
        if package["name"] == PROJECT:  # the project's extras and groups: optional here
            for group in (package.get("optional-dependencies", {}) | package.get("dev-dependencies", {})).values():
                children += [(d, False) for d in group]
        for child, child_required in children:
            if _applies(child, marker_type):
                walk(child, child_required)

    walk({"name": PROJECT}, True)
    return found


def lock_record(path: Path = LOCK_FILE) -> dict[str, Any]:
    """The lock's sha256 and the installed packages whose versions differ from uv.lock.

    ``differs`` lists "name: installed X, locked Y" for every package the lock installs on this
    machine (environment markers evaluated, from the project's dependencies, extras and groups down),
    and "name: not installed, locked Y" for those the project's own dependencies need (an extra or a
    group that is not installed is not a difference). It is None where the markers cannot be read (no
    ``packaging``, as on a machine with only torch). Without the file (an installed wheel) both are None.

    >>> sorted(lock_record())  # doctest: +SKIP
    ['differs', 'file', 'sha256']
    """
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    if not path.is_file():
        return {"file": path.name, "sha256": None, "differs": None}
    data = path.read_bytes()
    record: dict[str, Any] = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "differs": None}
    try:
        from packaging.markers import Marker
    except ImportError:
        return record
    differs = []
    for name, (locked, required) in sorted(_locked_versions(tomllib.loads(data.decode()), Marker).items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            if required:
                differs.append(f"{name}: not installed, locked {locked}")
            continue
        if installed != locked:
            differs.append(f"{name}: installed {installed}, locked {locked}")
    record["differs"] = differs
    return record


LOCK = ".lock"  # the file a run folder's writing process holds locked (fcntl.flock) while it writes


def refuse_links(folder: Path, key: str = "resume") -> None:
    """A one-line ConfigError naming the first symbolic link below ``folder``, or a hard-linked
    metrics.jsonl: a resume appends to and truncates metrics.jsonl in place and writes into the member
    folders it finds, so it must never write through a link to a file outside the run. (Every other file
    is written to a temporary name and renamed over the old one, which replaces a hard link instead of
    writing through it.) A run writes no link itself; files that vanish during the walk (the
    temporary files of a run still writing) are passed over."""
    from fedepic.errors import ConfigError

    for parent, folders, files in os.walk(folder, followlinks=False):
        for name in sorted(folders) + sorted(files):
            path = Path(parent) / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                raise ConfigError(f"invalid value '{folder}' for key '{key}': {path} is a symbolic link; a run "
                                  "folder holds none, and a resume never writes through one")
            if name == "metrics.jsonl" and stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                raise ConfigError(f"invalid value '{folder}' for key '{key}': {path} is a hard link "
                                  f"({info.st_nlink} names); a resume never appends to a file shared with another")


def lock_folder(folder: Path, key: str, kind: str = "run") -> int:
    """An exclusive lock on ``folder``/.lock (the descriptor; closing it releases the lock). The lock
    moves with the folder when that is renamed, and a killed process's lock goes with it. A folder
    that another process holds is a one-line ConfigError naming ``key``.

    flock(2), not a pid file: the kernel releases it on every kind of exit, so no stale lock remains.
    """
    from fedepic.errors import ConfigError

    busy = ConfigError(f"invalid value '{folder}' for key '{key}': another process is running this {kind} "
                       "(its folder is locked); wait for it, or stop it first")
    for _ in range(3):  # the holder may unlink the file between our open and our flock: open it again
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ConfigError(f"invalid value '{folder}' for key '{key}': {folder / LOCK} is a symbolic link; "
                                  "a run folder holds none") from None
            raise _named(err, folder / LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise busy from None
        try:  # the file we hold must still be the folder's: else its holder released and unlinked it
            current = os.stat(folder / LOCK, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)
    raise busy


def unlock_folder(folder: Path, fd: int) -> None:
    """Release :func:`lock_folder`'s lock on ``folder`` (where the folder is now) and remove its file."""
    (folder / LOCK).unlink(missing_ok=True)
    os.close(fd)


class RunWriter:
    """Owns one run folder. Use as a context manager; the folder appears under its final name on exit.

    A top-level folder is locked (:func:`lock_folder`) from before its first change to after its
    rename, so a second process (a ``resume=`` of a run still going, say) is refused in one line
    (naming ``lock_key``, and ``kind``: run or sweep) and the live run is untouched. A new folder that
    cannot be set up (a full disk) is removed again: nothing is left behind.
    """

    def __init__(self, output_dir: str | Path, name: str, *, stamp: Optional[str] = None,
                 parent: Optional["RunWriter"] = None, resume: Optional[Path] = None,
                 lock_key: str = "resume", kind: str = "run", tensorboard: bool = False) -> None:
        self.parent, self.lock_key, self.kind = parent, lock_key, kind
        # log.tensorboard: each record also goes to event files in the folder (members inherit it)
        self.tensorboard = tensorboard or (parent is not None and parent.tensorboard)
        self._scalars: Optional[Any] = None
        self._lock: Optional[int] = None
        self._made: Optional[Path] = None  # the first folder that __enter__ created above a new run folder
        self._created = False  # __enter__ made the new run folder itself (only then may it remove it)
        stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir)
        # resuming: the interrupted run's folder is reopened (renamed to .partial while the run goes on)
        self.resuming = resume is not None or (parent is not None and parent.resuming)
        if parent is not None:  # a member of a comparison lives inside its parent's folder
            self.final_dir = parent.dir / name
            self.dir = self.final_dir
        elif resume is not None:
            resume = Path(resume)
            partial = resume.name.startswith(".") and resume.name.endswith(".partial")
            self.final_dir = resume.with_name(resume.name[1:-len(".partial")]) if partial else resume
            self.dir = resume if partial else resume.with_name(f".{resume.name}.partial")
        else:
            self.final_dir = self._unique(base / f"{stamp}-{name}")
            self.dir = base / f".{self.final_dir.name}.partial"
        self._metrics: Optional[Any] = None
        self._environment: Optional[dict[str, Any]] = None
        self.started = time.time()
        self.status = "running"
        self.summary_written = False

    @staticmethod
    def _unique(path: Path) -> Path:
        candidate, n = path, 1
        while candidate.exists() or (candidate.parent / f".{candidate.name}.partial").exists():
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
        return candidate

    def __enter__(self) -> "RunWriter":
        if self.parent is not None:
            self.dir.mkdir(parents=True, exist_ok=self.resuming)
            self._metrics = open_append(self.dir / "metrics.jsonl")
            return self
        if self.resuming:
            self._reopen()
        else:
            self._made = first_missing(self.dir)
        try:
            if not self.resuming:
                self.dir.mkdir(parents=True)
                self._created = True
                self._lock = lock_folder(self.dir, self.lock_key, self.kind)
            self._metrics = open_append(self.dir / "metrics.jsonl")
        except BaseException:
            self._abandon()
            raise
        return self

    def _reopen(self) -> None:
        """Lock the folder of a resumed run before anything in it changes, check it again under the lock
        (no link in it; a run not completed meanwhile), then rename it to .partial."""
        from fedepic.errors import ConfigError

        folder = self.dir if self.dir.exists() else self.final_dir
        made_lock = not (folder / LOCK).exists()  # a refusal below leaves the folder as it found it
        self._lock = lock_folder(folder, self.lock_key, self.kind)
        try:
            refuse_links(folder, self.lock_key)
            if self.kind == "run" and _status_of(folder) == "completed":  # it ended while this resume started
                raise ConfigError(f"invalid value '{folder}' for key '{self.lock_key}': the run completed while "
                                  "this resume started; a completed run is not resumed")
            if folder != self.dir:
                os.replace(folder, self.dir)
        except BaseException:
            if made_lock:
                (folder / LOCK).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None
            raise

    def discard(self) -> None:
        """Leave a run that could not start (its config could not be written): a new top-level folder
        is removed with the parents it made, a reopened one is closed as it is."""
        if self.parent is None and not self.resuming:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            self._abandon()
        else:
            self.close()

    def _abandon(self) -> None:
        """A folder that could not be set up: a new one is removed again (and the parents it made, while
        empty), a reopened one is renamed back; its lock goes last."""
        try:
            self._leave()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def _leave(self) -> None:
        if self.parent is None and not self.resuming:
            if not self._created:  # another process's folder of the same name: not ours to remove
                return
            shutil.rmtree(self.dir, ignore_errors=True)
            folder = self.dir.parent
            while self._made is not None and self._made in (folder, *folder.parents):
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent
        elif self.parent is None and self.dir != self.final_dir and self.dir.exists():
            os.replace(self.dir, self.final_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.mark(exc)
        self.close()

    def mark(self, exc: Optional[BaseException]) -> None:
        """Record what ``exc`` means for the status: a KeyboardInterrupt (SIGINT, SIGTERM) "interrupted",
        any other exception "failed"; None changes nothing."""
        if isinstance(exc, KeyboardInterrupt):
            self.status = "interrupted"
        elif exc is not None:
            self.status = "failed"

    def close(self) -> None:
        """Write the status if the run wrote no summary, then rename the folder into place and release
        its lock, on every path (a summary that cannot be written still leaves the folder renamed)."""
        try:
            if not self.summary_written and self.dir.exists():
                self.write_summary({})  # cut short before the run wrote its own: the status, at least
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            if self._scalars is not None:
                self._scalars.close()
                self._scalars = None
            try:
                if self.parent is None and self.dir != self.final_dir and self.dir.exists():
                    os.replace(self.dir, self.final_dir)
                    self.dir = self.final_dir
            finally:
                if self._lock is not None:  # after the rename: nobody can take the folder while it moves
                    unlock_folder(self.dir, self._lock)
                    self._lock = None

    def flush(self) -> None:
        """Put the metrics lines logged so far on disk (before a checkpoint records the file's length)."""
        if self._metrics is not None:
            self._metrics.flush()
        if self._scalars is not None:
            self._scalars.flush()

    @property
    def path(self) -> Path:
        """Where the folder will be (and is, once closed)."""
        return self.final_dir

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml_text)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON object (one line) to metrics.jsonl; a line is flushed whole or not at all."""
        assert self._metrics is not None, "RunWriter used outside its context"
        line = json.dumps(_jsonable(dict(record)))
        if self.tensorboard and self._scalars is None:  # counted before the line: its index in the file
            from fedepic.tensorboard_log import ScalarLog, line_count

            self._metrics.flush()
            self._scalars = ScalarLog(self.dir, self.resuming, line_count(self.dir / "metrics.jsonl"))
        self._metrics.write(line + "\n")
        if self.tensorboard:  # the very values of the line, as read back from it
            self._scalars.write(json.loads(line))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.dir / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.dir / name, text)

    def environment(self) -> dict[str, Any]:
        """{"versions", "lock"} of this process, read once per run and shared by its members' summaries
        (reading every installed package's metadata costs one file read per package; read per
        summary it measured slow: docs/results/engines.md)."""
        if self.parent is not None:
            return self.parent.environment()
        if self._environment is None:
            self._environment = {"versions": environment_versions(), "lock": lock_record()}
        return self._environment

    def write_summary(self, figures: Mapping[str, Any]) -> None:
        summary = {"status": self.status if self.status != "running" else "completed", **figures,
                   "wall_seconds": time.time() - self.started, **self.environment()}
        atomic_write_json(self.dir / "summary.json", summary)
        self.summary_written = True

    def write_bytes(self, name: str, data: bytes) -> None:
        """A binary file (a figure: fedepic.plots.save_figure), written atomically."""
        atomic_write_bytes(self.dir / name, data)


def _status_of(folder: Path) -> Optional[str]:
    """The status in ``folder``/summary.json, None when there is none or it cannot be read."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("status") if isinstance(summary, dict) else None


def first_missing(path: Path) -> Optional[Path]:
    """The top-most folder of ``path`` that does not exist yet (``path`` itself, or a parent), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def open_append(path: Path):
    """``path`` opened for appending lines, line-buffered; a symbolic link there is refused (ELOOP), not
    written through."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a", buffering=1)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> str:
    cols = list(columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> str:
    import csv
    import io

    cols = list(columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:  # a missing value (None, NaN: a standard error of one trial) is an empty cell, as in markdown
        writer.writerow({c: "" if _missing(row.get(c)) else row.get(c, "") for c in cols})
    return buf.getvalue()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def remove_partial(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
