"""Which Wave account holds which Dynamics contact row, so that accounts sharing one Dynamics org stay apart.

Several Wave accounts may connect the same Dynamics org, and Wave contact ids are unique only within an
account, so `wavecnct_<id>` can name another account's row. Before this account creates or adopts a row
(a row found by `externaluseridentifier`, or the deterministic-id row it is about to create), it claims the
row here: an insert into `contactholders` keyed by the org and the row's contactid, which Table Storage
refuses when the key exists (409 EntityAlreadyExists,
https://learn.microsoft.com/rest/api/storageservices/insert-entity). So of two accounts adopting the same
pre-existing row at once exactly one wins, and a row another account holds is never written or deleted by
this one: the contact is recorded as failed with category `conflict` (core/failures.py).

Holds are never released: a disconnect leaves the rows in Dynamics, and a deleted row's contactid is
only ever reused by its own account (contactids of new rows are uuid5 of account and Wave id,
sync/mapping.py). A row that no account holds yet (a CSV import of Wave contacts, say) is adopted by the
first account that claims it. A claim is made once per contact, when the account first meets its row;
after that the contact state (sync/state.py) names the row.

Holds protect rows, not external ids: two accounts that both find no row for one Wave id at the same
moment each create (and hold) their own deterministic-id row, so that org then has two rows with that
`wavecnct_<id>`, one per account, neither touched by the other.

The pure rules (org key, partition, verdict, reason) come first; `HoldStore` does the Table I/O.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableClient

from core.connections import Connection, utcnow
from core.errors import AppError
from core.tables import ChangesetFailed, side_by_side, submit_changeset, transaction_chunks

TABLE = "contactholders"
# A backfill claims a page's rows at once; like contact states (sync/state.py) they are spread over a
# few partitions per org, so that one org's claims are not all served by one partition server.
HOLD_BUCKETS = 8
CONFLICT = "conflict"  # the failure category (core/failures.py)

# `<org>.api.crm<N>.dynamics.com` is the Web API form of `<org>.crm<N>.dynamics.com`: the same org
# (https://learn.microsoft.com/power-apps/developer/data-platform/webapi/web-api-types-operations).
_API_HOST = re.compile(r"^(?P<org>[a-z0-9-]+)\.api\.(?=crm)")


class HeldElsewhere(AppError):
    """The Dynamics row this contact would write is held by another Wave account in the same org."""

    category = CONFLICT

    def __init__(self, wave_id: str, deleting: bool = False) -> None:
        super().__init__(conflict_reason(wave_id, deleting))
        self.wave_id = wave_id


# -- pure rules ------------------------------------------------------------------------------------

def org_key(instance_url: str) -> str:
    """The org a connection writes to, the same for every spelling of its address: the host in lower
    case without the Web API's `.api.` label (a port is kept only for development hosts)."""
    parts = urlsplit(instance_url.strip())
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ValueError("instance URL without a host")
    host = _API_HOST.sub(r"\g<org>.", host)
    port = parts.port
    return f"{host}:{port}" if port and port != 443 else host


def hold_partition(org: str, dynamics_id: str) -> str:
    return f"{org}~{zlib.crc32(dynamics_id.lower().encode()) % HOLD_BUCKETS}"


def held_elsewhere(account_id: str, holder: str) -> bool:
    """True when the row's holder is another Wave account (the row must not be touched)."""
    return holder != account_id


def conflict_reason(wave_id: str, deleting: bool = False) -> str:
    # Names neither the other account nor the row: tenants learn nothing about each other.
    done = "did not delete or deactivate that row" if deleting else "left that row unchanged"
    return (f"another Wave account connected to the same Dynamics org already syncs the row with "
            f"externaluseridentifier wavecnct_{wave_id}, so this account {done} (Wave contact ids "
            f"are unique only within one Wave account)")


@dataclass(frozen=True)
class Claim:
    dynamics_id: str  # the row's contactid
    wave_id: str  # the contact of the claiming account that the row stands for


def _entity(org: str, account_id: str, claim: Claim) -> dict[str, Any]:
    row = claim.dynamics_id.lower()
    return {"PartitionKey": hold_partition(org, row), "RowKey": row, "account_id": account_id,
            "wave_id": claim.wave_id, "claimed_at": utcnow()}


# -- the table -------------------------------------------------------------------------------------

class HoldStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def claim(self, org: str, account_id: str, claim: Claim) -> str:
        """Claim the row for `account_id` unless another account holds it; returns the holder."""
        entity = _entity(org, account_id, claim)
        try:
            self.table.create_entity(entity)
            return account_id
        except ResourceExistsError:
            pass
        # Holds are never deleted, so the row that refused the insert is still there.
        return str(self.table.get_entity(entity["PartitionKey"], entity["RowKey"])["account_id"])

    def claim_many(self, org: str, account_id: str, claims: list[Claim]) -> dict[str, str]:
        """Claim rows in entity-group transactions of up to 100 per partition, sent side by side; returns
        the holder by contactid (lower case).

        The usual page claims only fresh rows and costs one request per partition. A transaction is all
        or nothing, so one that meets an existing hold (a rerun of the page, a pre-existing row, another
        account's row) is done again row by row."""
        def one(chunk: list[Claim]) -> dict[str, str]:
            try:
                submit_changeset(self.table, [("create", _entity(org, account_id, c), None) for c in chunk])
                return {c.dynamics_id.lower(): account_id for c in chunk}
            except ChangesetFailed:
                return {c.dynamics_id.lower(): self.claim(org, account_id, c) for c in chunk}

        by_partition: dict[str, dict[str, Claim]] = {}
        for c in claims:  # a row claimed twice in one call (one transaction may name it only once)
            by_partition.setdefault(hold_partition(org, c.dynamics_id), {})[c.dynamics_id.lower()] = c
        chunks = transaction_chunks(list(group.values()) for group in by_partition.values())
        return {row: holder for found in side_by_side(one, chunks) for row, holder in found.items()}

    def refuse_elsewhere(self, conn: Connection, claim: Claim, deleting: bool = False) -> None:
        """Claim one row for the contact worker; HeldElsewhere when another account holds it."""
        if held_elsewhere(conn.account_id, self.claim(_org(conn), conn.account_id, claim)):
            raise HeldElsewhere(claim.wave_id, deleting)

    def refused(self, conn: Connection, claims: Mapping[str, str]) -> set[str]:
        """Claim a backfill page's rows (`claims`: Wave id -> contactid); returns the Wave ids whose row
        another account holds."""
        holders = self.claim_many(_org(conn), conn.account_id,
                                  [Claim(dynamics_id, wave_id) for wave_id, dynamics_id in claims.items()])
        return {wave_id for wave_id, dynamics_id in claims.items()
                if held_elsewhere(conn.account_id, holders[dynamics_id.lower()])}


def _org(conn: Connection) -> str:
    if not conn.instance_url:  # a live connection always has one (core/services.py refuses the client)
        raise ValueError(f"account {conn.account_id} has no instance URL")
    return org_key(conn.instance_url)
