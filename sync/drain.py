"""The live lane's drain: a connection's pending changes (sync/pending.py) applied in bulk.

A drain message names an account. The drain takes the account's lease (one drain per account at a time),
then, pass after pass, reads up to BATCH pending changes, keeps the newest of each contact, and applies
them the way a backfill page is written (sync/backfill.py: owners in one lookup, unknown rows in one lookup
and claimed (sync/holds.py), one UpsertMultiple, states in Table transactions, each contact's failure
recorded alone); deletes follow the connection's delete policy in bulk too (sync/worker.py apply_deletes:
unknown rows in one lookup and claimed, then $batch requests of independent deletes, each contact's failure
recorded alone, a row already gone counted as deleted). Then the pass's pending
rows go, and the changes something may read again become the contacts' snapshots (`apply_changes` says
which; sync/pending.py `settle`). The rules of the
per-contact path hold: a change not newer than the applied version is stale (so duplicates, out-of-order
updates and an update older than a delete change nothing), unchanged content sends nothing, and a contact
another writer touched meanwhile (its state's ETag changed) is handed to the per-contact worker with
`force`, which applies the newest snapshot again (sync/worker.py; a change not yet settled is read from its
pending row).

A lone change is one pass of one contact: no added wait. While a burst trickles in, a pass that found many
changes is followed by the next at most every GATHER_SECONDS, so each pass carries what arrived meanwhile
(`gather_wait`). A backlog goes out in bulk, and since the
backlog lives in the account's pending rows, not in the shared queue, another account's change never
waits behind it. A penalty Dataverse gives the connection is waited out in-process while short; a longer
one puts the one drain message back for Retry-After (the pending rows stay where they are).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from core.connections import DISCONNECTED, LiveConnection, live_connection
from core.storage import CONTACT_EVENTS
from sync.backfill import (
    INLINE_WAIT_SECONDS,
    PAGE_WAIT_SECONDS,
    PageReport,
    Plan,
    map_contacts,
    resolve_ids,
    settle_states,
    write_contacts,
)
from sync.context import SyncContext
from sync.ledger import FailureLedger, failed_state, had_failed
from sync.mapping import owner_email
from sync.messages import ContactMessage, DrainMessage
from sync.outcomes import EXPECTED, Action, readable, verdict
from sync.pending import PendingChange, PendingStore, newest_by_contact
from sync.rules import Step, next_step
from sync.state import ContactState, Snapshot
from sync.throttle import Patience, reschedule_delay
from sync.worker import apply_deletes

log = logging.getLogger(__name__)
# Pending changes per pass: one Table query page, and one UpsertMultiple (dataverse/client.py splits it).
BATCH = 1000
LEASE_SECONDS = 60.0
# A drain gives its thread back after this long and continues from a new message, so a long backlog of
# one account does not hold a worker thread for minutes.
MAX_DRAIN_SECONDS = 60.0
# While a burst trickles in, a pass that found at least GATHER_MIN changes (about 100 a second arriving) is
# followed by the next no sooner than GATHER_SECONDS after it began, so that pass carries what arrived meanwhile:
# a pass's storage round trips and Dataverse request cost the same for 30 changes as for 300 (a 5,000-webhook
# burst took 174 passes of ~29 changes, bench/burst.py). A lone change, a slow trickle and a full pass (a
# backlog) never wait.
GATHER_SECONDS = 0.5
GATHER_MIN = 10


@dataclass
class DrainReport:
    changes: int = 0  # pending changes read (several of one contact count each)
    written: int = 0  # upserts that landed
    deleted: int = 0
    unchanged: int = 0  # content as applied: no request
    stale: int = 0  # not newer than what was applied
    failed: int = 0
    repairs: int = 0  # handed to the per-contact worker after a concurrent write
    passes: int = 0
    dataverse_requests: int = 0


def gather_wait(found: int, pass_seconds: float) -> float:
    """Seconds to wait before the next pass, after one that found `found` changes and took `pass_seconds`."""
    if found < GATHER_MIN or found >= BATCH:
        return 0.0
    return max(0.0, GATHER_SECONDS - pass_seconds)


def _send(ctx: SyncContext, msg: DrainMessage, delay: int = 0) -> None:
    ctx.queues.send(CONTACT_EVENTS, msg.to_dict(), delay_seconds=delay)


def _deletes(ctx: SyncContext, conn: LiveConnection, patience: Patience, deletes: dict[str, PendingChange],
             states: dict[str, ContactState], report: DrainReport) -> list[str]:
    """Delete (or deactivate) the pass's deleted contacts in bulk (sync/worker.py apply_deletes: $batch
    requests of independent deletes); one that fails is recorded alone. Returns the failed ones."""
    ledger = FailureLedger(ctx, conn)
    snaps = {cid: Snapshot(conn.account_id, cid, change.version, True, change.contact)
             for cid, change in deletes.items()}
    written, refused = apply_deletes(ctx, conn, snaps, states, patience)
    to_save = [w.state for w in written.values()]
    for cid, exc in refused.items():
        category = verdict(exc, 0).category or "internal"
        ledger.record(cid, category, readable(exc), version=deletes[cid].version)
        to_save.append(failed_state(states.get(cid), conn.account_id, cid, category))
    report.failed += len(refused)
    for lost in ctx.states.save_many(to_save):
        report.repairs += 1
        ctx.queues.send(CONTACT_EVENTS, ContactMessage(conn.account_id, lost.contact_id, lost.version or 0,
                                                       conn.generation, force=True).to_dict())
    report.deleted += len(written)
    ledger.settled(written, states)
    return sorted(refused)


def apply_changes(ctx: SyncContext, conn: LiveConnection, changes: list[PendingChange], report: DrainReport
                  ) -> list[PendingChange]:
    """One pass: the newest change of each contact applied; returns the changes to keep as the contacts'
    snapshots (PendingStore.settle). Raises only what concerns the whole pass.

    Kept are the snapshots something may read again: a contact's that failed now or before (`failures/retry`
    applies it), and,
    when the pass met a concurrent writer or a backfill of the connection ran beside it, every contact's: a
    contact another writer changed meanwhile is re-applied from its snapshot (sync/worker.py with `force`,
    also after a backfill page's state write lost to this pass, sync/backfill.py `settle_states`). A backfill that
    starts later reads this pass's changes as pending or as applied and leaves them alone
    (sync/rules.py backfill_writes). Storing every snapshot cost as much as the rest of the pass."""
    counted = replace(report)
    failed: set[str] = set()
    newest = newest_by_contact(changes)
    states = ctx.states.get_many(conn.account_id, newest)
    upserts: dict[str, PendingChange] = {}
    deletes: dict[str, PendingChange] = {}
    for cid, change in newest.items():
        state = states.get(cid)
        step = next_step(state.applied if state else None, change.version, change.deleted)
        if step is Step.STALE:
            report.stale += 1
        elif step is Step.DELETE:
            deletes[cid] = change
        else:
            upserts[cid] = change
    dv = ctx.dataverse(conn)
    patience = Patience(dv.budget, longest=INLINE_WAIT_SECONDS, budget=PAGE_WAIT_SECONDS)
    before = dv.requests_made
    if upserts:
        contacts = {cid: c.contact for cid, c in upserts.items()}
        page = PageReport()
        plan = Plan(contacts, {cid: s for cid, s in states.items() if cid in contacts})
        owners = patience.call(lambda: ctx.owners.lookup(dv, conn.account_id, conn.generation,
                                                         [owner_email(c) for c in contacts.values()]))
        map_contacts(ctx, conn, plan, contacts, owners, page)
        resolve_ids(ctx, conn, dv, patience, plan, page)
        write_contacts(ctx, conn, dv, patience, plan, page)
        settle_states(ctx, conn, plan, page)
        failed.update(plan.failed)
        report.written += page.written
        report.unchanged += page.unchanged
        report.failed += page.failed
        report.repairs += page.repairs
    if deletes:
        failed.update(_deletes(ctx, conn, patience, deletes, states, report))
    report.dataverse_requests += dv.requests_made - before
    ctx.connections.add_counts(conn.account_id, conn.generation, synced=report.written - counted.written,
                               deleted=report.deleted - counted.deleted, failed=report.failed - counted.failed,
                               skipped=report.unchanged - counted.unchanged)
    written = [*upserts.values(), *deletes.values()]
    # a contact that had failed may be in a `failures/retry` message right now, which re-applies the newest
    # snapshot when it loses a race with this pass (sync/worker.py)
    failed.update(cid for cid, state in states.items() if had_failed(state))
    # a backfill running when the pass began, or started (and maybe finished) since: read after the writes
    now = ctx.connections.get(conn.account_id)
    backfill = conn.backfill.state == "running" or now is None or now.backfill.state == "running" \
        or now.backfill.run_id != conn.backfill.run_id
    if report.repairs > counted.repairs or backfill:
        return written
    return [c for c in written if c.contact_id in failed]


def _pass_failed(ctx: SyncContext, conn: LiveConnection, pending: PendingStore, msg: DrainMessage,
                 changes: list[PendingChange], error: Exception, report: DrainReport) -> str | None:
    """Act on the ladder's verdict (sync/outcomes.py) for a pass that failed as a whole; returns the drain's
    outcome when it stops here, None when it goes on with the next pass."""
    found = verdict(error, msg.attempt)
    if found.action is Action.RESCHEDULE:
        _send(ctx, msg.retry() if found.next_attempt else msg, found.delay)
        return found.outcome
    if found.action is Action.DROP:
        pending.unmark(conn.account_id)  # a webhook after the reconnect schedules the next drain
        return found.outcome
    # recorded: every contact of the pass, with the reason; `failures/retry` re-applies their snapshots
    ledger = FailureLedger(ctx, conn)
    newest = newest_by_contact(changes)
    pending.settle(conn.account_id, newest.values(), changes)
    for cid, change in newest.items():
        ledger.record(cid, found.category, readable(error), version=change.version)
    # marked in their states, so that each contact's next success clears its record (another writer's wins)
    states = ctx.states.get_many(conn.account_id, newest)
    ctx.states.save_many([failed_state(states.get(cid), conn.account_id, cid, found.category) for cid in newest])
    report.failed += len(newest)
    ctx.connections.add_counts(conn.account_id, conn.generation, failed=len(newest))
    return None


def drain(ctx: SyncContext, pending: PendingStore, msg: DrainMessage, holder: str | None = None,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
          ) -> tuple[str, DrainReport]:
    """Apply the account's pending changes; returns the outcome and what was done. Raises only for bugs.
    `holder`: the queue message's id, the same in every delivery of it."""
    report = DrainReport()
    account = msg.account_id
    row = ctx.connections.get(account)
    conn = live_connection(row)
    if conn is None:
        if row is not None and row.state == DISCONNECTED:  # contact data leaves with the connection
            while changes := pending.read(account, BATCH):
                pending.delete(account, changes)
        pending.unmark(account)
        return "dropped:not_connected", report
    holder = holder or uuid.uuid4().hex
    if not pending.claim(account, holder, LEASE_SECONDS):
        # Another drain works on this account: it looks at the pending rows once more after it lets go of the
        # lease, and this message's change is there by then. Should it die instead, the host delivers its
        # message again, which takes the lease back (the holder is the queue message's id).
        return "deferred:draining", report

    def stop(outcome: str) -> tuple[str, DrainReport]:
        pending.release(account, holder)
        return outcome, report

    started = clock()
    while True:
        began = clock()
        changes = pending.read(account, BATCH)
        if not changes:
            # Release, unmark, look once more: a change stored meanwhile found the marker (and sent
            # nothing), so it is seen now; one stored after this look finds no marker and schedules a
            # drain itself.
            pending.release(account, holder)
            pending.unmark(account)
            if not pending.read(account, 1) or not pending.claim(account, holder, LEASE_SECONDS):
                return "drained", report
            continue
        if clock() - started > MAX_DRAIN_SECONDS:
            _send(ctx, replace(msg, attempt=0))
            return stop("continued")
        wait = ctx.dataverse(conn).budget.remaining()
        if wait > INLINE_WAIT_SECONDS:  # Dataverse throttles this connection for a while: come back then
            _send(ctx, msg, reschedule_delay(wait))
            return stop("parked:throttled")
        pending.touch(account)  # the marker is alive: the stalled-drain timer leaves it alone
        report.passes += 1
        report.changes += len(changes)
        try:
            applied = apply_changes(ctx, conn, changes, report)
        except EXPECTED as exc:
            stopped = _pass_failed(ctx, conn, pending, msg, changes, exc, report)
            if stopped is not None:
                return stop(stopped)
        else:
            msg = replace(msg, attempt=0)
            pending.settle(account, applied, changes)
        fresh = live_connection(ctx.connections.get(account))
        if fresh is None:  # disconnected meanwhile: no further writes
            return stop("dropped:not_connected")
        conn = fresh
        pending.claim(account, holder, LEASE_SECONDS)
        pause = gather_wait(len(changes), clock() - began)
        if pause:
            sleep(pause)
