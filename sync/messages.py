"""Queue message shapes (JSON, base64 on the wire). Ids, versions and cursors only: never a contact's
content (the worker reads the stored snapshot) and never a token.

contact-events: {"account_id", "contact_id", "version", "generation", "attempt", "force"?} (one contact), or
                {"drain": true, "account_id", "attempt"} (apply the account's pending changes, sync/drain.py)
backfill-pages: {"account_id", "generation", "run_id", "cursor", "page", "attempt"?}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from core.errors import AppError


class BadMessage(AppError):
    """A queue message this code did not write: a bug, so it is left to reach the poison queue."""


def _load(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage("queue message is not JSON") from exc
    if not isinstance(doc, dict):
        raise BadMessage("queue message is not a JSON object")
    return doc


@dataclass(frozen=True)
class ContactMessage:
    account_id: str
    contact_id: str
    version: int
    generation: str
    attempt: int = 0
    # re-apply the stored snapshot even if its version is the one recorded (a concurrent writer may
    # have overwritten Dataverse after the state was recorded)
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.force:
            d.pop("force")
        return d

    def retry(self) -> ContactMessage:
        return replace(self, attempt=self.attempt + 1)

    @classmethod
    def parse(cls, body: bytes) -> ContactMessage:
        d = _load(body)
        try:
            return cls(account_id=str(d["account_id"]), contact_id=str(d["contact_id"]), version=int(d["version"]),
                       generation=str(d["generation"]), attempt=int(d.get("attempt", 0)),
                       force=bool(d.get("force", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadMessage(f"contact message lacks a valid field: {exc}") from exc


@dataclass(frozen=True)
class DrainMessage:
    account_id: str
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"drain": True, "account_id": self.account_id, "attempt": self.attempt}

    def retry(self) -> DrainMessage:
        return replace(self, attempt=self.attempt + 1)


def parse_contact_lane(body: bytes) -> ContactMessage | DrainMessage:
    """A contact-events message: one contact's, or a connection's drain."""
    d = _load(body)
    if d.get("drain") is True:
        try:
            return DrainMessage(account_id=str(d["account_id"]), attempt=int(d.get("attempt", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadMessage(f"drain message lacks a valid field: {exc}") from exc
    return ContactMessage.parse(body)


@dataclass(frozen=True)
class PageMessage:
    account_id: str
    generation: str
    run_id: str
    cursor: str | None
    page: int
    attempt: int = 0
    # set when the page went back to its queue after claiming its new rows: the digest of what it claimed
    # (sync/backfill.py claim_new_rows), so that it does not claim them again
    claimed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "claimed" or v is not None}

    def retry(self) -> PageMessage:
        return replace(self, attempt=self.attempt + 1)

    @classmethod
    def parse(cls, body: bytes) -> PageMessage:
        d = _load(body)
        try:
            cursor = d.get("cursor")
            return cls(account_id=str(d["account_id"]), generation=str(d["generation"]), run_id=str(d["run_id"]),
                       cursor=None if cursor is None else str(cursor), page=int(d["page"]),
                       attempt=int(d.get("attempt", 0)), claimed=str(d["claimed"]) if d.get("claimed") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadMessage(f"page message lacks a valid field: {exc}") from exc
