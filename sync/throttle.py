"""Dataverse's Retry-After, remembered per connection in this process.

Service protection counts per user, and every request sent during a penalty extends it. So once one
message of a connection is throttled, the others of that connection hold back without calling
Dataverse until the penalty is over: a live event goes back to its queue (with a little jitter, so they
do not all return at once); a backfill page that is already read and prepared may wait a short penalty
out in-process (`Patience`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from core.penalties import Penalties
from dataverse.errors import Throttled
from sync.rules import throttle_delay

T = TypeVar("T")


def reschedule_delay(retry_after: float | None) -> int:
    """Seconds a message waits on its queue for a penalty of `retry_after`, with jitter (sync/rules.py)."""
    return throttle_delay(retry_after, random.random())


penalties = Penalties()


class Patience:
    """Dataverse calls of one piece of prepared work, waiting out the connection's penalties in-process.

    A penalty of at most `longest` seconds is slept through (while the work's `budget` of waiting lasts)
    and the call is made after it; a 429 is noted for the whole connection and waited out the same way.
    A longer penalty raises Throttled(retry_after), for the caller to put the work back on its queue:
    a function should not sit idle for minutes, but going through the queue costs at least a second
    of visibility granularity and polling, and the preparation again.
    """

    def __init__(self, key: str, *, longest: float, budget: float, registry: Penalties = penalties,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.key, self.longest, self.budget = key, longest, budget
        self.registry, self._sleep = registry, sleep
        self.waited = 0.0

    def call(self, fn: Callable[[], T]) -> T:
        while True:
            wait = self.registry.remaining(self.key)
            if wait > 0:
                if wait > min(self.longest, self.budget - self.waited):
                    raise Throttled("held back while Dataverse throttles this connection", retry_after=wait)
                wait = self.registry.turn(self.key)
                self.waited += wait
                self._sleep(wait)
                continue  # another call of this connection may have been throttled meanwhile
            try:
                return fn()
            except Throttled as exc:
                self.registry.note(self.key, exc.retry_after)
