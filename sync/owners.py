"""Owner resolution: Wave team member email -> Dataverse systemuserid, cached per connection.

The `ownercache` table holds one row per (account, generation, email): the systemuserid, or none
(negative caching, shorter-lived, so a user added in Dynamics is picked up soon). A reconnect has a
new generation, so it never sees the previous connection's answers. Lookups for a whole page go to
Dataverse in one request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from azure.data.tables import TableClient, UpdateMode

from core.storage import iso
from sync.rules import choose_owner, normalise_email
from sync.state import TRANSACTION_SIZE, query_keys

TABLE = "ownercache"
FOUND_TTL = timedelta(hours=1)
MISSING_TTL = timedelta(minutes=10)


class UserLookup(Protocol):
    def find_users_by_email(self, emails: Iterable[str]) -> dict[str, Any]: ...


def _row_key(generation: str, email: str) -> str:
    # emails may hold characters a RowKey cannot (/ # ?); the hash is stable and safe
    return f"{generation}-{hashlib.sha256(email.encode()).hexdigest()[:40]}"


class OwnerCache:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def resolve(self, dataverse: UserLookup, account_id: str, generation: str, emails: Iterable[str | None]
                ) -> dict[str, str | None]:
        """{normalised email: systemuserid or None} for every non-empty email given."""
        wanted = {e for e in (normalise_email(x) for x in emails) if e}
        if not wanted:
            return {}
        now = datetime.now(UTC)
        keys = {_row_key(generation, e): e for e in wanted}
        result: dict[str, str | None] = {}
        for key, row in query_keys(self.table, {account_id: keys}).items():
            if row.get("expires_at", "") > iso(now):
                result[keys[key]] = row.get("systemuserid") or None
        missing = sorted(wanted - result.keys())
        if missing:
            found = dataverse.find_users_by_email(missing)
            fresh = []
            for email in missing:
                user = found.get(email)
                owner = choose_owner([_as_row(user)]) if user is not None else None
                result[email] = owner
                ttl = FOUND_TTL if owner else MISSING_TTL
                fresh.append({"PartitionKey": account_id, "RowKey": _row_key(generation, email), "email": email,
                              "systemuserid": owner or "", "expires_at": iso(now + ttl)})
            for start in range(0, len(fresh), TRANSACTION_SIZE):
                self.table.submit_transaction([("upsert", e, {"mode": UpdateMode.REPLACE})
                                               for e in fresh[start:start + TRANSACTION_SIZE]])
        return result

    def forget(self, account_id: str, generation: str, email: str | None) -> None:
        """Drop a cached answer Dataverse has just contradicted (e.g. the user was deleted)."""
        email = normalise_email(email)
        if email:
            self.table.delete_entity(account_id, _row_key(generation, email))


def _as_row(user: Any) -> dict[str, Any]:
    """A UserRef (enabled users only are returned by the lookup) as the row choose_owner reads."""
    return {"systemuserid": getattr(user, "systemuserid", None), "isdisabled": False,
            "accessmode": getattr(user, "accessmode", None)}
