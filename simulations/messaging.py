"""Messages of the simulations: waiting for nodes and a stop-aware exchange (the failure check of a round
is ``fedepic.failures``, shared with the in-process engines)."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Optional

from fedepic.errors import RunInterrupted

PULL_INTERVAL_S = 0.01  # Flower's own send_and_receive polls every 0.1 s; replies arrive sooner


def wait_for_nodes(grid: Any, n: int, timeout_s: float = 120.0, stop: Optional[threading.Event] = None) -> list[int]:
    """Block until `n` nodes are registered (the ServerApp may start before the SuperNodes); their ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if stop is not None and stop.is_set():
            raise RunInterrupted("interrupted while waiting for nodes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {n} nodes registered within {timeout_s:.0f} s")
        time.sleep(0.05)


def exchange(grid: Any, messages: Iterable[Any], timeout_s: float = 3600.0,
             stop: Optional[threading.Event] = None) -> list[Any]:
    """`grid.send_and_receive`, but it polls faster and raises RunInterrupted as soon as `stop` is set.

    Replies come back in any order; a node that crashed answers with an error Message. Nodes that
    do not answer within `timeout_s` are simply missing from the result.
    """
    pending = set(grid.push_messages(list(messages)))
    replies: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise RunInterrupted("interrupted while waiting for replies")
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(PULL_INTERVAL_S)
    return replies
