"""The clients a handler needs, built lazily once per process from the settings.

Handlers take what they need from here and pass it to plain functions as arguments, so the business
code never builds a client itself and tests can hand it simulators.
"""

from __future__ import annotations

import threading
from functools import cached_property

from core.connections import ConnectionStore
from core.failures import FailureStore
from core.settings import Settings, get_settings
from core.storage import QueueSender, Tables


class Services:
    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    @cached_property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    @cached_property
    def tables(self) -> Tables:
        return Tables(self.settings.storage)

    @cached_property
    def queues(self) -> QueueSender:
        return QueueSender(self.settings.storage)

    @cached_property
    def connections(self) -> ConnectionStore:
        return ConnectionStore(self.tables("connections"))

    @cached_property
    def failures(self) -> FailureStore:
        return FailureStore(self.tables("failures"))


_services: Services | None = None
_services_lock = threading.Lock()


def services() -> Services:
    global _services
    with _services_lock:
        if _services is None:
            _services = Services()
        return _services


def reset_services() -> None:
    """Forget every client (tests that change settings call this with get_settings.cache_clear())."""
    global _services
    with _services_lock:
        _services = None
