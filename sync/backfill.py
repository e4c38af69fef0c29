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
import hashlib
import itertools
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from core.connections import Backfill, Connection, ConnectionStore, LiveConnection, live_connection, utcnow
from core.errors import FieldError
from core.failures import CATEGORIES
from core.storage import BACKFILL_PAGES, CONTACT_EVENTS
from dataverse.client import DataverseClient, UpsertItem
from dataverse.errors import Throttled
from sync.context import Queues, SyncContext
from sync.events import CONTACT_ID_RE, validate_contact
from sync.holds import CONFLICT, conflict_reason
from sync.ledger import FailureLedger, failed_state
from sync.mapping import MappedContact, external_id, map_contact, owner_email
from sync.mapping import contact_id as new_contact_id
from sync.messages import ContactMessage, PageMessage
from sync.outcomes import EXPECTED, Action, failure_category, readable, verdict
from sync.owners import Owners
from sync.rules import MAX_TRANSIENT_ATTEMPTS, backfill_writes, pick_row, unchanged, warning_text
from sync.state import ContactState
from sync.throttle import Patience, return_delay

log = logging.getLogger(__name__)


def start_backfill(connections: ConnectionStore, queues: Queues, account_id: str) -> str | None:
    """Open a new backfill run for the live connection and enqueue its first page.

    Returns the run id, or None when the account has no active connection. A run already in progress
    is superseded: its remaining pages see a different run id and stop.
    """
    run_id = uuid.uuid4().hex
    started: dict[str, str] = {}

    def begin(conn: Connection) -> bool:
        started.clear()
        live = live_connection(conn)
        if live is None:
            return False
        conn.backfill = Backfill(state="running", run_id=run_id, started_at=utcnow())
        started["generation"] = live.generation
        return True

    connections.update(account_id, begin)
    generation = started.get("generation")
    if generation is None:
        return None
    queues.send(BACKFILL_PAGES, PageMessage(account_id, generation, run_id, None, 1).to_dict())
    return run_id


# -- the page worker ------------------------------------------------------------------------------

PAGE_SIZE = 500
# Pages of one run in flight at once, counted from the first page not yet done; a page further ahead
# comes back a second later. Eight pages of 500 are what Dataverse's execution-time limit takes in one
# burst (at ~10 ms a row, 1,200,000 ms per 300 s); twice that lets the next burst be read and prepared,
# waiting for the penalty to end, while the last one's states are written.
PAGES_AHEAD = 16
# A prepared page waits out a Dataverse penalty of up to INLINE_WAIT_SECONDS in-process, up to
# PAGE_WAIT_SECONDS in all: short, because a waiting page holds one of the worker's threads, which every
# function of the instance shares (README, host.json choices). A page that would wait longer goes back to
# the queue, visible again PREPARE_AHEAD_SECONDS before the penalty ends (sync/throttle.py return_delay),
# so that it is read from Wave and prepared while the penalty runs out, and is ready when it ends. With 3 s
# the pages of three instances, read and prepared side by side, were ready 2-7 s after the penalty's end
# (bench/run.py ANALYSIS); the in-process wait is as long, or a page ready early would go back again.
INLINE_WAIT_SECONDS = 5.0
PAGE_WAIT_SECONDS = 8.0
PREPARE_AHEAD_SECONDS = 5.0
PAGE_FAILURE_PREFIX = "~backfill-page-"  # failure rows of a whole page; '~' is never in a Wave contact id


@dataclass
class PageReport:
    contacts: int = 0  # on the Wave page
    written: int = 0  # sent to Dataverse and landed
    unchanged: int = 0  # newer-or-equal already applied, or content unchanged: no request
    failed: int = 0
    repairs: int = 0  # contacts a live worker changed meanwhile: re-applied through the live lane
    dataverse_requests: int = 0
    waited: float = 0.0  # seconds the page waited in-process for Dataverse penalties to end
    claimed: str | None = None  # the digest of the new rows the page claimed (claim_new_rows)


def _live(conn: Connection | None, msg: PageMessage) -> LiveConnection | None:
    """The connection, when the page belongs to its live generation and running backfill run."""
    live = live_connection(conn, msg.generation)
    if live is None or live.backfill.run_id != msg.run_id or live.backfill.state != "running":
        return None
    return live


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
        if _live(c, msg) is None or c.backfill.queued >= msg.page:
            return False
        c.backfill.queued = msg.page
        return True

    ctx.connections.update(msg.account_id, mark)


def _valid_contacts(ctx: SyncContext, conn: LiveConnection, raw: list[Any], report: PageReport
                    ) -> dict[str, dict[str, Any]]:
    """The page's valid contacts by id; an invalid one is recorded as failed (if it has a usable id)."""
    ledger = FailureLedger(ctx, conn)
    valid: dict[str, dict[str, Any]] = {}
    for item in raw:
        try:
            contact = validate_contact(item)
        except FieldError as exc:
            report.failed += 1
            cid = item.get("id") if isinstance(item, dict) else None
            if isinstance(cid, str) and CONTACT_ID_RE.fullmatch(cid):
                ledger.record(cid, "validation", f"Wave sent an invalid contact: {exc.field} {exc.message}")
                # marked in its state, so that the contact's first success clears the record
                ledger.mark_state(ctx.states.get(conn.account_id, cid), cid, "validation")
            else:
                log.warning("backfill %s: a contact without a usable id was skipped (%s)", conn.account_id, exc)
            continue
        seen = valid.get(contact["id"])
        if seen is None or contact["version"] > seen["version"]:  # a repeated id: the newest snapshot wins
            valid[contact["id"]] = contact
    return valid


@dataclass
class Plan:
    """A page's contacts on their way to Dataverse."""

    contacts: dict[str, dict[str, Any]]  # the page's valid contacts by id
    states: dict[str, ContactState]  # their states before this page
    new_states: dict[str, ContactState] = field(default_factory=dict)  # what each becomes once written
    mapped: dict[str, MappedContact] = field(default_factory=dict)  # the ones to send
    failed: dict[str, str] = field(default_factory=dict)  # contact id -> failure category
    claimed: dict[str, str] = field(default_factory=dict)  # contact id -> its new row's id, claimed ahead
    refused: set[str] = field(default_factory=set)  # of those, the contacts whose row another account holds


def _plan(ctx: SyncContext, conn: LiveConnection, contacts: dict[str, dict[str, Any]], report: PageReport
          ) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """Read the page's states and stored snapshot versions; returns the plan and the contacts to write:
    those newer than what was applied and than a live snapshot still waiting in the contact-events lane."""
    adjacent = _adjacent(list(contacts))
    states = ctx.states.get_many(conn.account_id, contacts, adjacent=adjacent)
    pending = ctx.snapshots.versions(conn.account_id, contacts, adjacent=adjacent)
    todo = {cid: c for cid, c in contacts.items()
            if backfill_writes(c["version"], states[cid].applied if cid in states else None, pending.get(cid))}
    report.unchanged += len(contacts) - len(todo)
    return Plan(contacts, states), todo


def map_contacts(ctx: SyncContext, conn: LiveConnection, plan: Plan, todo: dict[str, dict[str, Any]], owners: Owners,
                 report: PageReport) -> None:
    """Map each contact with its owner; one that cannot be mapped, even through a bug, fails alone."""
    ledger = FailureLedger(ctx, conn)
    for cid, contact in todo.items():
        old = plan.states.get(cid)
        email = owner_email(contact)
        try:
            m = map_contact(contact, owners.owner(email))
        except Exception as exc:  # one contact's problem, even a bug, must not cost the page its other contacts
            report.failed += 1
            plan.failed[cid] = failure_category(exc)
            if not isinstance(exc, FieldError):
                log.exception("backfill %s: contact %s could not be mapped", conn.account_id, cid)
            ledger.record(cid, plan.failed[cid], readable(exc) if isinstance(exc, FieldError)
                          else f"an unexpected error while mapping the contact ({type(exc).__name__})",
                          version=contact["version"])
            continue
        if owners.warning(email):
            log.info("backfill contact %s/%s: %s", conn.account_id, cid, owners.warning(email))
        plan.new_states[cid] = ContactState(conn.account_id, cid, dynamics_id=old.dynamics_id if old else None,
                                            version=contact["version"], content_hash=m.content_hash,
                                            last_result="synced", etag=old.etag if old else None,
                                            warning=warning_text([*m.warnings, owners.warning(email)]))
        if unchanged(old.applied if old else None, m.content_hash):
            plan.new_states[cid].last_result = "unchanged"
            report.unchanged += 1
        else:
            plan.mapped[cid] = m


def _keep_snapshot(ctx: SyncContext, conn: LiveConnection, contact: dict[str, Any]) -> None:
    """Keep a failed contact's snapshot, so `failures/retry` can re-apply it through the live lane; one too
    large for a table row (a page's contact is not bounded by the webhook's 256 KiB) is read from Wave
    again by that retry instead."""
    with contextlib.suppress(ValueError):
        ctx.snapshots.put_if_newer(conn.account_id, contact, deleted=False, event_id="backfill")


def claims_digest(account_id: str, rows: dict[str, str]) -> str:
    """What a page claimed (contact id -> row id), in a few bytes of its queue message."""
    text = "\n".join([account_id, *(f"{cid}={row}" for cid, row in sorted(rows.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def claim_new_rows(ctx: SyncContext, conn: LiveConnection, plan: Plan, todo: dict[str, dict[str, Any]],
                   claimed: str | None = None) -> str | None:
    """Claim (sync/holds.py) the deterministic-id rows of the contacts never written before, ahead of any
    Dataverse request, so that these Table writes run while a penalty runs out instead of between the
    lookup and the write: that lookup and write go out together once the penalty ends. Under load the
    claims took 0.1-5 s there and spread a window's writes over seconds (bench/run.py ANALYSIS). Should
    the lookup find an existing row instead, `resolve_ids` claims that one; the unused claim is harmless,
    since only this account ever names that id (sync/mapping.py contact_id).

    Returns the digest of the claims when none was refused; a page that goes back to its queue keeps it
    (PageMessage.claimed) and, finding the same rows to claim when it runs again, skips claiming them: holds
    are never released, and claiming rows that exist already is done row by row, which took seconds."""
    fresh = {cid: new_contact_id(conn.account_id, cid) for cid in todo
             if cid not in plan.states or plan.states[cid].dynamics_id is None}
    if not fresh:
        return None
    digest = claims_digest(conn.account_id, fresh)
    plan.refused = set() if digest == claimed else ctx.holds.refused(conn, fresh)
    plan.claimed = fresh
    return None if plan.refused else digest


def resolve_ids(ctx: SyncContext, conn: LiveConnection, dv: DataverseClient, patience: Patience, plan: Plan,
                report: PageReport) -> None:
    """The rows of contacts never written before: found by external id in one lookup, or the deterministic
    id for a new row; claimed for the whole page before any write (unless `claim_new_rows` claimed that
    row already), so that a row another account of this org holds is left alone (sync/holds.py)."""
    unknown = [cid for cid in plan.mapped if plan.new_states[cid].dynamics_id is None]
    if not unknown:
        return
    found = patience.call(lambda: dv.find_contacts([external_id(cid) for cid in unknown]))
    claims: dict[str, str] = {}
    for cid in unknown:
        ref = pick_row(found.get(external_id(cid), ()))
        claims[cid] = ref.contactid if ref else new_contact_id(conn.account_id, cid)
        plan.new_states[cid].dynamics_id = claims[cid]
    ahead = {cid for cid, row in claims.items() if plan.claimed.get(cid, "").lower() == row.lower()}
    late = {cid: row for cid, row in claims.items() if cid not in ahead}
    refused = (plan.refused & ahead) | (ctx.holds.refused(conn, late) if late else set())
    ledger = FailureLedger(ctx, conn)
    for cid in sorted(refused):
        del plan.mapped[cid]
        report.failed += 1
        plan.failed[cid] = CONFLICT
        ledger.record(cid, CONFLICT, conflict_reason(cid), version=plan.contacts[cid]["version"])
        _keep_snapshot(ctx, conn, plan.contacts[cid])


def write_contacts(ctx: SyncContext, conn: LiveConnection, dv: DataverseClient, patience: Patience, plan: Plan,
                   report: PageReport) -> None:
    """One bulk upsert of the mapped contacts; each record Dynamics rejects is recorded alone."""
    items = [UpsertItem(key=cid, contact_id=plan.new_states[cid].dynamics_id or new_contact_id(conn.account_id, cid),
                        payload=m.payload,
                        reactivate=bool(cid in plan.states and plan.states[cid].deleted
                                        and conn.delete_policy == "deactivate"))
             for cid, m in plan.mapped.items()]
    if not items:
        return
    result = patience.call(lambda: dv.bulk_upsert(items))
    ledger = FailureLedger(ctx, conn)
    for f in result.failed:
        category = plan.failed[f.key] = f.category if f.category in CATEGORIES else "validation"
        column = f" (column {f.field})" if f.field else ""
        ledger.record(f.key, category, f"Dynamics rejected the contact{column}: {f.message}",
                      version=plan.contacts[f.key]["version"])
        _keep_snapshot(ctx, conn, plan.contacts[f.key])
    report.failed += len(result.failed)
    report.written += len(items) - len(result.failed)


def settle_states(ctx: SyncContext, conn: LiveConnection, plan: Plan, report: PageReport) -> None:
    """Save the page's states in transactions; hand contacts a live worker wrote meanwhile back to the live
    lane; clear the failure rows of contacts that synced now."""
    to_save = [state for cid, state in plan.new_states.items() if cid not in plan.failed]
    # marked in their state, so that a later success clears the record
    to_save += [failed_state(plan.states.get(cid), conn.account_id, cid, category)
                for cid, category in plan.failed.items()]
    for state in ctx.states.save_many(to_save):
        # A live worker wrote this contact after we read its state: our (older) write may have landed
        # after theirs, so have the live lane apply its newest snapshot again.
        report.repairs += 1
        ctx.queues.send(CONTACT_EVENTS, ContactMessage(conn.account_id, state.contact_id, state.version or 0,
                                                       conn.generation, force=True).to_dict())
    FailureLedger(ctx, conn).settled([cid for cid in plan.new_states if cid not in plan.failed], plan.states)


def _write_page(ctx: SyncContext, conn: LiveConnection, contacts: dict[str, dict[str, Any]],
                report: PageReport, claimed: str | None = None) -> None:
    plan, todo = _plan(ctx, conn, contacts, report)
    if not todo:
        return
    dv = ctx.dataverse(conn)
    # the page is read and prepared: a short penalty is waited out here rather than through the queue
    patience = Patience(dv.budget, longest=INLINE_WAIT_SECONDS, budget=PAGE_WAIT_SECONDS)
    patience.check()  # a longer one sends the page back before it claims rows, which it would do again
    report.claimed = claim_new_rows(ctx, conn, plan, todo, claimed)
    before = dv.requests_made
    try:
        owners = patience.call(lambda: ctx.owners.lookup(dv, conn.account_id, conn.generation,
                                                         [owner_email(c) for c in todo.values()]))
        map_contacts(ctx, conn, plan, todo, owners, report)
        resolve_ids(ctx, conn, dv, patience, plan, report)
        write_contacts(ctx, conn, dv, patience, plan, report)
    finally:
        report.waited += patience.waited
    report.dataverse_requests += dv.requests_made - before
    settle_states(ctx, conn, plan, report)


def _fail_run(ctx: SyncContext, msg: PageMessage, category: str, reason: str) -> None:
    ctx.failures.record(msg.account_id, f"{PAGE_FAILURE_PREFIX}{msg.page}", category, reason,
                        generation=msg.generation)

    def mark(conn: Connection) -> bool:
        if conn.backfill.run_id != msg.run_id:
            return False
        conn.backfill.state, conn.backfill.finished_at = "failed", utcnow()
        return True

    ctx.connections.update(msg.account_id, mark)


def _settle_failure(ctx: SyncContext, msg: PageMessage, error: Exception) -> str:
    """Act on the ladder's verdict (sync/outcomes.py) for `error`; returns the outcome."""
    found = verdict(error, msg.attempt)
    if found.action is Action.RESCHEDULE:
        # a Dataverse penalty: back shortly before it ends, to be prepared while the rest runs out
        delay = return_delay(error.retry_after, PREPARE_AHEAD_SECONDS) if isinstance(error, Throttled) else found.delay
        ctx.queues.send(BACKFILL_PAGES, (msg.retry() if found.next_attempt else msg).to_dict(), delay_seconds=delay)
    elif found.action is Action.DROP:
        _fail_run(ctx, msg, "auth", "Microsoft no longer accepts the connection's sign-in; reconnect to finish")
    elif found.exhausted:
        _fail_run(ctx, msg, found.category, f"page {msg.page} failed {MAX_TRANSIENT_ATTEMPTS} times: {error}")
        return "failed"
    else:
        _fail_run(ctx, msg, found.category, f"page {msg.page}: {readable(error)}")
        return "failed"
    return found.outcome


def _finish_page(ctx: SyncContext, msg: PageMessage, report: PageReport, last: bool) -> bool:
    """Count the page and mark it done on the run's progress; True when it was the run's last to finish."""
    ctx.connections.add_counts(msg.account_id, msg.generation, synced=report.written, failed=report.failed,
                               skipped=report.unchanged)
    finished: list[bool] = []

    def progress(c: Connection) -> bool:
        finished.clear()
        b = c.backfill
        if _live(c, msg) is None or not b.mark_done(msg.page):
            return False
        b.pages, b.contacts = b.pages + 1, b.contacts + report.contacts
        if last:
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
    return bool(finished)


def run_page(ctx: SyncContext, msg: PageMessage, dequeue_count: int = 1) -> tuple[str, PageReport]:
    """Process one backfill page. Idempotent: a page that runs twice writes nothing new."""
    report = PageReport()
    conn = _live(ctx.connections.get(msg.account_id), msg)
    if conn is None:
        return "dropped:stale_run", report
    if conn.backfill.page_done(msg.page) and dequeue_count <= 1:
        return "dropped:page_done", report  # a duplicate of a page that completed (its successor is queued)
    if msg.page - conn.backfill.done_upto > PAGES_AHEAD:  # enough pages of this run are in flight
        ctx.queues.send(BACKFILL_PAGES, msg.to_dict(), delay_seconds=1)
        return "rescheduled:ahead", report
    if ctx.wave is None:
        raise ValueError("the backfill needs Wave's contacts API (SyncContext.wave)")
    try:
        # Dataverse throttles this user (seen by any instance) for a while: come back shortly before it ends
        wait = ctx.dataverse(conn).budget.remaining()
        if wait > PREPARE_AHEAD_SECONDS:
            ctx.queues.send(BACKFILL_PAGES, msg.to_dict(), delay_seconds=return_delay(wait, PREPARE_AHEAD_SECONDS))
            return "rescheduled:throttled", report
        page = ctx.wave.contacts_page(msg.account_id, msg.cursor, PAGE_SIZE)
        report.contacts = len(page.contacts)
        if page.next_cursor is not None and conn.backfill.queued < msg.page:
            _queue_next(ctx, msg, page.next_cursor)  # the next page runs while this one is written
        contacts = _valid_contacts(ctx, conn, page.contacts, report)
        _write_page(ctx, conn, contacts, report, msg.claimed)
    except EXPECTED as exc:
        return _settle_failure(ctx, replace(msg, claimed=report.claimed or msg.claimed), exc), report
    finished = _finish_page(ctx, msg, report, last=page.next_cursor is None)
    return ("done" if finished else "page"), report
