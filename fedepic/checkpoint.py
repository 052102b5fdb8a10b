"""Checkpoints of a run in progress, and resuming an interrupted run from them.

A checkpoint is one ``checkpoint.pt`` per run folder (or per member folder), written atomically
(temporary name, then rename) after every ``checkpoint_every``-th epoch or round, once that step's
metrics lines are on disk. Every mode writes the one format of :func:`save_checkpoint` and reads it
with :func:`load_checkpoint`: plain tensors and plain Python containers and values only (dicts with
str or int keys, a module's OrderedDict state among them, lists, tuples, str, int, float, bool,
None). :func:`not_plain` checks it before anything is written, so a writer that puts anything else
in (a ``bytes`` payload, a ``collections.Counter``, a numpy scalar) fails in its own run, not at the
resume. It is read with ``torch.load(weights_only=True)``, which never unpickles code. It records the
byte length of every metrics.jsonl it covers: a resume truncates each file there, so lines logged after the
checkpoint (by the step the interruption cut short) are dropped and logged again.

``python -m fedepic.simulate resume=RUN_DIR [config=... key=value ...]`` continues the run in
RUN_DIR (see :func:`resume_config`). Finished members are kept as they are, the interrupted one
continues from its checkpoint, and the others run as usual. Because every random draw is seeded from
the config (or restored from the checkpoint), the resumed metrics.jsonl equals the one an
uninterrupted run writes, apart from timing fields.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedepic.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1
# Keys a resume may change: where the run is written and how it is displayed, never what it computes.
RESUMABLE_KEYS = ("output_dir", "name", "progress", "data.cache_dir", "checkpoint_every", "figures")
# and, for a sweep folder, how its cells are scheduled and aggregated, never what a cell computes
# (sweep.cell_cpus stays: it sets the cells' torch threads, part of their configs)
SWEEP_RESUMABLE_KEYS = ("ray", "sweep.parallel", "sweep.cell_gpus", "sweep.max_retries", "sweep.metrics",
                        "sweep.curves", "sweep.cell_figures")
# "killed": the folder holds no summary, because the process ended without writing one (SIGKILL, an
# out-of-memory kill, a power loss); its checkpoints are what a resume is for
RESUMABLE_STATUSES = ("interrupted", "failed", "killed")


@dataclass
class Resume:
    """An interrupted run folder to continue (``run_dir``), and what its checkpoint and member
    summaries say. ``checkpoint`` is None when the run stopped before its first checkpoint."""

    run_dir: Path
    checkpoint: Optional[dict[str, Any]] = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)  # member folder -> its summary.json

    def finished(self, member: str) -> bool:
        """True when ``member``'s folder holds a completed summary (kept as it is)."""
        return self.members.get(member, {}).get("status") == "completed"

    def member_checkpoint(self, member: str) -> Optional[dict[str, Any]]:
        """The checkpoint in ``member``'s folder, or None (the member starts over)."""
        path = self.run_dir / member / CHECKPOINT
        return load_checkpoint(path) if path.is_file() else None


def checkpoint_due(every: int, step: int, last: int) -> bool:
    """Whether step ``step`` (an epoch or a round, 1-based) ends with a checkpoint: every ``every``-th
    (``checkpoint_every``; 0 never), but not the ``last``, after which the member completes."""
    return bool(every) and step % every == 0 and step < last


PLAIN_VALUES = (str, int, float, bool, type(None))  # with tensors, dicts, lists and tuples: the format


def not_plain(value: Any, where: str = "state") -> Optional[str]:
    """The path and type of the first entry of ``value`` outside the checkpoint format (module
    docstring), or None. Exact types: a subclass of dict (``collections.Counter``) or of float
    (``numpy.float64``) is not plain, but for ``collections.OrderedDict``, what a module's
    ``state_dict()`` returns.

        >>> import torch
        >>> not_plain({"model": {"w": torch.ones(1)}, "curve": [0.5, None], "round": 3}) is None
        True
        >>> not_plain({"epic": {0: {"keep": b"\\x80"}}})
        "state['epic'][0]['keep'] is bytes"
    """
    import torch

    if isinstance(value, torch.Tensor) or type(value) in PLAIN_VALUES:
        return None
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                return f"{where} has a key of type {type(key).__name__}"
            problem = not_plain(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            problem = not_plain(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    return f"{where} is {type(value).__name__}"


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plain tensors and containers, :func:`not_plain`) to ``path`` atomically; anything
    else is a TypeError naming the entry, and nothing is written."""
    from fedepic.outputs import atomic_torch_save  # torch is imported only by runs that checkpoint

    state = {"format_version": FORMAT_VERSION, **state}
    problem = not_plain(state)
    if problem:
        raise TypeError(f"checkpoint {path}: {problem}, not a plain tensor or container")
    atomic_torch_save(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a file that is not one is a one-line ConfigError."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file first
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, a foreign pickle and a zip error all mean "unusable"
        raise ConfigError(f"invalid value '{path}' for key 'resume': not a readable checkpoint "
                          f"({_load_failure(err)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"invalid value '{path}' for key 'resume': checkpoint format "
                          f"{state.get('format_version') if isinstance(state, dict) else '?'} is not {FORMAT_VERSION}")
    return state


def _load_failure(err: Exception) -> str:
    """Why torch.load refused a file, in a few words: the weights-only unpickler's own reason where it
    gives one (after several lines of advice), else the first line, cut at a word."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?: was not an allowed global|\.\s|\n|$)", text)
    first = reason.group(1) if reason else (text.strip().splitlines() or [type(err).__name__])[0]
    return textwrap.shorten(first, width=120, placeholder=" ...")


def truncate_metrics(folder: Path, size: Optional[int]) -> None:
    """Cut ``folder``/metrics.jsonl back to ``size`` bytes (None or 0: empty it)."""
    path = folder / "metrics.jsonl"
    if path.exists():  # O_NOFOLLOW: a link planted there is refused (ELOOP), never truncated through
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, min(size or 0, os.fstat(fd).st_size))
        finally:
            os.close(fd)


def _differences(stored: Mapping[str, Any], given: Mapping[str, Any], resumable: Sequence[str],
                 prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(given)):
        name = f"{prefix}{key}"
        a, b = stored.get(key), given.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, resumable, f"{name}.")
        elif a != b and not _resumable(name, resumable):
            out.append(f"key '{name}' is {json.dumps(a)} in the run and {json.dumps(b)} here")
    return out


def _resumable(key: str, resumable: Sequence[str]) -> bool:
    """``key`` is one of ``resumable`` or inside one of them (``figures.dpi``)."""
    return any(key == k or key.startswith(f"{k}.") for k in resumable)


def _run_folder(value: str) -> Path:
    """The folder ``resume=`` names; a killed run (or resume) leaves ``.NAME.partial``, accepted under
    either name."""
    path = Path(value).expanduser()
    if not path.is_dir():
        partial = path.parent / f".{path.name}.partial"
        if partial.is_dir():
            return partial
        raise ConfigError(f"invalid value '{value}' for key 'resume': not a run folder")
    return path


def _status(value: str, summary_path: Path) -> Optional[str]:
    """The run's status from its summary.json; "killed" when there is none."""
    if not summary_path.is_file():
        return "killed"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"invalid value '{value}' for key 'resume': {summary_path} is unreadable ({err})") from None
    return summary.get("status") if isinstance(summary, dict) else None


def resume_config(value: str, config: Optional[str], overrides: list[str]) -> tuple[Any, Resume]:
    """The config to continue the run in folder ``value`` with, and what the folder holds.

    Without ``config`` the stored config.yaml is used (``overrides`` on top); with it, the config it
    gives must equal the stored one in every key but :data:`RESUMABLE_KEYS`, else a one-line
    ConfigError names the first key that differs. A completed run, or a folder without a config, is
    refused the same way. A folder without a summary is a killed run (:data:`RESUMABLE_STATUSES`): do
    not resume a run that is still running: its folder is locked (fedepic.outputs.lock_folder), so the
    resume is refused when it opens it. A folder holding a link is refused (:func:`refuse_links`).
    """
    from fedepic.config import load_config, to_dict
    from fedepic.outputs import refuse_links

    folder = _run_folder(value)
    refuse_links(folder)  # again under the folder's lock, when the run reopens it (RunWriter)
    stored_path, summary_path = folder / "config.yaml", folder / "summary.json"
    if not stored_path.is_file():
        raise ConfigError(f"invalid value '{value}' for key 'resume': {folder} holds no config.yaml")
    status = _status(value, summary_path)
    if status not in RESUMABLE_STATUSES:
        raise ConfigError(f"invalid value '{value}' for key 'resume': the run's status is {status!r}; "
                          f"only {' or '.join(RESUMABLE_STATUSES)} runs can be resumed")
    stored = load_config(str(stored_path), [])
    given = load_config(config, overrides) if config else load_config(str(stored_path), overrides)
    resumable = RESUMABLE_KEYS + (SWEEP_RESUMABLE_KEYS if stored.sweep else ())
    differs = _differences(to_dict(stored), to_dict(given), resumable)
    if differs:
        raise ConfigError(f"resume refused: {differs[0]} (only {', '.join(resumable)} may change)")
    given.output_dir, given.name = str(folder.parent), stored.name  # the run continues where and as it is
    checkpoint_path = folder / CHECKPOINT
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    members = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "summary.json").is_file()):
        try:
            members[child.name] = json.loads((child / "summary.json").read_text())
        except (OSError, ValueError):
            members[child.name] = {}  # unreadable: not finished, so it runs again
    return given, Resume(folder, checkpoint, members)


def remove_checkpoints(folder: Path) -> None:
    """Delete the checkpoints of a run that completed: its results are final, the states are not needed."""
    for path in [folder / CHECKPOINT, *folder.glob(f"*/{CHECKPOINT}")]:
        path.unlink(missing_ok=True)
    for tmp in folder.glob(f"**/.{CHECKPOINT}.*.tmp"):
        tmp.unlink(missing_ok=True)


def metrics_size(folder: Path) -> int:
    """Bytes in ``folder``/metrics.jsonl now (0 when there is none)."""
    try:
        return os.stat(folder / "metrics.jsonl").st_size
    except FileNotFoundError:
        return 0
