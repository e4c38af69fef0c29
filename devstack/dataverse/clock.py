"""Time and id sources. Both can be made deterministic (checklist 24) so benchmark runs are reproducible
and tests can move time forward (e.g. past a service-protection window) without sleeping."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime


class Clock:
    """Wall clock by default; `manual=True` starts at `start` and moves only through advance()."""

    def __init__(self, manual: bool = False, start: float = 1_795_000_000.0) -> None:
        self.manual = manual
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        if not self.manual:
            return time.time()
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if not self.manual:
            raise RuntimeError("advance() needs a manual clock (DataverseSimulator(manual_clock=True))")
        with self._lock:
            self._now += seconds

    def iso(self) -> str:
        return datetime.fromtimestamp(self.now(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Ids:
    """uuid4 by default; with a seed, uuid5 over a counter (the same sequence on every run)."""

    def __init__(self, seed: str | None = None) -> None:
        self.seed = seed
        self._counter = 0
        self._lock = threading.Lock()

    def new(self) -> str:
        if self.seed is None:
            return str(uuid.uuid4())
        with self._lock:
            self._counter += 1
            return str(uuid.uuid5(uuid.NAMESPACE_OID, f"dataverse-sim/{self.seed}/{self._counter}"))
