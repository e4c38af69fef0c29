"""Contacts that could not be synced, with a category and a reason a person can act on.

One row per (account, Wave contact) in the `failures` table; a later success clears it. The status
endpoint shows the most recent ones and `failures/retry` re-queues them, marking each row `requeued_at`
so that a second retry does not queue it again; the worker settling it (a success deletes the row, a
new failure replaces it) clears the mark.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from core.connections import utcnow
from core.storage import int64, read_int

TABLE = "failures"

# Categories a customer can see, each with what it means for them.
CATEGORIES = {
    "validation": "Dynamics rejected a value of this contact",
    "permission": "the connected Dynamics user lacks a privilege",
    "owner": "the contact's owner could not be set",
    "throttled": "Dynamics asked us to slow down; the contact will be retried",
    "auth": "Microsoft no longer accepts the connection's sign-in; reconnect",
    "not_found": "the Dynamics record no longer exists",
    "conflict": "another Wave account syncs this contact's row in the same Dynamics org; it was left unchanged",
    "transient": "Dynamics or the network failed temporarily",
    "source": "Wave's contacts API failed",
    "internal": "an unexpected error in the integration",
}


@dataclass(frozen=True)
class Failure:
    account_id: str
    contact_id: str
    category: str
    reason: str
    attempts: int
    first_at: str
    last_at: str
    version: int | None = None
    generation: str | None = None
    requeued_at: str | None = None  # when `failures/retry` queued it; None once the worker settled it
    etag: str | None = field(default=None, compare=False)


def _from_entity(e: dict) -> Failure:
    return Failure(
        account_id=e["PartitionKey"], contact_id=e["RowKey"], category=e["category"], reason=e["reason"],
        attempts=int(e.get("attempts", 1)), first_at=e.get("first_at", ""), last_at=e.get("last_at", ""),
        version=read_int(e.get("version")), generation=e.get("generation"), requeued_at=e.get("requeued_at"),
        etag=getattr(e, "metadata", {}).get("etag"),
    )


class FailureStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def record(self, account_id: str, contact_id: str, category: str, reason: str, *,
               version: int | None = None, generation: str | None = None) -> Failure:
        if category not in CATEGORIES:
            raise ValueError(f"unknown failure category {category!r}")
        now = utcnow()
        try:
            old = self.table.get_entity(account_id, contact_id)
            attempts, first_at = int(old.get("attempts", 0)) + 1, old.get("first_at", now)
        except ResourceNotFoundError:
            attempts, first_at = 1, now
        entity = {"PartitionKey": account_id, "RowKey": contact_id, "category": category,
                  "reason": reason[:1000], "attempts": attempts, "first_at": first_at, "last_at": now}
        if version is not None:
            entity["version"] = int64(version)
        if generation:
            entity["generation"] = generation
        self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)
        return _from_entity(entity)

    def mark_requeued(self, failure: Failure, when: str) -> bool:
        """Mark the failure as queued again, only if the row is as `failure` was read: False when a
        concurrent retry marked it first (or the worker settled it meanwhile)."""
        entity = {"PartitionKey": failure.account_id, "RowKey": failure.contact_id, "requeued_at": when}
        try:
            self.table.update_entity(entity, mode=UpdateMode.MERGE, etag=failure.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    def unmark_requeued(self, failure: Failure, when: str) -> None:
        """Undo mark_requeued when the message could not be queued (only our own mark is removed)."""
        try:
            entity = self.table.get_entity(failure.account_id, failure.contact_id)
        except ResourceNotFoundError:
            return
        if entity.get("requeued_at") != when:
            return
        del entity["requeued_at"]
        # changed meanwhile: whoever changed it settled the mark
        with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
            self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=entity.metadata["etag"],
                                     match_condition=MatchConditions.IfNotModified)

    def clear(self, account_id: str, contact_id: str) -> None:
        """Forget a failure (the contact synced after all); a missing row is fine."""
        self.table.delete_entity(account_id, contact_id)

    def all(self, account_id: str) -> Iterator[Failure]:
        for entity in self.table.query_entities("PartitionKey eq @pk", parameters={"pk": account_id}):
            yield _from_entity(entity)

    def recent(self, account_id: str, limit: int = 20) -> list[Failure]:
        return sorted(self.all(account_id), key=lambda f: f.last_at, reverse=True)[:limit]

    def count(self, account_id: str) -> int:
        return sum(1 for _ in self.table.query_entities(
            "PartitionKey eq @pk", parameters={"pk": account_id}, select=["RowKey"]))
