"""Daily upkeep of the sync tables: rows that have expired are deleted, so the tables do not grow forever.

`webhookevents` keeps every accepted event id for DEDUPE_DAYS and `ownercache` every looked-up email
for its TTL; both are only ignored once expired, and a busy account adds thousands of event ids a day.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import azure.functions as func

from core.log import outcome
from core.services import services
from core.storage import Tables, delete_expired, iso
from sync.owners import TABLE as OWNERS
from sync.state import EVENTS

log = logging.getLogger(__name__)
bp = func.Blueprint()

EXPIRING = (EVENTS, OWNERS)


def purge_expired_rows(tables: Tables, now: datetime | None = None) -> dict[str, int]:
    """Rows deleted per table."""
    cutoff = iso(now or datetime.now(UTC))
    return {name: delete_expired(tables(name), cutoff) for name in EXPIRING}


@bp.function_name("purge_expired_sync_rows")
@bp.timer_trigger(schedule="0 47 3 * * *", arg_name="timer", run_on_startup=False)
def purge_expired_sync_rows(timer: func.TimerRequest) -> None:
    removed = purge_expired_rows(services().tables)
    outcome(log, "sync_upkeep", "done", **removed)
