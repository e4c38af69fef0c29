"""Backfill: import every existing Wave contact of an account, one page per queue message.

`start_backfill` opens a run and enqueues its first page; the page worker (the backfill-pages queue
trigger) reads a page, enqueues the next cursor at once, then writes its page to Dataverse in bulk, so
several pages of a run are written side by side (up to the host's batchSize) while Dataverse's 429s
pace them.

Per page of up to 500 contacts, Dataverse sees: one lookup of the page's unknown contacts by external id,
one lookup of the page's owners (skipped when all are cached), and the bulk upsert (one UpsertMultiple,
or $batch requests of 100). Contact states are written in Table transactions of up to 100.

The run's progress lives on the connection's backfill record: the highest page whose successor is queued
(so a page that runs again does not queue its successor twice), the pages done (out of order), and the
last page once Wave has answered it without a next cursor; the run is done when every page up to the
last is. A page that runs again (duplicate delivery, crash, Retry-After) writes only what is not yet
applied, and never a backfill snapshot over a newer live one. A message of an older run or generation is
a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from core.connections import Backfill, Connection, ConnectionStore, utcnow
from core.failures import CATEGORIES
from core.log import Timer, outcome
from core.storage import BACKFILL_PAGES, CONTACT_EVENTS, QueueSender
from oauth.errors import ReauthRequired, TokenUnavailable
from sync.context import SyncContext, sync_context
from sync.dataverse import UpsertItem
from sync.dataverse_errors import AuthExpired, DataverseError, Throttled, Transient
from sync.events import CONTACT_ID_RE, SchemaError, validate_contact
from sync.holds import CONFLICT, conflict_reason
from sync.mapping import MappingError, external_id, map_contact, owner_email
from sync.mapping import contact_id as new_contact_id
from sync.messages import ContactMessage, PageMessage
from sync.rules import (
    MAX_TRANSIENT_ATTEMPTS,
    backfill_writes,
    retry_delay,
    throttle_delay,
    unchanged,
    warning_text,
)
from sync.state import ContactState, StateConflict
from sync.throttle import Patience, penalties
from sync.wave_api import WaveError, WaveThrottled, WaveUnavailable
from sync.worker import failure_category, readable

log = logging.getLogger(__name__)
bp = func.Blueprint()


def start_backfill(connections: ConnectionStore, queues: QueueSender, account_id: str) -> str | None:
    """Open a new backfill run for the live connection and enqueue its first page.

    Returns the run id, or None when the account has no active connection. A run already in progress
    is superseded: its remaining pages see a different run id and stop.
    """
    run_id = uuid.uuid4().hex
    started: dict[str, Connection] = {}

    def begin(conn: Connection) -> bool:
        started.clear()
        if not conn.active:
            return False
        conn.backfill = Backfill(state="running", run_id=run_id, started_at=utcnow())
        started["conn"] = conn
        return True

    connections.update(account_id, begin)
    conn = started.get("conn")
    if conn is None:
        return None
    queues.send(BACKFILL_PAGES, PageMessage(account_id, conn.generation, run_id, None, 1).to_dict())
    return run_id


# -- the page worker ------------------------------------------------------------------------------

PAGE_SIZE = 500
# Pages of one run in flight at once, counted from the first page not yet done; a page further ahead
# comes back a second later. Eight pages of 500 are what Dataverse's execution-time limit takes in one
# burst (at ~10 ms a row, 1,200,000 ms per 300 s); twice that lets the next burst be read and prepared,
# waiting for the penalty to end, while the last one's states are written.
PAGES_AHEAD = 16
# A prepared page waits out a Dataverse penalty of up to INLINE_WAIT_SECONDS in-process, up to
# PAGE_WAIT_SECONDS in all; beyond that it goes back to the queue for Retry-After.
INLINE_WAIT_SECONDS = 15.0
PAGE_WAIT_SECONDS = 30.0
PAGE_FAILURE_PREFIX = "~backfill-page-"  # failure rows of a whole page; '~' is never in a Wave contact id


@dataclass
class PageReport:
    contacts: int = 0  # on the Wave page
    written: int = 0  # sent to Dataverse and landed
    unchanged: int = 0  # newer-or-equal already applied, or content unchanged: no request
    failed: int = 0
    repairs: int = 0  # contacts a live worker changed meanwhile: re-applied through the live lane
    dataverse_requests: int = 0


def _live(conn: Connection | None, msg: PageMessage) -> bool:
    return (conn is not None and conn.accepts(msg.generation) and conn.backfill.run_id == msg.run_id
            and conn.backfill.state == "running")


def _done_after(b: Backfill) -> set[int]:
    return {int(p) for p in b.done_after.split(",") if p}


def _page_done(b: Backfill, page: int) -> bool:
    return page <= b.done_upto or page in _done_after(b)


def _mark_done(b: Backfill, page: int) -> bool:
    """Record `page` as done; False if it already was."""
    if _page_done(b, page):
        return False
    after = _done_after(b) | {page}
    while b.done_upto + 1 in after:
        b.done_upto += 1
        after.discard(b.done_upto)
    b.done_after = ",".join(str(p) for p in sorted(after))
    return True


def _adjacent(ids: list[str]) -> bool:
    """Ids in ascending order: Wave lists contacts by id, so the page is a slice of the account's ids
    and its states can be read with one range query."""
    return all(a < b for a, b in itertools.pairwise(ids))


def _queue_next(ctx: SyncContext, msg: PageMessage, cursor: str) -> None:
    """Queue the next page, then note that it is queued. A crash in between queues it twice at worst,
    which is harmless: a page that runs twice writes nothing new."""
    ctx.queues.send(BACKFILL_PAGES, PageMessage(msg.account_id, msg.generation, msg.run_id, cursor,
                                                msg.page + 1).to_dict())

    def mark(c: Connection) -> bool:
        if not _live(c, msg) or c.backfill.queued >= msg.page:
            return False
        c.backfill.queued = msg.page
        return True

    ctx.connections.update(msg.account_id, mark)


def _valid_contacts(ctx: SyncContext, conn: Connection, raw: list[Any], report: PageReport
                    ) -> dict[str, dict[str, Any]]:
    """The page's valid contacts by id; an invalid one is recorded as failed (if it has a usable id)."""
    valid: dict[str, dict[str, Any]] = {}
    for item in raw:
        try:
            contact = validate_contact(item)
        except SchemaError as exc:
            report.failed += 1
            cid = item.get("id") if isinstance(item, dict) else None
            if isinstance(cid, str) and CONTACT_ID_RE.fullmatch(cid):
                ctx.failures.record(conn.account_id, cid, "validation",
                                    f"Wave sent an invalid contact: {exc.field} {exc.message}",
                                    generation=conn.generation)
                # marked in its state, so that the contact's first success clears the record
                state = ctx.states.get(conn.account_id, cid) or ContactState(conn.account_id, cid)
                state.last_result = "failed:validation"
                with contextlib.suppress(StateConflict):
                    ctx.states.save(state)
            else:
                log.warning("backfill %s: a contact without a usable id was skipped (%s)", conn.account_id, exc)
            continue
        seen = valid.get(contact["id"])
        if seen is None or contact["version"] > seen["version"]:  # a repeated id: the newest snapshot wins
            valid[contact["id"]] = contact
    return valid


def _write_page(ctx: SyncContext, conn: Connection, contacts: dict[str, dict[str, Any]], report: PageReport) -> None:
    account, generation = conn.account_id, conn.generation
    adjacent = _adjacent(list(contacts))
    states = ctx.states.get_many(account, contacts, adjacent=adjacent)
    pending = ctx.snapshots.versions(account, contacts, adjacent=adjacent)
    todo = {cid: c for cid, c in contacts.items()
            if backfill_writes(c["version"], states[cid].applied if cid in states else None, pending.get(cid))}
    report.unchanged += len(contacts) - len(todo)
    if not todo:
        return
    # the page is read and prepared: a short penalty is waited out here rather than through the queue
    patience = Patience(account, longest=INLINE_WAIT_SECONDS, budget=PAGE_WAIT_SECONDS)
    dv = ctx.dataverse(conn)
    before = getattr(dv, "_requests_made", 0)
    owners = patience.call(lambda: ctx.owners.lookup(dv, account, generation,
                                                     [owner_email(c) for c in todo.values()]))
    new_states: dict[str, ContactState] = {}
    mapped = {}
    failed: dict[str, str] = {}  # contact id -> failure category
    for cid, contact in todo.items():
        old = states.get(cid)
        email = owner_email(contact)
        try:
            m = map_contact(contact, owners.owner(email))
        except Exception as exc:  # one contact's problem, even a bug, must not cost the page its other contacts
            report.failed += 1
            failed[cid] = failure_category(exc)
            if not isinstance(exc, MappingError):
                log.exception("backfill %s: contact %s could not be mapped", account, cid)
            ctx.failures.record(account, cid, failed[cid], readable(exc) if isinstance(exc, MappingError)
                                else f"an unexpected error while mapping the contact ({type(exc).__name__})",
                                version=contact["version"], generation=generation)
            continue
        if owners.warning(email):
            log.info("backfill contact %s/%s: %s", account, cid, owners.warning(email))
        new_states[cid] = ContactState(account, cid, dynamics_id=old.dynamics_id if old else None,
                                       version=contact["version"], content_hash=m.content_hash,
                                       last_result="synced", etag=old.etag if old else None,
                                       warning=warning_text([*m.warnings, owners.warning(email)]))
        if unchanged(old.applied if old else None, m.content_hash):
            new_states[cid].last_result = "unchanged"
            report.unchanged += 1
        else:
            mapped[cid] = m
    unknown = [cid for cid in mapped if new_states[cid].dynamics_id is None]
    if unknown:  # one lookup for the page's contacts we have never written
        found = patience.call(lambda: dv.find_contacts([external_id(cid) for cid in unknown]))
        claims: dict[str, str] = {}
        for cid in unknown:
            ref = found.get(external_id(cid))
            claims[cid] = new_states[cid].dynamics_id = ref.contactid if ref else new_contact_id(account, cid)
        # claimed for the whole page before any write: a row another account of this org holds is left alone
        for cid in ctx.holds.refused(conn, claims):
            del mapped[cid]
            report.failed += 1
            failed[cid] = CONFLICT
            ctx.failures.record(account, cid, CONFLICT, conflict_reason(cid), version=contacts[cid]["version"],
                                generation=generation)
            ctx.snapshots.put_if_newer(account, contacts[cid], deleted=False, event_id="backfill")
    items = [UpsertItem(key=cid, contact_id=new_states[cid].dynamics_id, payload=m.payload,
                        reactivate=bool(states.get(cid) and states[cid].deleted and conn.delete_policy == "deactivate"))
             for cid, m in mapped.items()]
    if items:
        result = patience.call(lambda: dv.bulk_upsert(items))
        for f in result.failed:
            category = failed[f.key] = f.category if f.category in CATEGORIES else "validation"
            field = f" (column {f.field})" if f.field else ""
            ctx.failures.record(account, f.key, category, f"Dynamics rejected the contact{field}: {f.message}",
                                version=contacts[f.key]["version"], generation=generation)
            # keep the snapshot, so `failures/retry` can re-apply it through the live lane; one too large
            # for a table row (a page's contact is not bounded by the webhook's 256 KiB) is read from Wave
            # again by that retry instead
            with contextlib.suppress(ValueError):
                ctx.snapshots.put_if_newer(account, contacts[f.key], deleted=False, event_id="backfill")
        report.failed += len(result.failed)
        report.written += len(items) - len(result.failed)
    report.dataverse_requests += getattr(dv, "_requests_made", 0) - before
    to_save = [state for cid, state in new_states.items() if cid not in failed]
    for cid, category in failed.items():  # marked in their state, so that a later success clears the record
        old = states.get(cid) or ContactState(account, cid)
        old.last_result = f"failed:{category}"
        to_save.append(old)
    conflicts = ctx.states.save_many(to_save)
    for state in conflicts:
        # A live worker wrote this contact after we read its state: our (older) write may have landed
        # after theirs, so have the live lane apply its newest snapshot again.
        report.repairs += 1
        ctx.queues.send(CONTACT_EVENTS, ContactMessage(account, state.contact_id, state.version or 0,
                                                       generation, force=True).to_dict())
    for cid in new_states:
        old = states.get(cid)
        if cid not in failed and old is not None and (old.last_result or "").startswith("failed"):
            ctx.failures.clear(account, cid)


def _fail_run(ctx: SyncContext, msg: PageMessage, category: str, reason: str) -> None:
    ctx.failures.record(msg.account_id, f"{PAGE_FAILURE_PREFIX}{msg.page}", category, reason,
                        generation=msg.generation)

    def mark(conn: Connection) -> bool:
        if conn.backfill.run_id != msg.run_id:
            return False
        conn.backfill.state, conn.backfill.finished_at = "failed", utcnow()
        return True

    ctx.connections.update(msg.account_id, mark)


def run_page(ctx: SyncContext, msg: PageMessage, dequeue_count: int = 1) -> tuple[str, PageReport]:
    """Process one backfill page. Idempotent: a page that runs twice writes nothing new."""
    report = PageReport()
    conn = ctx.connections.get(msg.account_id)
    if not _live(conn, msg):
        return "dropped:stale_run", report
    if _page_done(conn.backfill, msg.page) and dequeue_count <= 1:
        return "dropped:page_done", report  # a duplicate of a page that completed (its successor is queued)
    if msg.page - conn.backfill.done_upto > PAGES_AHEAD:  # enough pages of this run are in flight
        ctx.queues.send(BACKFILL_PAGES, msg.to_dict(), delay_seconds=1)
        return "rescheduled:ahead", report
    wait = penalties.remaining(msg.account_id)
    if wait > INLINE_WAIT_SECONDS:  # Dataverse throttles this connection for a while: come back then
        ctx.queues.send(BACKFILL_PAGES, msg.to_dict(), delay_seconds=throttle_delay(wait))
        return "rescheduled:throttled", report
    try:
        page = ctx.wave.contacts_page(msg.account_id, msg.cursor, PAGE_SIZE)
        report.contacts = len(page.contacts)
        if page.next_cursor is not None and conn.backfill.queued < msg.page:
            _queue_next(ctx, msg, page.next_cursor)  # the next page runs while this one is written
        contacts = _valid_contacts(ctx, conn, page.contacts, report)
        _write_page(ctx, conn, contacts, report)
    except ReauthRequired:
        _fail_run(ctx, msg, "auth", "Microsoft no longer accepts the connection's sign-in; reconnect to finish")
        return "dropped:needs_reauth", report
    except (WaveThrottled, Throttled) as exc:
        if isinstance(exc, Throttled):
            penalties.note(msg.account_id, exc.retry_after)
        ctx.queues.send(BACKFILL_PAGES, msg.to_dict(), delay_seconds=throttle_delay(exc.retry_after))
        return "rescheduled:throttled", report
    except (WaveUnavailable, Transient, AuthExpired, TokenUnavailable) as exc:
        if msg.attempt + 1 < MAX_TRANSIENT_ATTEMPTS:
            ctx.queues.send(BACKFILL_PAGES, msg.retry().to_dict(), delay_seconds=retry_delay(msg.attempt))
            return "rescheduled:transient", report
        category = "source" if isinstance(exc, WaveUnavailable) else "transient"
        _fail_run(ctx, msg, category, f"page {msg.page} failed {MAX_TRANSIENT_ATTEMPTS} times: {exc}")
        return "failed", report
    except (WaveError, DataverseError) as exc:
        category = "source" if isinstance(exc, WaveError) else failure_category(exc)
        _fail_run(ctx, msg, category, f"page {msg.page}: {readable(exc)}")
        return "failed", report

    ctx.connections.add_counts(msg.account_id, msg.generation, synced=report.written, failed=report.failed,
                               skipped=report.unchanged)
    finished: list[bool] = []

    def progress(c: Connection) -> bool:
        finished.clear()
        b = c.backfill
        if not _live(c, msg) or not _mark_done(b, msg.page):
            return False
        b.pages, b.contacts = b.pages + 1, b.contacts + report.contacts
        if page.next_cursor is None:
            b.last_page = msg.page
        if b.last_page and b.done_upto >= b.last_page:  # every page of the run is done
            b.state, b.finished_at = "done", utcnow()
            finished.append(True)
        return True

    ctx.connections.update(msg.account_id, progress)
    if finished:  # a run that completes settles what earlier runs recorded as failed
        for failure in ctx.failures.all(msg.account_id):
            if failure.contact_id.startswith(PAGE_FAILURE_PREFIX):
                ctx.failures.clear(msg.account_id, failure.contact_id)
    return ("done" if finished else "page"), report


@bp.function_name("backfill_worker")
@bp.queue_trigger(arg_name="msg", queue_name=BACKFILL_PAGES, connection="AzureWebJobsStorage")
def backfill_worker(msg: func.QueueMessage) -> None:
    timer = Timer()
    message = PageMessage.parse(msg.get_body())
    result, report = run_page(sync_context(), message, msg.dequeue_count or 1)
    outcome(log, "backfill_page", result, account_id=message.account_id, run_id=message.run_id, page=message.page,
            attempt=message.attempt or None, contacts=report.contacts, written=report.written,
            unchanged=report.unchanged, failed=report.failed, repairs=report.repairs or None,
            dataverse_requests=report.dataverse_requests, ms=timer.ms)
