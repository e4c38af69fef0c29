"""What the contact and page workers need, handed in by the composition root (functions/services.py);
tests build their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from core.connections import ConnectionStore, LiveConnection
from core.failures import FailureStore
from dataverse.client import DataverseClient
from sync.holds import HoldStore
from sync.owners import OwnerCache
from sync.state import ContactStateStore, SnapshotStore
from sync.wave_api import Page


class Queues(Protocol):
    def send(self, queue_name: str, message: dict[str, object], *, delay_seconds: int = 0) -> None: ...


class ContactsSource(Protocol):
    def contacts_page(self, account_id: str, cursor: str | None, limit: int = ...) -> Page: ...


@dataclass
class SyncContext:
    connections: ConnectionStore
    failures: FailureStore
    snapshots: SnapshotStore
    states: ContactStateStore
    owners: OwnerCache
    queues: Queues
    holds: HoldStore  # which account holds which Dynamics row of an org (sync/holds.py)
    dataverse: Callable[[LiveConnection], DataverseClient]  # raises oauth.errors.ConnectionGone
    wave: ContactsSource | None = None  # Wave's contacts API, for the backfill
