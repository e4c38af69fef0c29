"""The contact worker: one `contact-events` message -> the contact's newest snapshot applied to Dataverse.

A message carries ids only; the worker reads the stored snapshot and the contact's sync state, then:
drops work for a connection that is not live or for an older generation; ignores a snapshot that is not
newer than what was applied (so duplicates, out-of-order updates and stale updates after a delete are
no-ops); skips the request when the mapped content did not change; otherwise upserts, deletes or
deactivates (per the connection's delete policy) and records the result with an ETag-conditional write.
If that write conflicts, another worker touched the contact meanwhile (and may have overwritten our
request with an older one), so the newest snapshot is applied again: concurrent writers converge.

Failures go down the ladder of sync/outcomes.py, shared with the page worker.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from core.connections import LiveConnection, live_connection
from core.errors import ConcurrencyError
from core.storage import CONTACT_EVENTS
from dataverse.client import DataverseClient
from dataverse.errors import AuthExpired, DataverseError, NotFound, Throttled, Transient
from sync.context import SyncContext
from sync.holds import Claim, HeldElsewhere
from sync.ledger import FailureLedger
from sync.mapping import contact_id, external_id, map_contact, owner_email
from sync.messages import ContactMessage
from sync.outcomes import EXPECTED, Action, readable, verdict
from sync.rules import Step, next_step, pick_row, unchanged, warning_text
from sync.state import ContactState, Snapshot
from sync.throttle import reschedule_delay

log = logging.getLogger(__name__)
MAX_ROUNDS = 5  # re-applications after a state conflict before giving up to the host's retry
T = TypeVar("T")


@dataclass
class Written:
    state: ContactState
    counter: str  # synced | deleted | skipped
    warnings: list[str]


def _resolve_owner(ctx: SyncContext, dv: DataverseClient, conn: LiveConnection, contact: dict[str, Any]
                   ) -> tuple[str | None, str | None]:
    """The owner's systemuserid (None: set no owner), and a warning when the email could not be looked up."""
    email = owner_email(contact)
    if not email:
        return None, None
    owners = ctx.owners.lookup(dv, conn.account_id, conn.generation, [email])
    return owners.owner(email), owners.warning(email)


def _upsert(ctx: SyncContext, conn: LiveConnection, snap: Snapshot, state: ContactState | None, force: bool
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
        ext = external_id(snap.contact_id)
        found = pick_row(dv.find_contacts([ext]).get(ext, ()))
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


class Calls(Protocol):
    """How a Dataverse call is made: at once (the contact worker, whose message goes back to its queue on a
    429), or waiting a short penalty out in-process (sync/throttle.py Patience, the drain)."""

    def call(self, fn: Callable[[], T]) -> T: ...


class _AtOnce:
    def call(self, fn: Callable[[], T]) -> T:
        return fn()


# what concerns every contact of the call (the connection, Dataverse's limits or health): raised
_WHOLE = (Throttled, Transient, AuthExpired)


def apply_deletes(ctx: SyncContext, conn: LiveConnection, snaps: Mapping[str, Snapshot],
                  states: Mapping[str, ContactState | None], calls: Calls | None = None
                  ) -> tuple[dict[str, Written], dict[str, Exception]]:
    """Delete (or deactivate, per the connection's delete policy) the rows of deleted contacts, in bulk:
    the rows never written by this account looked up by external id in one request and claimed at once
    (a row another account holds is left alone, sync/holds.py), then DataverseClient.delete_contacts ($batch
    requests of independent deletes; a row already gone counts as done). Returns what each contact's state
    becomes, by contact id, and the error of each contact that failed, alone. Raises only what concerns
    every contact (Throttled, Transient, AuthExpired, the sign-in); the rows deleted before stay deleted,
    and deleting them again is done at once."""
    calls = calls or _AtOnce()
    new: dict[str, ContactState] = {}
    for cid, snap in snaps.items():
        state = states.get(cid)
        new[cid] = ContactState(conn.account_id, cid, etag=state.etag if state else None,
                                dynamics_id=state.dynamics_id if state else None, version=snap.version,
                                deleted=True, last_result="deleted")
    failed: dict[str, Exception] = {}

    def each(cids: Iterable[str], fn: Callable[[], T]) -> T | None:
        """A request made for several contacts: a refusal of it (not of the connection) is each one's."""
        try:
            return calls.call(fn)
        except _WHOLE:
            raise
        except (DataverseError, HeldElsewhere) as exc:
            failed.update(dict.fromkeys(cids, exc))
            return None

    if conn.delete_policy != "ignore" and snaps:
        dv = ctx.dataverse(conn)
        unknown = [cid for cid, state in new.items() if state.dynamics_id is None]
        found = each(unknown, lambda: dv.find_contacts([external_id(cid) for cid in unknown])) if unknown else {}
        claims = {cid: ref.contactid for cid in unknown if (ref := pick_row((found or {}).get(external_id(cid), ())))}
        if claims:  # rows this account never wrote: it deletes them only if no other account holds them
            for cid in each(claims, lambda: ctx.holds.refused(conn, claims)) or ():
                failed[cid] = HeldElsewhere(cid, deleting=True)
        rows = {state.dynamics_id: cid for cid, state in new.items() if state.dynamics_id and cid not in failed}
        for cid, row in claims.items():
            if cid not in failed:
                new[cid].dynamics_id = row
                rows[row] = cid
        ids = list(rows)

        def remove(chunk: list[str]) -> dict[str, DataverseError]:
            return dv.delete_contacts(chunk, deactivate=conn.delete_policy == "deactivate")

        for i in range(0, len(ids), dv.batch_size):  # one $batch at a time, each waiting out its own penalty
            chunk = ids[i : i + dv.batch_size]
            refused = each([rows[r] for r in chunk], functools.partial(remove, chunk))
            failed.update({rows[row]: error for row, error in (refused or {}).items()})
    return {cid: Written(state, "deleted", []) for cid, state in new.items() if cid not in failed}, failed


def apply_delete(ctx: SyncContext, conn: LiveConnection, snap: Snapshot, state: ContactState | None) -> Written:
    """One contact's delete: apply_deletes of one, its failure raised."""
    written, failed = apply_deletes(ctx, conn, {snap.contact_id: snap}, {snap.contact_id: state})
    if snap.contact_id in failed:
        raise failed[snap.contact_id]
    return written[snap.contact_id]


def _reschedule(ctx: SyncContext, message: ContactMessage, delay: int) -> None:
    ctx.queues.send(CONTACT_EVENTS, message.to_dict(), delay_seconds=delay)


def _settle_failure(ctx: SyncContext, conn: LiveConnection, message: ContactMessage, version: int,
                    state: ContactState | None, error: Exception) -> str:
    """Act on the ladder's verdict (sync/outcomes.py) for `error`; returns the outcome."""
    found = verdict(error, message.attempt, jitter=random.random())
    if found.action is Action.RESCHEDULE:
        _reschedule(ctx, message.retry() if found.next_attempt else message, found.delay)
    elif found.action is Action.RECORD:
        ledger = FailureLedger(ctx, conn)
        ledger.record(message.contact_id, found.category, readable(error), version=version)
        ledger.mark_state(state, message.contact_id, found.category)
        ctx.connections.add_counts(conn.account_id, conn.generation, failed=1)
    return found.outcome


def process(ctx: SyncContext, message: ContactMessage) -> str:
    """Apply one message; returns the outcome (also logged). Raises only for bugs."""
    conn = live_connection(ctx.connections.get(message.account_id), message.generation)
    if conn is None:
        return "dropped:not_connected"
    for _ in range(MAX_ROUNDS):
        snap = ctx.snapshots.get(message.account_id, message.contact_id)
        if snap is None:
            return "dropped:no_snapshot"
        state = ctx.states.get(message.account_id, message.contact_id)
        step = next_step(state.applied if state else None, snap.version, snap.deleted, force=message.force)
        if step is Step.STALE:
            return "stale"
        # Dataverse throttles the connection's user (seen by any instance, dataverse/budget.py): don't extend it
        wait = ctx.dataverse(conn).budget.remaining()
        if wait > 0:
            _reschedule(ctx, message, reschedule_delay(wait))
            return "rescheduled:throttled"
        try:
            deleting = step is Step.DELETE
            result = (apply_delete(ctx, conn, snap, state) if deleting
                      else _upsert(ctx, conn, snap, state, message.force))
        except EXPECTED as exc:
            return _settle_failure(ctx, conn, message, snap.version, state, exc)
        try:
            ctx.states.save(result.state)
        except ConcurrencyError:
            # Someone else wrote this contact meanwhile, maybe before our older write landed: apply the
            # newest snapshot again, and should the message have to come back later (throttled,
            # transient), it comes back forced, or it would find that version recorded and stop.
            message = replace(message, force=True)
            continue
        ctx.connections.add_counts(conn.account_id, conn.generation, **{result.counter: 1})
        FailureLedger(ctx, conn).settled([message.contact_id], {message.contact_id: state})
        for warning in result.warnings:
            log.info("contact %s/%s: %s", conn.account_id, message.contact_id, warning)
        return result.state.last_result or result.counter
    raise ConcurrencyError(f"contact {message.account_id}/{message.contact_id} kept changing")
