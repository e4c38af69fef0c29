"""The failure ledger both workers write a contact's failure to, and clear it from once it synced.

A failure is a row in `failures` (core/failures.py: category and reason, shown in the status and re-queued
by `failures/retry`) plus `failed:<category>` as the contact state's last result, so that the contact's
next success knows there is a row to clear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from core.connections import LiveConnection
from core.errors import ConcurrencyError
from sync.context import SyncContext
from sync.state import ContactState


def failed_state(state: ContactState | None, account_id: str, contact_id: str, category: str) -> ContactState:
    """The state to save for a contact that failed: what was applied stays, the last result says it failed."""
    failed = state or ContactState(account_id, contact_id)
    failed.last_result = f"failed:{category}"
    return failed


def had_failed(state: ContactState | None) -> bool:
    return state is not None and (state.last_result or "").startswith("failed")


class FailureLedger:
    def __init__(self, ctx: SyncContext, conn: LiveConnection) -> None:
        self.ctx, self.conn = ctx, conn

    def record(self, contact_id: str, category: str, reason: str, *, version: int | None = None) -> None:
        self.ctx.failures.record(self.conn.account_id, contact_id, category, reason, version=version,
                                 generation=self.conn.generation)

    def mark_state(self, state: ContactState | None, contact_id: str, category: str) -> None:
        """Save the contact's state as failed, unless another writer recorded something newer meanwhile
        (theirs stands)."""
        with contextlib.suppress(ConcurrencyError):
            self.ctx.states.save(failed_state(state, self.conn.account_id, contact_id, category))

    def settled(self, contact_ids: Iterable[str], previous: Mapping[str, ContactState | None]) -> None:
        """The contacts synced: clear the failure rows of those whose previous state said they had failed."""
        for cid in contact_ids:
            if had_failed(previous.get(cid)):
                self.ctx.failures.clear(self.conn.account_id, cid)
