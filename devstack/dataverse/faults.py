"""Fault injection (checklist 23): scripted next-N faults and random rates, for the Web API paths only.

Kinds:
  status         answer `status` (5xx, or 400/403/404/412/429) with the documented Dataverse error body
                 for that status (override with code/message; 429 carries Retry-After: retry_after)
  token_expired  answer 401 as for an expired access token
  drop           close the connection without answering
  timeout        hold the request for `delay` seconds, then drop it (the client's read timeout fires)
  slow           hold the request for `delay` seconds, then serve it normally
  hold           block until release() (or `delay` as a safety cap), then serve it normally; lets a test
                 keep requests in flight without timing assumptions

A status fault with `in_batch` answers one request inside a `$batch` instead of a request on the wire: that
part's response carries the error and the batch goes on as the documented service does (with
`Prefer: odata.continue-on-error` the other parts run, without it the batch stops there), e.g. a plug-in
that refuses to delete one row
(https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import asdict, dataclass

KINDS = {"status", "token_expired", "drop", "timeout", "slow", "hold"}


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 503
    delay: float = 30.0
    match: str | None = None  # substring the request path must contain
    method: str | None = None
    code: str | None = None  # status faults: the error body (default: the documented one for the status)
    message: str | None = None
    retry_after: int = 1  # status 429: the Retry-After header
    in_batch: bool = False  # answers a request inside a $batch (status faults only), not one on the wire

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")
        if self.in_batch and self.kind != "status":
            raise ValueError("only a status fault can answer a request inside a $batch")

    def applies(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (self.match is None or self.match in path)


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._script: deque[Fault] = deque()
        self._rates: list[tuple[Fault, float]] = []
        self._rng = random.Random(seed)
        self._release = threading.Event()
        self.injected = 0

    def script(self, *faults: Fault) -> None:
        """Queue faults for the next matching requests, one request each, in order."""
        with self._lock:
            self._script.extend(faults)

    def set_rates(self, rates: list[tuple[Fault, float]]) -> None:
        """Random faults: each (fault, probability) is drawn independently per request."""
        with self._lock:
            self._rates = list(rates)

    def clear(self) -> None:
        with self._lock:
            self._script.clear()
            self._rates = []
        self.release()

    def release(self) -> None:
        """Let held requests go; later `hold` faults block again."""
        self._release.set()
        self._release = threading.Event()

    def pending(self) -> list[dict]:
        with self._lock:
            return [asdict(f) for f in self._script]

    def pick(self, method: str, path: str, *, in_batch: bool = False) -> Fault | None:
        """The fault for a request on the wire, or (`in_batch`) for a request inside a $batch."""
        with self._lock:
            for i, fault in enumerate(self._script):
                if fault.in_batch == in_batch and fault.applies(method, path):
                    del self._script[i]
                    self.injected += 1
                    return fault
            for fault, rate in self._rates:
                if fault.in_batch == in_batch and fault.applies(method, path) and self._rng.random() < rate:
                    self.injected += 1
                    return fault
        return None

    def wait_for_release(self, timeout: float) -> None:
        self._release.wait(timeout)
