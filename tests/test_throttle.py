"""Penalties and Patience (sync/throttle.py) on a fake clock: who waits, how long, and who is sent back."""

from __future__ import annotations

import pytest

from core.penalties import Penalties
from dataverse.errors import Throttled
from sync.throttle import Patience


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


def test_callers_waiting_on_one_penalty_are_let_go_one_after_another() -> None:
    t = FakeTime()
    p = Penalties(t.clock, stagger=0.2)
    assert p.turn("a") == 0.0  # no penalty: go now
    p.note("a", 3)
    p.note("a", 1)  # a shorter Retry-After does not shorten the penalty
    assert p.remaining("a") == 3 and p.remaining("b") == 0
    assert [round(p.turn("a"), 3) for _ in range(3)] == [3.0, 3.2, 3.4]
    p.note("a", 5)  # a new, longer penalty: the queue starts again
    assert round(p.turn("a"), 3) == 5.0
    t.now += 5
    assert p.remaining("a") == 0 and p.turn("a") == 0.0


def test_patience_waits_out_a_short_penalty_then_calls() -> None:
    t = FakeTime()
    p = Penalties(t.clock)
    p.note("a", 4)
    calls = []
    patience = Patience("a", longest=15, budget=30, registry=p, sleep=t.sleep)
    assert patience.call(lambda: calls.append(t.now) or "ok") == "ok"
    assert t.slept == [4.0] and calls == [104.0]


def test_patience_sends_a_long_penalty_back_without_calling() -> None:
    t = FakeTime()
    p = Penalties(t.clock)
    p.note("a", 60)
    patience = Patience("a", longest=15, budget=30, registry=p, sleep=t.sleep)
    with pytest.raises(Throttled) as err:
        patience.call(lambda: pytest.fail("called during a long penalty"))
    assert err.value.retry_after == 60 and t.slept == []


def test_a_429_is_noted_for_the_connection_waited_out_and_the_call_repeated() -> None:
    t = FakeTime()
    p = Penalties(t.clock)
    answers = [Throttled("busy", retry_after=6), "landed"]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    patience = Patience("a", longest=15, budget=30, registry=p, sleep=t.sleep)
    assert patience.call(call) == "landed"
    assert t.slept == [6.0]
    other = Patience("a", longest=15, budget=30, registry=p, sleep=t.sleep)
    p.note("a", 2)
    other.call(lambda: None)  # another page of the connection waits too, it does not call into the penalty
    assert t.slept == [6.0, 2.0]


def test_the_budget_of_waiting_bounds_a_page_throttled_again_and_again() -> None:
    t = FakeTime()
    p = Penalties(t.clock)

    def always_throttled() -> None:
        raise Throttled("busy", retry_after=12)

    patience = Patience("a", longest=15, budget=30, registry=p, sleep=t.sleep)
    with pytest.raises(Throttled) as err:
        patience.call(always_throttled)
    assert t.slept == [12.0, 12.0]  # a third wait would pass the 30 s budget: back to the queue instead
    assert err.value.retry_after == 12
