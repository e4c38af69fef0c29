"""The composition root: every client the handlers need, built lazily once per process from the settings.

Handlers take what they need from here and pass it to plain functions as arguments, so the business code
never builds a client itself and tests can hand it simulators. This is the only place that knows every
floor (core, dataverse, oauth, sync).
"""

from __future__ import annotations

import threading
from functools import cached_property

from azure.keyvault.secrets import SecretClient

from core.connections import Connection, ConnectionStore, live_connection
from core.failures import TABLE as FAILURES
from core.failures import FailureStore
from core.settings import Settings, get_settings
from core.storage import QueueSender, Tables
from dataverse.budget import TABLE as BUDGETS
from dataverse.budget import Budget, Budgets, TableBudgetStore
from dataverse.client import DataverseClient
from dataverse.lease import WINDOW_SECONDS
from dataverse.transport import TokenProvider
from oauth.errors import NotConnected
from oauth.token_store import TokenStore, secret_client
from sync.context import SyncContext
from sync.holds import TABLE as HOLDS
from sync.holds import HoldStore
from sync.owners import TABLE as OWNERS
from sync.owners import OwnerCache
from sync.pending import DRAINS, PendingStore
from sync.state import SNAPSHOTS, STATE, ContactStateStore, SnapshotStore
from sync.wave_api import WaveClient
from sync.webhook import LiveConnections


class Services:
    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._dataverse: dict[tuple[str, str], DataverseClient] = {}
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
        return FailureStore(self.tables(FAILURES))

    @cached_property
    def budgets(self) -> Budgets:
        """Each Dataverse user's penalties and concurrency, shared with the app's other instances through a
        Table (dataverse/budget.py)."""
        window = self.settings.dev.dataverse_window_seconds or WINDOW_SECONDS
        return Budgets(TableBudgetStore(self.tables(BUDGETS)), window)

    @cached_property
    def secrets(self) -> SecretClient:
        return secret_client(self.settings)

    @cached_property
    def tokens(self) -> TokenStore:
        """Access tokens per connection: `tokens.provider(conn)(force_refresh) -> str` (raises ConnectionGone)."""
        return TokenStore(self.settings, self.secrets, self.connections)

    @cached_property
    def live_connections(self) -> LiveConnections:
        """The webhook's short cache of live connections (sync/webhook.py)."""
        return LiveConnections(self.connections)

    @cached_property
    def pending(self) -> PendingStore:
        """The live lane's pending changes and drain markers (sync/pending.py)."""
        return PendingStore(self.tables(SNAPSHOTS), self.tables(DRAINS))

    @cached_property
    def sync(self) -> SyncContext:
        """What the contact and page workers need."""
        return SyncContext(
            connections=self.connections, failures=self.failures,
            snapshots=SnapshotStore(self.tables(SNAPSHOTS)), states=ContactStateStore(self.tables(STATE)),
            owners=OwnerCache(self.tables(OWNERS)), queues=self.queues, holds=HoldStore(self.tables(HOLDS)),
            dataverse=self.dataverse,
            wave=WaveClient(self.settings.wave_api_base_url, self.settings.wave_api_token),
        )

    def dataverse(self, conn: Connection) -> DataverseClient:
        """The DataverseClient of a live connection, one per instance URL and generation in this process.

        Its calls raise oauth.errors.ReauthRequired once Microsoft refuses the connection's sign-in.
        """
        live = live_connection(conn)
        if live is None:
            raise NotConnected(conn.account_id, f"account {conn.account_id} has no active Dynamics connection")
        key = (live.instance_url, live.generation)
        with self._dataverse_lock:
            client = self._dataverse.get(key)
            if client is None:
                for old in [k for k in self._dataverse if k[0] == key[0]]:  # an earlier generation's client
                    del self._dataverse[old]
                # Service protection counts per user: connections signed in as one user share a budget.
                budget = self.budgets(live.instance_url, live.dataverse_user_id or live.connected_by or live.account_id)
                client = self._dataverse[key] = self.dataverse_client(live.instance_url, self.tokens.provider(live),
                                                                      budget=budget)
            return client

    def dataverse_client(self, base_url: str, token_provider: TokenProvider, budget: Budget | None = None
                         ) -> DataverseClient:
        """A new DataverseClient (the connect flow's access check uses one with the fresh sign-in's token and
        a budget of its own)."""
        dev = self.settings.dev if self.settings.is_development else None
        return DataverseClient(base_url, token_provider, verify=(dev.ca_bundle if dev and dev.ca_bundle else True),
                               budget=budget)


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




