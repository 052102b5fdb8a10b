"""`flwr run ... --stream` within a time limit, with an exit status that says how the run ended.

    python -m simulations.flwr_run [--timeout SECONDS] [FLWR RUN ARGUMENTS ...]

e.g. ``python -m simulations.flwr_run --timeout 900 . local --run-config "..." --federation-config
"num-supernodes=20"``. `flwr run --stream` alone exits 0 however the run ends, and prints nothing more
when the Flower runtime process (`flwr-simulation`) dies without reporting: the SuperLink marks the run
``finished:failed`` ("No heartbeat received from the task") about 60 s later and the stream just ends.
This wrapper streams the same lines, reads the run's status from the SuperLink (`flwr ls --run-id`)
when the stream ends, and exits

- 0 when the run finished ``completed``;
- 1 when it finished otherwise (failed, stopped), or no run was started; the status and its details
  are printed;
- 124 when it had not finished within ``--timeout`` seconds: the run is stopped (`flwr stop`) first;
- 2, before starting anything, when the local SuperLink already running on the port runs in a deleted
  folder (Linux): `flwr run` would use it whatever FLWR_HOME says, and its runtime process dies at
  ``import torch`` there ("Intel oneMKL FATAL ERROR"), without a word on the stream.

It never stops the SuperLink (see the README for that).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

STARTED = re.compile(r"Successfully started run (\d+)")
VALUE_OPTIONS = {"--federation", "--run-config", "-c", "--federation-config", "--format"}  # flwr run's
CLI_TIMEOUT_S = 60.0  # one `flwr ls` or `flwr stop`
POLL_S = 2.0
LOCAL_PORT = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")  # flwr/cli/constant.py: the local SuperLink's port
DEAD_TASK_HINT = ("the Flower runtime process (flwr-simulation) ended without reporting. Its output is not "
                  "kept: see the SuperLink's log ($FLWR_HOME/local-superlink/superlink.log) and check that "
                  "the SuperLink serving this connection was started from this checkout and environment "
                  "(`flwr run` reuses whichever SuperLink already listens on the port, whatever FLWR_HOME "
                  "says, and runs the app in that SuperLink's working directory and environment)")


def listener(port: int) -> Optional[int]:
    """The process that listens on TCP ``port`` (Linux /proc); None where none or unknown."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
        listening = (row for row in rows if row[3] == "0A")  # state LISTEN
        sockets |= {f"socket:[{row[9]}]" for row in listening if int(row[1].rsplit(":", 1)[1], 16) == port}
    for proc in (p for p in Path("/proc").iterdir() if sockets and p.name.isdigit()):
        try:
            if any(os.readlink(fd) in sockets for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def check_local_superlink(superlink: Optional[str]) -> Optional[str]:
    """An error message when the local SuperLink that `flwr run` would reuse runs in a deleted folder;
    else None (after one line naming a reused SuperLink and where its run folders go)."""
    if superlink not in (None, "local"):
        return None
    port = int(os.environ.get(*LOCAL_PORT))
    pid = listener(port)
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd") if pid is not None else None
    except OSError:
        cwd = None
    if cwd is None:
        return None
    if cwd.endswith(" (deleted)"):
        return (f"fedepic: the SuperLink on 127.0.0.1:{port} (pid {pid}) runs in a deleted folder ({cwd}): every run "
                f"it starts dies at `import torch`, silently. Stop it (kill -TERM {pid}) and run again")
    print(f"fedepic: reusing the SuperLink on 127.0.0.1:{port} (pid {pid}; its environment, FLWR_HOME and "
          f"working directory: run folders go under {cwd})", file=sys.stderr)
    return None


def flwr_executable() -> str:
    """The `flwr` beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise SystemExit("fedepic: `flwr` not found beside this Python or on PATH (pip install 'flwr[simulation]')")
    return found


def superlink_of(args: Sequence[str]) -> Optional[str]:
    """The SUPERLINK argument of `flwr run [APP] [SUPERLINK]` (None: flwr's default connection)."""
    positional, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            positional.append(arg)
    return positional[1] if len(positional) > 1 else None


def run_status(flwr: str, run_id: str, superlink: Optional[str]) -> Optional[dict]:
    """The run as `flwr ls --run-id ID --format json` lists it; None when the SuperLink does not answer."""
    command = [flwr, "ls", *([superlink] if superlink else []), "--run-id", run_id, "--format", "json"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S).stdout
        runs = json.loads(out[out.index("{"):]).get("runs", [])
    except (subprocess.TimeoutExpired, ValueError):
        return None
    return next((run for run in runs if str(run.get("run-id")) == run_id), None)


def stop_run(flwr: str, run_id: str, superlink: Optional[str]) -> None:
    command = [flwr, "stop", run_id, *([superlink] if superlink else [])]
    try:
        subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass


def end(child: subprocess.Popen) -> None:
    """Stop the `flwr run` client we started (its process only: the SuperLink runs detached)."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.flwr_run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds the run may take, from the start of `flwr run` (default 3600)")
    ours, args = parser.parse_known_args(argv)
    flwr = flwr_executable()
    superlink = superlink_of(args)
    refused = check_local_superlink(superlink)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    deadline = time.monotonic() + ours.timeout
    command = [flwr, "run", *args, *([] if "--stream" in args else ["--stream"])]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_ids: list[str] = []

    def relay() -> None:  # the stream's lines, as they come; the run id from them
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if not run_ids and (found := STARTED.search(line)):
                run_ids.append(found.group(1))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        try:
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:  # Ctrl-C: the run on the SuperLink is stopped too, not left going
            if run_ids:
                stop_run(flwr, run_ids[0], superlink)
            print("fedepic: interrupted" + (f"; run {run_ids[0]} stopped (flwr stop)" if run_ids else ""),
                  file=sys.stderr)
            return 130
        if child.poll() is not None:
            reader.join(5)  # the stream's last lines
        status = None
        # the stream ended (or the time is up): the SuperLink says how the run stands. A run whose runtime
        # died is marked finished within Flower's heartbeat patience (2 x 30 s); one still running (the
        # stream broke off) is waited for, up to the deadline
        while run_ids:
            status = run_status(flwr, run_ids[0], superlink)
            if (status and str(status.get("status", "")).startswith("finished")) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        finished = status is not None and str(status.get("status", "")).startswith("finished")
        if not finished and time.monotonic() >= deadline:
            if run_ids:
                stop_run(flwr, run_ids[0], superlink)
            print(f"fedepic: flwr run did not finish within {ours.timeout:.0f} s"
                  + (f"; run {run_ids[0]} stopped (flwr stop)" if run_ids else "; no run was started"),
                  file=sys.stderr)
            return 124
    finally:
        end(child)
    if not run_ids:
        print(f"fedepic: flwr run started no run (exit status {child.returncode})", file=sys.stderr)
        return child.returncode or 1
    if status is None:
        print(f"fedepic: run {run_ids[0]}: the SuperLink did not report its status", file=sys.stderr)
        return 1
    state, details = str(status.get("status")), str(status.get("status-details", ""))
    if state == "finished:completed":
        print(f"fedepic: run {run_ids[0]} {state}", file=sys.stderr)
        return 0
    hint = f"; {DEAD_TASK_HINT}" if "heartbeat" in details.lower() else ""
    print(f"fedepic: run {run_ids[0]} {state}: {details}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
