"""Penalties and Patience (core/penalties.py, sync/throttle.py) on a fake clock: who waits, how long, and who
is sent back."""

from __future__ import annotations

import pytest

from core.penalties import Penalties
from dataverse.budget import Budget
from dataverse.errors import Busy, Throttled
from sync.throttle import Patience, return_delay
from tests.fixtures.fake_time import FakeTime


def test_callers_waiting_on_one_penalty_are_let_go_one_after_another() -> None:
    t = FakeTime(100.0)
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
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)
    b.note(1.5)
    calls = []
    patience = Patience(b, longest=2, budget=5, sleep=t.sleep)
    assert patience.call(lambda: calls.append(t.now) or "ok") == "ok"
    assert t.slept == [1.5] and calls == [101.5]


def test_patience_sends_a_longer_penalty_back_without_calling() -> None:
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)
    b.note(8)
    patience = Patience(b, longest=2, budget=5, sleep=t.sleep)
    with pytest.raises(Throttled) as err:
        patience.call(lambda: pytest.fail("called during a long penalty"))
    assert err.value.retry_after == 8 and t.slept == []


def test_a_429_the_client_noted_is_waited_out_and_the_call_repeated() -> None:
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)
    answers: list[float | str] = [1.0, "landed"]

    def call() -> str:  # what the transport does on a 429: note it in the budget, raise Throttled
        answer = answers.pop(0)
        if isinstance(answer, float):
            b.note(answer)
            raise Throttled("busy", retry_after=answer)
        return answer

    patience = Patience(b, longest=2, budget=5, sleep=t.sleep)
    assert patience.call(call) == "landed"
    assert t.slept == [1.0]


def test_a_throttled_call_with_nothing_noted_and_a_busy_one_go_back_at_once() -> None:
    t = FakeTime(100.0)
    patience = Patience(Budget(clock=t.clock), longest=2, budget=5, sleep=t.sleep)
    for error in (Throttled("odd", retry_after=1), Busy("all slots in flight", retry_after=1)):
        with pytest.raises(Throttled):
            patience.call(lambda e=error: (_ for _ in ()).throw(e))
    assert t.slept == []


def test_the_budget_of_waiting_bounds_a_page_throttled_again_and_again() -> None:
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)

    def always_throttled() -> None:
        b.note(2)
        raise Throttled("busy", retry_after=2)

    patience = Patience(b, longest=2, budget=5, sleep=t.sleep)
    with pytest.raises(Throttled) as err:
        patience.call(always_throttled)
    assert t.slept == [2.0, 2.0]  # a third wait would pass the 5 s budget: back to the queue instead
    assert err.value.retry_after == 2


@pytest.mark.parametrize(("wait", "delay"), [(8.6, 6), (9, 6), (3.5, 1), (2.5, 1), (0.4, 1), (60, 57)])
def test_work_sent_back_returns_shortly_before_the_penalty_ends(wait: float, delay: int) -> None:
    assert return_delay(wait, 3.0) == delay
    assert delay >= 1 and (wait - delay <= 3.0)  # back at most 3 s before the end: time to prepare


def test_a_turn_beyond_the_limit_takes_no_place() -> None:
    t = FakeTime(100.0)
    p = Penalties(t.clock, stagger=0.5)
    p.note("a", 1)
    assert [p.turn("a", limit=2) for _ in range(3)] == [1.0, 1.5, 2.0]
    assert p.turn("a", limit=2) == 2.5  # would wait too long: not counted as waiting ...
    assert p.turn("a", limit=2) == 2.5  # ... so the next caller is told the same
    assert p.turn("a") == 2.5 and p.turn("a") == 3.0


def test_waiters_beyond_the_patience_limit_go_back_instead_of_queueing_up() -> None:
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)
    b.note(1.5)
    assert [round(b.turn(), 3) for _ in range(3)] == [1.5, 1.7, 1.9]  # three pages of this instance wait
    patience = Patience(b, longest=2, budget=5, sleep=t.sleep)
    with pytest.raises(Throttled) as err:  # a fourth would wait 2.1 s: back to the queue instead
        patience.call(lambda: pytest.fail("called"))
    assert err.value.retry_after == pytest.approx(2.1) and t.slept == []


def test_work_that_could_not_wait_the_penalty_out_is_told_before_it_starts() -> None:
    """Patience.check: a backfill page asks before claiming its rows, which going back would waste."""
    t = FakeTime(100.0)
    b = Budget(clock=t.clock)
    patience = Patience(b, longest=5, budget=8, sleep=t.sleep)
    patience.check()  # no penalty
    b.note(4)
    patience.check()  # one it may wait out in-process
    b.note(9)
    with pytest.raises(Throttled) as err:
        patience.check()
    assert err.value.retry_after == 9 and t.slept == []
