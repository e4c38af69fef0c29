"""POST /api/webhooks/wave (anonymous at the Functions level; the HMAC signature is the auth).

Order of checks, each before any work the next needs: size (before parsing), signature over the raw
bytes, JSON, schema. Then: an account with no active connection is dropped (202); a repeated event id
is a duplicate (202); otherwise the snapshot is stored (only if newer) and ONE small message goes to
`contact-events`. Nothing is enqueued unless the answer is 202, and bad input never gets a 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.connections import ConnectionStore, live_connection
from core.storage import CONTACT_EVENTS, QueueSender
from sync.events import MAX_BODY_BYTES, FieldError, WebhookEvent, parse_body, validate_event
from sync.messages import ContactMessage
from sync.signature import SignatureError, verify
from sync.state import EventLog, SnapshotStore


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    log_fields: dict[str, Any] = field(default_factory=dict)


def _error(status: int, code: str, message: str, **details: Any) -> Answer:
    return Answer(status, {"error": {"code": code, "message": message, **details}}, {"reason": code})


def check_request(body: bytes, signature: str | None, secrets: tuple[str, ...], now: float
                  ) -> WebhookEvent | Answer:
    """Everything that needs no storage: the event, or the 4xx answer explaining what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        return _error(413, "payload_too_large", f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES}")
    try:
        verify(signature, body, secrets, now)
    except SignatureError as exc:
        return _error(401, "invalid_signature", str(exc))
    try:
        return validate_event(parse_body(body))
    except FieldError as exc:
        return _error(400, "invalid_body", exc.message if exc.field == "body" else f"{exc.field} {exc.message}",
                      field=exc.field)


def accept_event(event: WebhookEvent, *, connections: ConnectionStore, events: EventLog,
                 snapshots: SnapshotStore, queues: QueueSender) -> Answer:
    ids = {"account_id": event.account_id, "event_id": event.event_id, "contact_id": event.contact_id,
           "version": event.version}
    conn = live_connection(connections.get(event.account_id))
    if conn is None:
        return Answer(202, {"status": "dropped", "reason": "account has no active connection"}, ids)
    if not events.first_time(event.account_id, event.event_id):
        return Answer(202, {"status": "duplicate"}, ids)
    try:
        snapshots.put_if_newer(event.account_id, event.contact, deleted=event.deleted, event_id=event.event_id)
        # Enqueued even when a newer snapshot was already stored: the worker reads the newest snapshot
        # and ignores what is already applied, and a lost earlier enqueue is repaired this way.
        message = ContactMessage(event.account_id, event.contact_id, event.version, conn.generation)
        queues.send(CONTACT_EVENTS, message.to_dict())
    except Exception:
        events.forget(event.account_id, event.event_id)  # Wave's retry must not count as a duplicate
        raise
    return Answer(202, {"status": "accepted"}, ids)
