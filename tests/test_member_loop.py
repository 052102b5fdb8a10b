"""fedepic/member_loop.py: the order both modes' member loops rely on (stop, play, report, failure
check, checkpoint when due), checked on a scripted round."""

import threading
from types import SimpleNamespace

import pytest

from fedepic.errors import RunFailed, RunInterrupted
from fedepic.member_loop import PlayedRound, play_rounds


def config(rounds=5, checkpoint_every=2, max_failed_fraction=0.5):
    return SimpleNamespace(rounds=rounds, checkpoint_every=checkpoint_every,
                           clients=SimpleNamespace(max_failed_fraction=max_failed_fraction))


def run(cfg, first=1, failures=None, stop=None):
    events = []

    def play(round_, due):
        events.append(("play", round_, due))
        failed = (failures or {}).get(round_, [])
        return PlayedRound({"round": round_, "failures": failed}, 4, {"after": round_})

    last = play_rounds(cfg, "m", first, play, lambda p: events.append(("report", p.record["round"])),
                       lambda r, p: events.append(("checkpoint", r, p.states["after"])), stop)
    return events, last


def test_rounds_are_played_reported_and_checkpointed_in_order_never_after_the_last():
    events, last = run(config(rounds=5, checkpoint_every=2))
    assert events == [("play", 1, False), ("report", 1), ("play", 2, True), ("report", 2), ("checkpoint", 2, 2),
                      ("play", 3, False), ("report", 3), ("play", 4, True), ("report", 4), ("checkpoint", 4, 4),
                      ("play", 5, False), ("report", 5)]
    assert last.record["round"] == 5


def test_a_resumed_member_starts_after_its_checkpoint_and_one_with_no_rounds_left_plays_none():
    events, _ = run(config(rounds=5, checkpoint_every=0), first=4)
    assert [e for e in events if e[0] == "play"] == [("play", 4, False), ("play", 5, False)]
    events, last = run(config(rounds=5), first=6)
    assert events == [] and last is None


def test_a_round_past_the_failure_limit_is_reported_then_stops_the_run_before_its_checkpoint():
    """The failed round is on disk (reported) but not checkpointed, so a resume redoes it."""
    failures = {2: [{"reason": "boom"}] * 3}  # 3 of 4 nodes > 0.5
    events = []
    with pytest.raises(RunFailed, match="m, round 2: 3 of 4 clients failed"):
        def play(round_, due):
            events.append(("play", round_))
            return PlayedRound({"round": round_, "failures": failures.get(round_, [])}, 4)
        play_rounds(config(), "m", 1, play, lambda p: events.append(("report", p.record["round"])),
                    lambda r, p: events.append(("checkpoint", r)))
    assert events == [("play", 1), ("report", 1), ("play", 2), ("report", 2)]


def test_a_set_stop_event_interrupts_at_the_start_of_the_next_round():
    stop = threading.Event()
    events = []

    def play(round_, due):
        events.append(round_)
        if round_ == 2:
            stop.set()
        return PlayedRound({"round": round_, "failures": []}, 1)

    with pytest.raises(RunInterrupted):
        play_rounds(config(), "m", 1, play, lambda p: None, lambda r, p: None, stop)
    assert events == [1, 2]
