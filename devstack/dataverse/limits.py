"""Service protection limits (research/dataverse.md §6, checklist 18) and the entitlement counter (19).

Per user and per web server, over a sliding window: the number of requests, their combined execution
time, and the number of requests in flight. A `$batch` or bulk request counts once but is charged its
whole execution time. Requests sent while a user is in penalty are refused again and extend the
penalty. Concurrency is refused immediately and carries no penalty.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

from devstack.dataverse.clock import Clock
from devstack.dataverse.errors import SimError


@dataclass
class Limits:
    requests: int = 6000
    execution_ms: int = 1_200_000
    concurrency: int = 52
    window_seconds: float = 300.0
    # Sending during a penalty pushes Retry-After further out (Microsoft: "the wait is extended").
    penalty_extension_seconds: float = 1.0
    concurrency_retry_after: int = 1
    servers: int = 1  # requests rotate over this many "web servers", each with its own windows
    enabled: bool = True


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class _Window:
    entries: deque = field(default_factory=deque)  # [arrival time, execution ms]
    exec_ms: float = 0.0
    in_flight: int = 0
    penalty_until: float = 0.0
    penalty_code: str = ""
    penalty_message: str = ""


@dataclass
class Ticket:
    key: tuple[str, int]
    entry: list


class ServiceProtection:
    def __init__(self, limits: Limits, clock: Clock) -> None:
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int], _Window] = {}
        self._next_server = 0
        self._entitlement: dict[str, deque[tuple[float, int]]] = {}

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()
            self._entitlement.clear()

    def _prune(self, window: _Window, now: float) -> None:
        horizon = now - self.limits.window_seconds
        while window.entries and window.entries[0][0] <= horizon:
            _, ms = window.entries.popleft()
            window.exec_ms -= ms

    def _throttle(self, window: _Window, now: float, retry_after: float, code: str, message: str) -> SimError:
        window.penalty_until = max(window.penalty_until, now + retry_after)
        window.penalty_code, window.penalty_message = code, message
        return self._error(retry_after, code, message)

    @staticmethod
    def _error(retry_after: float, code: str, message: str) -> SimError:
        return SimError(429, code, message, {"Retry-After": str(max(1, math.ceil(retry_after)))})

    def admit(self, user_id: str) -> Ticket:
        """Count a request in, or raise the 429 the real service would answer."""
        lim = self.limits
        with self._lock:
            server = self._next_server % max(1, lim.servers)
            self._next_server += 1
            key = (user_id, server)
            window = self._windows.setdefault(key, _Window())
            now = self.clock.now()
            self._prune(window, now)
            if lim.enabled:
                if now < window.penalty_until:
                    window.penalty_until += lim.penalty_extension_seconds
                    during = self._error(window.penalty_until - now, window.penalty_code, window.penalty_message)
                    during.during_penalty = True  # counted apart: a client that heeds Retry-After sends none
                    raise during
                if window.in_flight >= lim.concurrency:
                    raise self._error(lim.concurrency_retry_after, "0x80072326",
                                      f"Number of concurrent requests exceeded the limit of {lim.concurrency}.")
                if len(window.entries) >= lim.requests:
                    oldest = window.entries[-lim.requests][0] if lim.requests else now
                    raise self._throttle(
                        window, now, oldest + lim.window_seconds - now, "0x80072322",
                        f"Number of requests exceeded the limit of {lim.requests} over time window of "
                        f"{_seconds(lim.window_seconds)} seconds.")
                if window.exec_ms >= lim.execution_ms:
                    # Wait until enough execution time has left the window to fall under the limit.
                    excess, release_at = window.exec_ms - lim.execution_ms, now
                    for arrived, ms in window.entries:
                        excess -= ms
                        release_at = arrived
                        if excess < 0:
                            break
                    raise self._throttle(
                        window, now, release_at + lim.window_seconds - now, "0x80072321",
                        f"Combined execution time of incoming requests exceeded limit of {lim.execution_ms:,}  "
                        f"milliseconds over time window of {_seconds(lim.window_seconds)} seconds. Decrease "
                        "number of concurrent requests or reduce the duration of requests and try again later.")
            entry = [now, 0.0]
            window.entries.append(entry)
            window.in_flight += 1
            return Ticket(key, entry)

    def finish(self, ticket: Ticket, exec_ms: float) -> dict[str, str]:
        """Charge the request's execution time; returns the informational x-ms-ratelimit headers."""
        with self._lock:
            window = self._windows[ticket.key]
            window.in_flight -= 1
            ticket.entry[1] = exec_ms
            if window.entries and ticket.entry[0] > self.clock.now() - self.limits.window_seconds:
                window.exec_ms += exec_ms
            requests_left = max(0, self.limits.requests - len(window.entries))
            time_left = max(0.0, self.limits.execution_ms - window.exec_ms)
            return {
                "x-ms-ratelimit-burst-remaining-xrm-requests": str(requests_left),
                "x-ms-ratelimit-time-remaining-xrm-requests": f"{time_left:.2f}",
            }

    def in_flight(self) -> int:
        with self._lock:
            return sum(w.in_flight for w in self._windows.values())

    def count_operations(self, user_id: str, operations: int) -> None:
        """Entitlement (checklist 19): every CRUD counts, each inside a batch or bulk request too. Reported only."""
        if operations <= 0:
            return
        with self._lock:
            self._entitlement.setdefault(user_id, deque()).append((self.clock.now(), operations))

    def entitlement(self) -> dict[str, int]:
        with self._lock:
            horizon = self.clock.now() - 86_400
            report = {}
            for user_id, entries in self._entitlement.items():
                while entries and entries[0][0] <= horizon:
                    entries.popleft()
                report[user_id] = sum(n for _, n in entries)
            return report
