"""What the contact and page workers need, built once from core.services (tests build their own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.connections import Connection, ConnectionStore
from core.failures import FailureStore
from core.services import services
from core.storage import QueueSender
from sync.holds import TABLE as HOLDS
from sync.holds import HoldStore
from sync.owners import TABLE as OWNERS
from sync.owners import OwnerCache
from sync.state import SNAPSHOTS, STATE, ContactStateStore, SnapshotStore
from sync.wave_api import WaveClient


@dataclass
class SyncContext:
    connections: ConnectionStore
    failures: FailureStore
    snapshots: SnapshotStore
    states: ContactStateStore
    owners: OwnerCache
    queues: QueueSender
    holds: HoldStore  # which account holds which Dynamics row of an org (sync/holds.py)
    dataverse: Callable[[Connection], Any]  # -> DataverseClient; raises oauth.errors.ReauthRequired
    wave: WaveClient | None = None


_context: SyncContext | None = None


def sync_context() -> SyncContext:
    """The process-wide context over services() (rebuilt if the services were reset)."""
    global _context
    svc = services()
    if _context is None or _context.connections is not svc.connections:
        _context = SyncContext(
            connections=svc.connections, failures=svc.failures,
            snapshots=SnapshotStore(svc.tables(SNAPSHOTS)), states=ContactStateStore(svc.tables(STATE)),
            owners=OwnerCache(svc.tables(OWNERS)), queues=svc.queues, holds=HoldStore(svc.tables(HOLDS)),
            dataverse=svc.dataverse,
            wave=WaveClient(svc.settings.wave_api_base_url, svc.settings.wave_api_token),
        )
    return _context
