"""The two queue triggers: `contact-events` -> a connection's drain (sync/drain.py) or the per-contact worker
(sync/worker.py), `backfill-pages` -> the page worker (sync/backfill.py). Each parses its message, runs the
worker and logs one outcome line."""

from __future__ import annotations

import logging

import azure.functions as func

from core.log import Timer, outcome
from core.storage import BACKFILL_PAGES, CONTACT_EVENTS
from functions.services import services
from sync import backfill, drain, worker
from sync.messages import DrainMessage, PageMessage, parse_contact_lane

bp = func.Blueprint()
# the loggers the outcome lines have always gone to (dashboards and tests read them by name)
contact_log = logging.getLogger("sync.worker")
page_log = logging.getLogger("sync.backfill")


@bp.function_name("contact_worker")
@bp.queue_trigger(arg_name="msg", queue_name=CONTACT_EVENTS, connection="AzureWebJobsStorage")
def contact_worker(msg: func.QueueMessage) -> None:
    timer = Timer()
    message = parse_contact_lane(msg.get_body())
    if isinstance(message, DrainMessage):
        result, report = drain.drain(services().sync, services().pending, message, holder=msg.id or None)
        outcome(contact_log, "drain", result, account_id=message.account_id, attempt=message.attempt or None,
                changes=report.changes, passes=report.passes, written=report.written, deleted=report.deleted or None,
                unchanged=report.unchanged or None, stale=report.stale or None, failed=report.failed or None,
                repairs=report.repairs or None, dataverse_requests=report.dataverse_requests,
                dequeue_count=msg.dequeue_count, ms=timer.ms)
        return
    result = worker.process(services().sync, message)
    outcome(contact_log, "contact", result, account_id=message.account_id, contact_id=message.contact_id,
            version=message.version, attempt=message.attempt or None, dequeue_count=msg.dequeue_count, ms=timer.ms)


@bp.function_name("backfill_worker")
@bp.queue_trigger(arg_name="msg", queue_name=BACKFILL_PAGES, connection="AzureWebJobsStorage")
def backfill_worker(msg: func.QueueMessage) -> None:
    timer = Timer()
    message = PageMessage.parse(msg.get_body())
    result, report = backfill.run_page(services().sync, message, msg.dequeue_count or 1)
    outcome(page_log, "backfill_page", result, account_id=message.account_id, run_id=message.run_id,
            page=message.page, attempt=message.attempt or None, contacts=report.contacts, written=report.written,
            unchanged=report.unchanged, failed=report.failed, repairs=report.repairs or None,
            dataverse_requests=report.dataverse_requests, waited_ms=round(report.waited * 1000) or None, ms=timer.ms)
