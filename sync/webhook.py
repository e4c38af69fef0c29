"""POST /api/webhooks/wave (anonymous at the Functions level; the HMAC signature is the auth).

Order of checks, each before any work the next needs: size (before parsing), signature over the raw
bytes, JSON, schema. Then: an account with no active connection is dropped (202); otherwise the change is
stored as pending (sync/pending.py: one insert, keyed by contact and version, so a change already pending
is a duplicate, 202) and, only when no drain of the account is scheduled yet, ONE small drain message goes
to `contact-events`. Nothing is stored or enqueued unless the answer is 202, and bad input never gets a 5xx.

The connection comes from a short per-process cache (LiveConnections): a disconnect is seen by the drain,
which reads the connection afresh before every pass, so it still stops every write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.connections import ConnectionStore, LiveConnection, live_connection
from core.storage import CONTACT_EVENTS, QueueSender
from sync.events import MAX_BODY_BYTES, FieldError, WebhookEvent, parse_body, validate_event
from sync.messages import DrainMessage
from sync.pending import PendingStore
from sync.signature import SignatureError, verify

# How long the webhook trusts a connection it read as live. Short: a new generation (reconnect) is seen
# within it; a disconnect is enforced by the drain anyway.
CONNECTION_TTL_SECONDS = 5.0


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


class LiveConnections:
    """Live connections by account, each trusted for `ttl` seconds in this process; an account without
    one is read every time (it is rare, and a new connection must be seen at once)."""

    def __init__(self, store: ConnectionStore, ttl: float = CONNECTION_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.ttl, self._clock = store, ttl, clock
        self._cache: dict[str, tuple[float, LiveConnection]] = {}
        self._lock = threading.Lock()

    def get(self, account_id: str) -> LiveConnection | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(account_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        conn = live_connection(self.store.get(account_id))
        with self._lock:
            if conn is None:
                self._cache.pop(account_id, None)
            else:
                self._cache[account_id] = (now, conn)
        return conn


def accept_event(event: WebhookEvent, *, connections: LiveConnections, pending: PendingStore,
                 queues: QueueSender) -> Answer:
    ids = {"account_id": event.account_id, "event_id": event.event_id, "contact_id": event.contact_id,
           "version": event.version}
    if connections.get(event.account_id) is None:
        return Answer(202, {"status": "dropped", "reason": "account has no active connection"}, ids)
    if not pending.add(event.account_id, event.contact, deleted=event.deleted, event_id=event.event_id):
        return Answer(202, {"status": "duplicate"}, ids)
    try:
        if pending.mark(event.account_id):  # no drain scheduled yet: this webhook sends the one message
            try:
                queues.send(CONTACT_EVENTS, DrainMessage(event.account_id).to_dict())
            except Exception:
                pending.unmark(event.account_id)
                raise
    except Exception:
        # Wave's retry must be accepted again, not answered as a duplicate of a change no drain will see
        pending.remove(event.account_id, event.contact_id, event.version)
        raise
    return Answer(202, {"status": "accepted"}, ids)
