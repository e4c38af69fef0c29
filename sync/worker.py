"""The contact worker: one `contact-events` message -> the contact's newest snapshot applied to Dataverse.

A message carries ids only; the worker reads the stored snapshot and the contact's sync state, then:
drops work for a connection that is not live or for an older generation; ignores a snapshot that is not
newer than what was applied (so duplicates, out-of-order updates and stale updates after a delete are
no-ops); skips the request when the mapped content did not change; otherwise upserts, deletes or
deactivates (per the connection's delete policy) and records the result with an ETag-conditional write.
If that write conflicts, another worker touched the contact meanwhile (and may have overwritten our
request with an older one), so the newest snapshot is applied again: concurrent writers converge.

Failures, so that only true bugs reach the poison queue:
- Dataverse throttling: a copy of the message is re-enqueued, visible after Retry-After, and the
  original completes (the dequeue count is not burned);
- transient errors (5xx, network, token service hiccups): re-enqueued with a growing delay and an
  attempt counter (the host's fixed visibilityTimeout cannot back off), then recorded as failed;
- revoked sign-in (ReauthRequired): the token layer has set needs_reauth; the message is dropped;
- a record Dynamics rejects (validation, permission, ...): recorded with a category and reason, counted
  as failed, not retried until someone asks (`POST /api/connections/{id}/failures/retry`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import azure.functions as func

from core.connections import Connection
from core.log import Timer, outcome
from core.storage import CONTACT_EVENTS
from oauth.errors import ReauthRequired, TokenUnavailable
from sync.context import SyncContext, sync_context
from sync.dataverse_errors import AuthExpired, DataverseError, NotFound, Throttled, Transient
from sync.holds import Claim, HeldElsewhere
from sync.mapping import MappingError, contact_id, external_id, map_contact, owner_email
from sync.messages import ContactMessage
from sync.rules import MAX_TRANSIENT_ATTEMPTS, Step, next_step, retry_delay, unchanged, warning_text
from sync.state import ContactState, Snapshot, StateConflict
from sync.throttle import penalties

log = logging.getLogger(__name__)
bp = func.Blueprint()
MAX_ROUNDS = 5  # re-applications after a state conflict before giving up to the host's retry


@dataclass
class Written:
    state: ContactState
    counter: str  # synced | deleted | skipped
    warnings: list[str]


def failure_category(error: Exception) -> str:
    """The customer-visible category (core.failures.CATEGORIES) for an error."""
    if isinstance(error, MappingError):
        return "validation"
    category = getattr(error, "category", "")
    if category in ("validation", "permission", "not_found", "throttled", "transient", "auth", "conflict"):
        return category
    return "validation" if isinstance(error, DataverseError) else "internal"


def readable(error: Exception) -> str:
    if isinstance(error, MappingError):
        return f"Wave sent an invalid value: {error}"
    if isinstance(error, DataverseError):
        return f"Dynamics answered {error}"
    return str(error)


def _resolve_owner(ctx: SyncContext, dv, conn: Connection, contact: dict) -> tuple[str | None, str | None]:
    """The owner's systemuserid (None: set no owner), and a warning when the email could not be looked up."""
    email = owner_email(contact)
    if not email:
        return None, None
    owners = ctx.owners.lookup(dv, conn.account_id, conn.generation, [email])
    return owners.owner(email), owners.warning(email)


def _upsert(ctx: SyncContext, conn: Connection, snap: Snapshot, state: ContactState | None, force: bool
            ) -> Written:
    dv = ctx.dataverse(conn)
    owner, owner_warning = _resolve_owner(ctx, dv, conn, snap.contact)
    mapped = map_contact(snap.contact, owner)
    warnings = [*mapped.warnings, *([owner_warning] if owner_warning else [])]
    applied = state.applied if state else None
    new = ContactState(conn.account_id, snap.contact_id, etag=state.etag if state else None,
                       dynamics_id=state.dynamics_id if state else None, version=snap.version,
                       content_hash=mapped.content_hash, last_result="unchanged", warning=warning_text(warnings))
    if not force and unchanged(applied, mapped.content_hash):
        return Written(new, "skipped", warnings)
    reactivate = bool(state and state.deleted and conn.delete_policy == "deactivate")
    if new.dynamics_id is None:
        found = dv.find_contact(external_id(snap.contact_id))
        # A new row gets the deterministic id, so racing creates of one contact converge on one row.
        new.dynamics_id = found.contactid if found else contact_id(conn.account_id, snap.contact_id)
        # claimed before the first write, so a row another account of this org holds is never touched
        ctx.holds.refuse_elsewhere(conn, Claim(new.dynamics_id, snap.contact_id))
    try:
        dv.upsert_contact(new.dynamics_id, mapped.payload, reactivate=reactivate)
    except NotFound as exc:
        if exc.entity not in ("systemuser", "team") or owner is None:
            raise
        # The cached owner no longer exists in Dynamics: forget it and save the contact without it.
        ctx.owners.forget(conn.account_id, conn.generation, owner_email(snap.contact))
        owner, owner_warning = _resolve_owner(ctx, dv, conn, snap.contact)
        mapped = map_contact(snap.contact, owner)
        warnings = [*mapped.warnings, *([owner_warning] if owner_warning else [])]
        new.content_hash, new.warning = mapped.content_hash, warning_text(warnings)
        dv.upsert_contact(new.dynamics_id, mapped.payload, reactivate=reactivate)
    new.last_result = "synced"
    return Written(new, "synced", warnings)


def _delete(ctx: SyncContext, conn: Connection, snap: Snapshot, state: ContactState | None) -> Written:
    new = ContactState(conn.account_id, snap.contact_id, etag=state.etag if state else None,
                       dynamics_id=state.dynamics_id if state else None, version=snap.version, deleted=True,
                       last_result="deleted")
    if conn.delete_policy != "ignore":
        dv = ctx.dataverse(conn)
        if new.dynamics_id is None:
            found = dv.find_contact(external_id(snap.contact_id))
            new.dynamics_id = found.contactid if found else None
            if found:  # a row this account never wrote: it deletes it only if no other account holds it
                ctx.holds.refuse_elsewhere(conn, Claim(found.contactid, snap.contact_id), deleting=True)
        if new.dynamics_id is not None:
            if conn.delete_policy == "deactivate":
                dv.deactivate_contact(new.dynamics_id)
            else:
                dv.delete_contact(new.dynamics_id)  # already gone counts as done
    return Written(new, "deleted", [])


def _reschedule(ctx: SyncContext, message: ContactMessage, delay: int) -> None:
    ctx.queues.send(CONTACT_EVENTS, message.to_dict(), delay_seconds=delay)


def _record_failure(ctx: SyncContext, conn: Connection, message: ContactMessage, version: int,
                    state: ContactState | None, error: Exception) -> str:
    category = failure_category(error)
    ctx.failures.record(conn.account_id, message.contact_id, category, readable(error), version=version,
                        generation=conn.generation)
    ctx.connections.add_counts(conn.account_id, conn.generation, failed=1)
    # The applied version stays; the last result says it failed, so a later success clears the record.
    failed = state or ContactState(conn.account_id, message.contact_id)
    failed.last_result = f"failed:{category}"
    with contextlib.suppress(StateConflict):  # another writer recorded something newer: theirs stands
        ctx.states.save(failed)
    return f"failed:{category}"


def process(ctx: SyncContext, message: ContactMessage) -> str:
    """Apply one message; returns the outcome (also logged). Raises only for bugs."""
    conn = ctx.connections.get(message.account_id)
    if conn is None or not conn.accepts(message.generation):
        return "dropped:not_connected"
    for _ in range(MAX_ROUNDS):
        snap = ctx.snapshots.get(message.account_id, message.contact_id)
        if snap is None:
            return "dropped:no_snapshot"
        state = ctx.states.get(message.account_id, message.contact_id)
        step = next_step(state.applied if state else None, snap.version, snap.deleted, force=message.force)
        if step is Step.STALE:
            return "stale"
        wait = penalties.remaining(conn.account_id)
        if wait > 0:  # Dataverse throttled this connection moments ago: don't extend its penalty
            _reschedule(ctx, message, penalties.delay(wait))
            return "rescheduled:throttled"
        try:
            deleting = step is Step.DELETE
            result = _delete(ctx, conn, snap, state) if deleting else _upsert(ctx, conn, snap, state, message.force)
        except ReauthRequired:
            return "dropped:needs_reauth"  # the token layer moved the connection to needs_reauth
        except Throttled as exc:
            penalties.note(conn.account_id, exc.retry_after)
            _reschedule(ctx, message, penalties.delay(exc.retry_after))
            return "rescheduled:throttled"
        except (Transient, AuthExpired, TokenUnavailable) as exc:
            if message.attempt + 1 < MAX_TRANSIENT_ATTEMPTS:
                _reschedule(ctx, message.retry(), retry_delay(message.attempt))
                return "rescheduled:transient"
            return _record_failure(ctx, conn, message, snap.version, state, exc)
        except (DataverseError, MappingError, HeldElsewhere) as exc:
            return _record_failure(ctx, conn, message, snap.version, state, exc)
        try:
            ctx.states.save(result.state)
        except StateConflict:
            # Someone else wrote this contact meanwhile, maybe before our older write landed: apply the
            # newest snapshot again, and should the message have to come back later (throttled,
            # transient), it comes back forced, or it would find that version recorded and stop.
            message = replace(message, force=True)
            continue
        ctx.connections.add_counts(conn.account_id, conn.generation, **{result.counter: 1})
        if state is not None and (state.last_result or "").startswith("failed"):
            ctx.failures.clear(conn.account_id, message.contact_id)
        for warning in result.warnings:
            log.info("contact %s/%s: %s", conn.account_id, message.contact_id, warning)
        return result.state.last_result or result.counter
    raise StateConflict(f"contact {message.account_id}/{message.contact_id} kept changing")


@bp.function_name("contact_worker")
@bp.queue_trigger(arg_name="msg", queue_name=CONTACT_EVENTS, connection="AzureWebJobsStorage")
def contact_worker(msg: func.QueueMessage) -> None:
    timer = Timer()
    message = ContactMessage.parse(msg.get_body())
    result = process(sync_context(), message)
    outcome(log, "contact", result, account_id=message.account_id, contact_id=message.contact_id,
            version=message.version, attempt=message.attempt or None, dequeue_count=msg.dequeue_count, ms=timer.ms)
