"""SIGINT and SIGTERM for one run: the first one stops the run, and the run still writes a true status.

`kill`, `docker stop` and cluster schedulers send SIGTERM; a terminal sends SIGINT. Both mean "stop
now, keep what is done". While an `Interrupts` is entered (main thread only, as Python allows):

- the first signal sets ``stop`` and records its number. Unless the main thread is inside
  :meth:`Interrupts.polled` (a Flower run, whose ServerApp winds down by itself at a message boundary,
  or a run writing its summaries, which must not be cut short), it also raises
  :class:`~fedepic.errors.RunInterrupted` in the main thread;
- later signals are ignored: the run is writing its summaries (each file atomically). Raising again
  there would cut a summary short, and a second KeyboardInterrupt in Flower's mode left its server
  thread running and the interpreter waiting for it at exit;
- a watchdog bounds that wind-down: ``grace_s`` after the first signal the process exits with
  128 + the signal's number whatever is still running (one line on stderr). Leaving the outermost
  ``with`` disarms it, unless a non-daemon thread is still alive then (the interpreter would wait).

The exit status of an interrupted run is 128 + signum: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional

from fedepic.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """Handlers for SIGINT and SIGTERM while entered; see the module docstring.

    Parameters
    ----------
    grace_s : float
        Seconds the run may take to wind down after the first signal before the process exits (a
        Flower round in flight finishes first: its clients are not cut off mid-task).
    """

    def __init__(self, grace_s: float = 300.0) -> None:
        self.grace_s = grace_s
        self.stop = threading.Event()
        self.signum: Optional[int] = None
        self._polled = 0
        self._saved: list[dict[int, Any]] = []  # one entry per (nested) __enter__
        self._disarmed = threading.Event()

    def __enter__(self) -> "Interrupts":
        saved = {}
        if threading.current_thread() is threading.main_thread():
            saved = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        if not self._saved:
            self._disarmed.clear()
            # Started here, not in the handler: a handler runs between the main thread's bytecodes,
            # and starting a thread there can deadlock on threading's own locks.
            threading.Thread(target=self._watch, name="fedepic-interrupt-watchdog", daemon=True).start()
        self._saved.append(saved)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.pop().items():
            signal.signal(sig, handler)
        if not self._saved and not _other_threads_alive():
            self._disarmed.set()  # wound down; a thread still alive keeps the bound on the exit

    def _watch(self) -> None:
        while not self._disarmed.is_set():
            if self.stop.wait(0.5):
                if not self._disarmed.wait(self.grace_s):
                    _exit_now(self.signum or signal.SIGINT, self.grace_s)
                return

    @contextmanager
    def polled(self) -> Iterator[None]:
        """Inside, a signal only sets ``stop``: the code running here polls it and raises itself."""
        self._polled += 1
        try:
            yield
        finally:
            self._polled -= 1

    def raise_if_stopped(self) -> None:
        """Raise RunInterrupted (with the signal's number) when a signal has arrived."""
        if self.stop.is_set():
            raise RunInterrupted(f"interrupted by {_name(self.signum)}", signum=self.signum)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            return  # already winding down: see the module docstring
        self.signum = signum
        self.stop.set()
        if not self._polled:
            raise RunInterrupted(f"interrupted by {_name(signum)}", signum=signum)


def exit_status(err: BaseException) -> int:
    """128 + the signal that interrupted the run (SIGINT for a plain KeyboardInterrupt)."""
    return 128 + int(getattr(err, "signum", None) or signal.SIGINT)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # the disk refused a write


def cli_outcome(prog: str, err: BaseException) -> Optional[int]:
    """The one stderr line a command (``prog``) prints for ``err``, and its exit status: 2 for bad input
    or a refused write, 1 for a failed run, 128 + the signal for an interruption. None for anything else
    (a bug), which the caller re-raises so that its traceback shows."""
    from fedepic.errors import ConfigError, DataError, RunFailed

    if isinstance(err, (ConfigError, DataError)):
        line, status = f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", 2
    elif isinstance(err, ModuleNotFoundError):
        line, status = f"error: this needs the missing package '{err.name}' (pip install -e .)", 2
    elif isinstance(err, RunFailed):
        line, status = f"run failed: {err}", 1
    elif isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        line, status = f"error: cannot write {err.filename or 'a file'}: {err.strerror}", 2
    elif isinstance(err, KeyboardInterrupt):
        line, status = "interrupted; finished parts were kept", exit_status(err)
    else:
        return None
    print(f"{prog}: {line}", file=sys.stderr)
    return status


def _name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum else "SIGINT"


def _other_threads_alive() -> bool:
    """Non-daemon threads besides this one: the interpreter would wait for them at exit."""
    me = threading.current_thread()
    return any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate())


def _exit_now(signum: int, grace_s: float) -> None:
    print(f"fedepic: the run did not stop within {grace_s:.0f} s of {_name(signum)}; exiting", file=sys.stderr)
    sys.stderr.flush()
    os._exit(128 + signum)
