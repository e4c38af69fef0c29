"""The Wave webhook body (README "Webhook contract"): parsed and validated into a WebhookEvent, or a FieldError
naming the first offending field. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from core.connections import valid_account_id
from core.errors import FieldError

MAX_BODY_BYTES = 256 * 1024
EVENT_TYPES = ("contact.created", "contact.updated", "contact.deleted")
CONTACT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,41}$")
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
STRING_FIELDS = ("first_name", "last_name", "email", "phone", "company", "job_title", "website", "note",
                 "updated_at")
MAX_VERSION = 2**53  # JSON-safe integers only
MAX_STRING = 100_000
# A \uD800-\uDFFF escape that is not half of a pair is valid JSON text but no Unicode character
# (https://www.rfc-editor.org/rfc/rfc8259#section-8.2): it cannot be encoded as UTF-8, so no table, queue or
# Dataverse request could carry it.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class WebhookEvent:
    event_id: str
    type: str
    account_id: str
    contact_id: str
    version: int
    contact: dict[str, Any]  # the validated snapshot (only known fields; absent = null)

    @property
    def deleted(self) -> bool:
        return self.type == "contact.deleted"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> Any:
    """JSON from raw bytes; strict (UTF-8, no NaN/Infinity)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FieldError("is not UTF-8", field="body") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FieldError("is not valid JSON", field="body") from exc


def _int(value: Any, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError("must be an integer", field=field)
    if value < minimum or value > MAX_VERSION:
        raise FieldError(f"must be an integer between {minimum} and {MAX_VERSION}", field=field)
    return value


def _optional_string(obj: dict[str, Any], key: str, field: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError("must be a string or null", field=field)
    if len(value) > MAX_STRING:
        raise FieldError(f"must be at most {MAX_STRING} characters", field=field)
    if _LONE_SURROGATE.search(value):
        raise FieldError("must be Unicode text (it holds an unpaired surrogate escape)", field=field)
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError("must be an object", field=field)
    return value


def _team_member(value: Any, field: str) -> dict[str, str | None] | None:
    if value is None:
        return None
    member = _object(value, field)
    return {"id": _optional_string(member, "id", f"{field}.id"),
            "email": _optional_string(member, "email", f"{field}.email")}


def validate_contact(value: Any, field: str = "contact") -> dict[str, Any]:
    """A contact snapshot (webhook or contacts API): only known fields, an absent field is None."""
    raw = _object(value, field)
    contact_id = raw.get("id")
    if not isinstance(contact_id, str) or not CONTACT_ID_RE.fullmatch(contact_id):
        raise FieldError("must be a string of 1-41 characters A-Z a-z 0-9 _ -", field=f"{field}.id")
    if "version" not in raw:
        raise FieldError("is required", field=f"{field}.version")
    contact: dict[str, Any] = {"id": contact_id, "version": _int(raw["version"], f"{field}.version")}
    for key in STRING_FIELDS:
        contact[key] = _optional_string(raw, key, f"{field}.{key}")
    contact["assigned_team_member"] = _team_member(raw.get("assigned_team_member"),
                                                   f"{field}.assigned_team_member")
    return contact


def validate_event(doc: Any) -> WebhookEvent:
    body = _object(doc, "body")
    event_id = body.get("id")
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        raise FieldError("must be a string of 1-100 characters A-Z a-z 0-9 _ -", field="id")
    event_type = body.get("type")
    if event_type not in EVENT_TYPES:
        raise FieldError(f"must be one of {', '.join(EVENT_TYPES)}", field="type")
    if body.get("created") is not None:
        _int(body["created"], "created")
    account_id = body.get("account_id")
    if not isinstance(account_id, str) or not valid_account_id(account_id):
        raise FieldError("must be a string of 1-64 characters A-Z a-z 0-9 _ -", field="account_id")
    data = _object(body.get("data"), "data")
    contact = validate_contact(data.get("contact"), "data.contact")
    return WebhookEvent(event_id=event_id, type=event_type, account_id=account_id, contact_id=contact["id"],
                        version=contact["version"], contact=contact)
