"""Sign-ins that finished at Microsoft but wait for Wave to confirm them (the second phase of connect).

The callback's `state` proves only that *a* browser came back from Microsoft; it says nothing about
which Wave user that browser belongs to, and an authorize URL can be forwarded to anyone. So the
callback keeps its result here, and only Wave's backend, for the signed-in Wave user who started the
connect, can turn it into a live connection (POST /api/connections/{account}/confirm). See RFC 9700
§4.7 (https://www.rfc-editor.org/rfc/rfc9700#section-4.7) and RFC 6749 §10.12.

One row per sign-in in the `pendingsignins` table: PartitionKey is the account (a completion code of
another account is simply not found), RowKey the SHA-256 of the one-time completion code (the code
itself is never stored). The tokens sit in Key Vault under the row's own generation, exactly like a
live connection's; a row never confirmed is deleted together with its secret once it expires.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from core.storage import iso

TABLE = "pendingsignins"
CODE_BYTES = 32  # 256 random bits; the contract asks for at least 128
_CODE_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")


def new_completion_code() -> str:
    return secrets.token_urlsafe(CODE_BYTES)


def well_formed(code: str) -> bool:
    return bool(_CODE_RE.fullmatch(code))


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


@dataclass
class PendingSignIn:
    account_id: str
    code_hash: str
    generation: str
    secret_name: str
    instance_url: str
    plan: str
    initiated_by: str  # the Wave user who called connect: only they may confirm
    connected_by: str  # the Microsoft account that signed in
    dataverse_user_id: str
    auto_sync: bool
    delete_policy: str
    expires_at: str
    tenant_id: str | None = None
    used: bool = False
    etag: str | None = field(default=None, compare=False)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at <= iso(now or datetime.now(UTC))


_STORED = [f.name for f in fields(PendingSignIn) if f.name not in ("account_id", "code_hash", "etag")]


def _from_entity(entity: Any) -> PendingSignIn:
    known = {name: entity[name] for name in _STORED if name in entity}
    return PendingSignIn(account_id=entity["PartitionKey"], code_hash=entity["RowKey"],
                         etag=entity.metadata.get("etag"), **known)


class PendingStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def create(self, pending: PendingSignIn) -> None:
        entity = {k: v for k, v in asdict(pending).items() if v is not None and k in _STORED}
        self.table.create_entity({"PartitionKey": pending.account_id, "RowKey": pending.code_hash, **entity})

    def find(self, account_id: str, code: str) -> PendingSignIn | None:
        try:
            return _from_entity(self.table.get_entity(account_id, code_hash(code)))
        except ResourceNotFoundError:
            return None

    def claim(self, pending: PendingSignIn) -> bool:
        """Mark the sign-in used, only if nobody else did since it was read (single use under races)."""
        try:
            self.table.update_entity({"PartitionKey": pending.account_id, "RowKey": pending.code_hash, "used": True},
                                     mode=UpdateMode.MERGE, etag=pending.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        pending.used = True
        return True

    def waiting(self, account_id: str, now: datetime | None = None) -> list[PendingSignIn]:
        """The account's sign-ins still waiting for a confirm, newest expiry first."""
        rows = self.table.query_entities("PartitionKey eq @pk and expires_at gt @now",
                                         parameters={"pk": account_id, "now": iso(now or datetime.now(UTC))})
        found = [p for p in map(_from_entity, rows) if not p.used]
        return sorted(found, key=lambda p: p.expires_at, reverse=True)

    def expired(self, now: datetime | None = None) -> Iterator[PendingSignIn]:
        for entity in self.table.query_entities("expires_at le @now",
                                                parameters={"now": iso(now or datetime.now(UTC))}):
            yield _from_entity(entity)

    def delete(self, pending: PendingSignIn) -> bool:
        """Delete the row as it was read; False if it changed meanwhile (say, a confirm claimed it)."""
        try:
            self.table.delete_entity(pending.account_id, pending.code_hash, etag=pending.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            return False
        return True
