"""The two queue triggers: `contact-events` -> a connection's drain (sync/drain.py) or the per-contact worker
(sync/worker.py), `backfill-pages` -> the page worker (sync/backfill.py). Each parses its message, runs the
worker and logs one outcome line."""

from __future__ import annotations

import logging

import azure.functions as func

from core.log import Timer, outcome
from core.settings import settings_problem, storage_settings
from core.storage import BACKFILL_PAGES, CONTACT_EVENTS, queue_client
from functions.services import services
from sync import backfill, drain, worker
from sync.messages import DrainMessage, PageMessage, parse_contact_lane

bp = func.Blueprint()
# the loggers the outcome lines have always gone to (dashboards and tests read them by name)
contact_log = logging.getLogger("sync.worker")
page_log = logging.getLogger("sync.backfill")
# While a setting is unusable (an unresolved Key Vault reference, functions/http.py) every message would fail
# until the host moved it to -poison after maxDequeueCount tries (host.json), seconds apart, and the changes
# in it would wait there for someone to move them back. Instead the message goes back to its queue, due
# again in a minute, so that the sync resumes on its own once the setting is fixed; storage messages live 7
# days (https://learn.microsoft.com/rest/api/storageservices/put-message).
SETTINGS_RETRY_SECONDS = 60


def wait_for_settings(queue_name: str, msg: func.QueueMessage, log: logging.Logger) -> bool:
    """True when the settings are unusable and the message was put back on its queue for later."""
    problem = settings_problem()
    if problem is None:
        return False
    # The storage settings alone: the trigger has just read this queue, so they are usable unless they
    # are the problem, and then this raises and the message takes the host's way to -poison.
    with queue_client(storage_settings(), queue_name) as queue:
        queue.send_message(msg.get_body().decode(), visibility_timeout=SETTINGS_RETRY_SECONDS)
    outcome(log, "settings", "unavailable", level=logging.ERROR, setting=problem.name, queue=queue_name,
            retry_in_s=SETTINGS_RETRY_SECONDS, dequeue_count=msg.dequeue_count)
    return True


@bp.function_name("contact_worker")
@bp.queue_trigger(arg_name="msg", queue_name=CONTACT_EVENTS, connection="AzureWebJobsStorage")
def contact_worker(msg: func.QueueMessage) -> None:
    if wait_for_settings(CONTACT_EVENTS, msg, contact_log):
        return
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
    if wait_for_settings(BACKFILL_PAGES, msg, page_log):
        return
    timer = Timer()
    message = PageMessage.parse(msg.get_body())
    result, report = backfill.run_page(services().sync, message, msg.dequeue_count or 1)
    outcome(page_log, "backfill_page", result, account_id=message.account_id, run_id=message.run_id,
            page=message.page, attempt=message.attempt or None, contacts=report.contacts, written=report.written,
            unchanged=report.unchanged, failed=report.failed, repairs=report.repairs or None,
            dataverse_requests=report.dataverse_requests, waited_ms=round(report.waited * 1000) or None, ms=timer.ms)
