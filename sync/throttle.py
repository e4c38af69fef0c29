"""Dataverse's Retry-After, as the workers wait for it.

Service protection counts per user, and every request sent during a penalty extends it. The Dataverse
client holds back every request of a user while a penalty runs, on every instance (dataverse/budget.py:
the one record of the user's penalties), and the workers look there before preparing work: a live event
goes back to its queue (with a little jitter, so they do not all return at once). A backfill page that is
already read and prepared waits a short penalty out in-process (`Patience`), and goes back to its queue
for a longer one, timed to come back shortly before the penalty ends (`return_delay`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from dataverse.errors import Busy, Throttled
from sync.rules import throttle_delay

T = TypeVar("T")


def reschedule_delay(retry_after: float | None) -> int:
    """Seconds a message waits on its queue for a penalty of `retry_after`, with jitter (sync/rules.py)."""
    return throttle_delay(retry_after, random.random())


def return_delay(wait: float, ahead: float) -> int:
    """Whole seconds (a queue's visibility delay) after which work held back for `wait` seconds comes back:
    at most `ahead` seconds before the penalty ends, so that it is read and prepared again meanwhile and
    waits the last moments in-process, instead of arriving after the budget came back."""
    return max(1, math.ceil(wait - ahead))


class Waits(Protocol):
    """A penalty to wait for: dataverse/budget.py's Budget."""

    def remaining(self, fresh: bool = False) -> float: ...

    def turn(self, limit: float | None = None) -> float: ...

    def caller_waits(self) -> AbstractContextManager[None]: ...


class Patience:
    """Dataverse calls of one piece of prepared work, waiting out the user's penalties in-process.

    A turn of at most `longest` seconds (the penalty's rest and the place among its waiters) is slept
    through while the work's `budget` of waiting lasts, and the call is made after it; a 429 the call
    meets (the client notes it in `waits`) is waited out the same way. A longer one raises
    Throttled(retry_after), for the caller to put the work back on its
    queue: a worker thread should not sit idle while it waits (the Python worker runs every function on
    one pool of PYTHON_THREADPOOL_THREAD_COUNT threads).
    """

    def __init__(self, waits: Waits, *, longest: float, budget: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.waits, self.longest, self.budget = waits, longest, budget
        self._sleep = sleep
        self.waited = 0.0

    def check(self) -> None:
        """Raise Throttled, as `call` would, when the penalty running now is longer than this work may wait:
        asked before work that going back to the queue would waste (a backfill page's claims)."""
        left = self.waits.remaining(fresh=True)
        if left > min(self.longest, self.budget - self.waited):
            raise Throttled("held back while Dataverse throttles this connection", retry_after=left)

    def call(self, fn: Callable[[], T]) -> T:
        while True:
            # The view of up to a second ago: each request of `fn` reads the user's row as it takes the
            # lease (dataverse/budget.py Budget.in_turn), so a penalty another instance has just met stops
            # it there, and it comes back here as Throttled.
            if self.waits.remaining() > 0:
                limit = min(self.longest, self.budget - self.waited)
                turn = self.waits.turn(limit)
                if turn > limit:
                    raise Throttled("held back while Dataverse throttles this connection", retry_after=turn)
                self.waited += turn
                self._sleep(turn)
                continue  # another call of this user may have been throttled meanwhile
            try:
                with self.waits.caller_waits():  # the client does not wait inline besides: this loop does
                    return fn()
            except Busy:
                raise  # no penalty to wait for: this instance's requests to the user are all in flight
            except Throttled:
                # the client noted the 429 in `waits`: the top of the loop decides; with nothing noted
                # there is nothing to wait for here
                if self.waits.remaining() <= 0:
                    raise
