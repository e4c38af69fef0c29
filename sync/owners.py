"""Owner resolution: Wave team member email -> Dataverse systemuserid, cached per connection.

The `ownercache` table holds one row per (account, generation, email): the systemuserid, or none
(negative caching, shorter-lived, so a user added in Dynamics is picked up soon). A reconnect has a
new generation, so it never sees the previous connection's answers. Lookups for a whole page go to
Dataverse in one request.

An email that cannot be looked up (too long, not shaped like an address, or a lookup Dynamics refuses)
means "no owner" with a warning for that contact: it never fails the contact, nor the other contacts
whose owners were looked up in the same request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from azure.data.tables import TableClient, UpdateMode

from core.emails import normalise_email
from core.storage import iso
from core.tables import TRANSACTION_SIZE, query_keys
from dataverse.client import UserRef
from dataverse.errors import ValidationFailed
from sync.rules import choose_owner, owner_lookup_problem

TABLE = "ownercache"
FOUND_TTL = timedelta(hours=1)
MISSING_TTL = timedelta(minutes=10)


class UserLookup(Protocol):
    def find_users_by_email(self, emails: Iterable[str]) -> dict[str, list[UserRef]]: ...


def _row_key(generation: str, email: str) -> str:
    # emails may hold characters a RowKey cannot (/ # ?); the hash is stable and safe
    return f"{generation}-{hashlib.sha256(email.encode()).hexdigest()[:40]}"


@dataclass(frozen=True)
class Owners:
    """The owners of a set of team member emails, by normalised email."""

    ids: dict[str, str | None] = field(default_factory=dict)  # systemuserid, or None: no such user
    warnings: dict[str, str] = field(default_factory=dict)  # why an email was not looked up

    def owner(self, email: str | None) -> str | None:
        return self.ids.get(normalise_email(email) or "")

    def warning(self, email: str | None) -> str | None:
        reason = self.warnings.get(normalise_email(email) or "")
        return f"no owner set: {reason}" if reason else None


def _find(dataverse: UserLookup, emails: list[str]) -> tuple[dict[str, list[UserRef]], dict[str, str]]:
    """Users by email, and the emails whose lookup Dynamics refused (with why).

    A refused request (400, 414: something in it Dynamics cannot take) is split in halves until the
    email that causes it stands alone, so it costs only that email its owner. Throttling, transient
    and permission errors concern the whole connection and go to the caller.
    """
    try:
        return dataverse.find_users_by_email(emails), {}
    except ValidationFailed as exc:
        if len(emails) == 1:
            # status and code only: Dynamics' message may quote the email
            return {}, {emails[0]: f"Dynamics refused the lookup of the team member's email "
                                   f"({' '.join(p for p in (str(exc.status or ''), exc.code) if p)})"}
        half = len(emails) // 2
        found, refused = _find(dataverse, emails[:half])
        more, refused_more = _find(dataverse, emails[half:])
        return {**found, **more}, {**refused, **refused_more}


class OwnerCache:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def resolve(self, dataverse: UserLookup, account_id: str, generation: str, emails: Iterable[str | None]
                ) -> dict[str, str | None]:
        """{normalised email: systemuserid or None} for every non-empty email given."""
        return self.lookup(dataverse, account_id, generation, emails).ids

    def lookup(self, dataverse: UserLookup, account_id: str, generation: str, emails: Iterable[str | None]
               ) -> Owners:
        """The owner of every non-empty email given, and a warning for each that could not be looked up."""
        wanted = {e for e in (normalise_email(x) for x in emails) if e}
        warnings = {e: problem for e in wanted if (problem := owner_lookup_problem(e))}
        wanted -= warnings.keys()
        if not wanted:
            return Owners({e: None for e in warnings}, warnings)
        now = datetime.now(UTC)
        keys = {_row_key(generation, e): e for e in wanted}
        result: dict[str, str | None] = {}
        for key, row in query_keys(self.table, {account_id: keys}).items():
            if row.get("expires_at", "") > iso(now):
                result[keys[key]] = row.get("systemuserid") or None
        missing = sorted(wanted - result.keys())
        if missing:
            found, refused = _find(dataverse, missing)
            warnings.update(refused)
            fresh = []
            for email in missing:
                if email in refused:  # not cached: a refusal says nothing about whether the user exists
                    result[email] = None
                    continue
                owner = choose_owner(found.get(email, ()))
                result[email] = owner
                ttl = FOUND_TTL if owner else MISSING_TTL
                fresh.append({"PartitionKey": account_id, "RowKey": _row_key(generation, email), "email": email,
                              "systemuserid": owner or "", "expires_at": iso(now + ttl)})
            for start in range(0, len(fresh), TRANSACTION_SIZE):
                self.table.submit_transaction([("upsert", e, {"mode": UpdateMode.REPLACE})
                                               for e in fresh[start:start + TRANSACTION_SIZE]])
        return Owners({**{e: None for e in warnings}, **result}, warnings)

    def forget(self, account_id: str, generation: str, email: str | None) -> None:
        """Drop a cached answer Dataverse has just contradicted (e.g. the user was deleted)."""
        email = normalise_email(email)
        if email:
            self.table.delete_entity(account_id, _row_key(generation, email))
