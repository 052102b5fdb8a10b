"""The member loop both modes share: a member's rounds, in order, from where it begins.

For round t = first, ..., ``cfg.rounds``:
1. stop at the start of a round once ``stop`` is set (RunInterrupted: the round before is whole);
2. play the round (the mode's round engine: ``fedepic.server_rounds.play_round``, ``fedepic.peer_rounds.play_round``),
   told whether a checkpoint is due after it (``checkpoint_every``; never after the last round);
3. report its metrics record (the member's metrics.jsonl);
4. the failure check: more than ``clients.max_failed_fraction`` of the nodes asked failed stops the run
   (RunFailed), after the report, so the failed round is on disk and a resume redoes it;
5. the checkpoint, when due.

The modes differ only in what a round is and where a member reports (a ``RunWriter`` for the server mode, a
``peer_rounds.RunSink`` for the decentralized mode); the order above, which resume relies on, is written
once, here. Cost: the rounds' own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fedepic.checkpoint import checkpoint_due
from fedepic.errors import RunInterrupted
from fedepic.failures import check_failures


@dataclass
class PlayedRound:
    """One round's outcome: its metrics record (with ``failures``), how many nodes were asked to work,
    and what the mode checkpoints from it (the decentralized nodes' states; None in the server mode,
    whose state lives in the member's ``Progress``)."""

    record: dict[str, Any]
    asked: int
    states: Any = None


def play_rounds(cfg: Any, name: str, first: int, play: Callable[[int, bool], PlayedRound],
                report: Callable[[PlayedRound], None], checkpoint: Callable[[int, PlayedRound], None],
                stop: Optional[threading.Event] = None, check: Callable[..., None] = check_failures
                ) -> Optional[PlayedRound]:
    """Rounds ``first`` to ``cfg.rounds`` of member ``name`` (module docstring): ``play(round, due)``
    plays one, ``report`` logs it, ``check(cfg, where, failures, asked)`` raises past the failure limit
    (``fedepic.failures.check_failures``), ``checkpoint(round, played)`` saves after it when due.
    Returns the last round played (None when none was left)."""
    played = None
    for round_ in range(first, cfg.rounds + 1):
        if stop is not None and stop.is_set():
            raise RunInterrupted("interrupted")
        due = checkpoint_due(cfg.checkpoint_every, round_, cfg.rounds)
        played = play(round_, due)
        report(played)
        check(cfg, f"{name}, round {round_}", played.record["failures"], played.asked)
        if due:
            checkpoint(round_, played)
    return played
