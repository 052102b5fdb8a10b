"""When failed nodes stop a run: the check every round engine makes after a round (server-based and
decentralized, in process or on Ray), and the one line of an error text it quotes.

A failure is a node or client that raised, whose worker died, or that did not answer before the
timeout (``{"node", "reason", ...}``). A round goes on without its failures until more than
``clients.max_failed_fraction`` of the asked nodes failed, or all of them did:

>>> from types import SimpleNamespace
>>> cfg = SimpleNamespace(clients=SimpleNamespace(max_failed_fraction=0.5))
>>> check_failures(cfg, "gossip, round 1", [{"reason": "worker died"}] * 2, 4)  # 2 of 4: goes on
>>> check_failures(cfg, "gossip, round 1", [{"reason": "Traceback\\nValueError: bad"}] * 3, 4)
Traceback (most recent call last):
...
fedepic.errors.RunFailed: gossip, round 1: 3 of 4 clients failed (clients.max_failed_fraction=0.5); first: ValueError: bad

Cost: O(1) per round (the failures are counted, the first one's text is split into lines).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedepic.errors import RunFailed


def check_failures(cfg: Any, what: str, failures: Sequence[Mapping[str, Any]], asked: int) -> None:
    """Raise RunFailed when every one of ``asked`` clients failed, or more than clients.max_failed_fraction."""
    limit = cfg.clients.max_failed_fraction
    if asked and failures and (len(failures) == asked or len(failures) > limit * asked):
        raise RunFailed(f"{what}: {len(failures)} of {asked} clients failed (clients.max_failed_fraction={limit}); "
                        f"first: {last_line(str(failures[0].get('reason', '?')))}")


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of an error text (a Ray traceback ends with the exception's message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "?")[:limit]
