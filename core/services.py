"""The clients a handler needs, built lazily once per process from the settings.

Handlers take what they need from here and pass it to plain functions as arguments, so the business
code never builds a client itself and tests can hand it simulators.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from core.connections import Connection, ConnectionStore
from core.failures import FailureStore
from core.settings import Settings, get_settings
from core.storage import QueueSender, Tables

if TYPE_CHECKING:
    from azure.keyvault.secrets import SecretClient

    from oauth.token_store import TokenStore


class Services:
    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._dataverse: dict[tuple[str, str], Any] = {}
        self._dataverse_lock = threading.Lock()

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

    @cached_property
    def secrets(self) -> SecretClient:
        from oauth.token_store import secret_client

        return secret_client(self.settings)

    @cached_property
    def tokens(self) -> TokenStore:
        """Access tokens per connection: `tokens.provider(conn)(force_refresh) -> str` (raises ReauthRequired)."""
        from oauth.token_store import TokenStore

        return TokenStore(self.settings, self.secrets, self.connections)

    def dataverse(self, conn: Connection) -> Any:
        """The DataverseClient of a live connection, one per instance URL and generation in this process.

        Its calls raise oauth.errors.ReauthRequired once Microsoft refuses the connection's sign-in.
        """
        from oauth.errors import NotConnected

        if not conn.active or not conn.generation or not conn.instance_url:
            raise NotConnected(conn.account_id, f"account {conn.account_id} has no active Dynamics connection")
        key = (conn.instance_url, conn.generation)
        with self._dataverse_lock:
            client = self._dataverse.get(key)
            if client is None:
                for old in [k for k in self._dataverse if k[0] == key[0]]:  # an earlier generation's client
                    del self._dataverse[old]
                client = self._dataverse[key] = self.dataverse_client(conn.instance_url, self.tokens.provider(conn))
            return client

    def dataverse_client(self, base_url: str, token_provider: Callable[[bool], str]) -> Any:
        """A new DataverseClient (the connect flow's access check uses one with the fresh sign-in's token)."""
        from sync.dataverse import DataverseClient

        dev = self.settings.dev if self.settings.is_development else None
        return DataverseClient(base_url, token_provider, verify=(dev.ca_bundle if dev and dev.ca_bundle else True))


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
