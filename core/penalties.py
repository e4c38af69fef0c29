"""Retry-After penalties remembered in this process, by key: the in-process part of a Dataverse user's
budget (dataverse/budget.py), which shares them with the app's other instances; it is the one record of
a user's penalties (the workers ask the budget, not a registry of their own).

Service protection counts per user, and every request sent during a penalty extends it
(https://learn.microsoft.com/power-apps/developer/data-platform/api-limits#retry-operations). So once
one request is throttled, the others with the same key hold back until the penalty is over; `turn`
lets in-process waiters go one after another instead of all at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STAGGER_SECONDS = 0.2


class Penalties:
    def __init__(self, clock: Callable[[], float] = time.monotonic, stagger: float = STAGGER_SECONDS) -> None:
        self._until: dict[str, float] = {}
        self._waiting: dict[str, int] = {}  # callers waiting out the key's current penalty in-process
        self._lock = threading.Lock()
        self._clock = clock
        self.stagger = stagger

    def note(self, key: str, retry_after: float) -> None:
        with self._lock:
            until = self._clock() + retry_after
            if until > self._until.get(key, 0.0):
                self._until[key] = until
                self._waiting[key] = 0

    def turn(self, key: str, limit: float | None = None, *, rank: int = 0, processes: int = 1) -> float:
        """Seconds an in-process caller waits before trying again: the penalty's end, plus `stagger` for
        every caller already waiting on it. All sending at the moment a penalty ends would be refused,
        all but one, and extend it; one by one, the first 429 stops the rest (Microsoft: ramp up
        gradually and let the server tell you its capacity). With `processes` sharing the penalty, this
        one (`rank` among them) starts `rank / processes` of a stagger later, so that their first callers
        do not go at the same instant either. A turn longer than `limit` is answered without taking the
        place: that caller does not wait here."""
        with self._lock:
            left = self._until.get(key, 0.0) - self._clock()
            if left <= 0:
                return 0.0
            place = self._waiting.get(key, 0)
            wait = left + (place + rank / processes) * self.stagger
            if limit is None or wait <= limit:
                self._waiting[key] = place + 1
            return wait

    def remaining(self, key: str) -> float:
        with self._lock:
            left = self._until.get(key, 0.0) - self._clock()
            if left <= 0:
                self._until.pop(key, None)
                return 0.0
            return left
