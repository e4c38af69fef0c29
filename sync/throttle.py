"""Dataverse's Retry-After, remembered per connection in this process.

Service protection counts per user, and every request sent during a penalty extends it. So once one
message of a connection is throttled, the others of that connection are rescheduled without calling
Dataverse until the penalty is over, and each with a little jitter, so they do not all return at once.
"""

from __future__ import annotations

import random
import threading
import time

from sync.rules import throttle_delay


class Penalties:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, key: str, retry_after: float) -> None:
        with self._lock:
            self._until[key] = max(self._until.get(key, 0.0), time.monotonic() + retry_after)

    def remaining(self, key: str) -> float:
        with self._lock:
            left = self._until.get(key, 0.0) - time.monotonic()
            if left <= 0:
                self._until.pop(key, None)
                return 0.0
            return left

    @staticmethod
    def delay(retry_after: float | None) -> int:
        return throttle_delay(retry_after, random.random())


penalties = Penalties()
