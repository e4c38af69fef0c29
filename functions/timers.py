"""The timers: expired sign-ins every 5 minutes, idle refresh tokens and the sync tables' upkeep daily."""

from __future__ import annotations

import logging

import azure.functions as func

from core.log import outcome
from functions.services import services
from oauth import connect as flow
from oauth.maintenance import refresh_idle_connections
from oauth.pending import TABLE as PENDING_TABLE
from oauth.pending import PendingStore
from oauth.sessions import TABLE as SESSIONS_TABLE
from oauth.sessions import SessionStore
from sync.pending import resume_stalled_drains
from sync.upkeep import forget_disconnected, purge_expired_rows

bp = func.Blueprint()
log = logging.getLogger("sync.upkeep")


@bp.function_name("purge_expired_sign_ins")
@bp.timer_trigger(schedule="0 */5 * * * *", arg_name="timer", run_on_startup=False)
def purge_expired_sign_ins(timer: func.TimerRequest) -> None:
    # Every 5 minutes, so tokens of a sign-in nobody confirmed outlive its 10 minutes by little.
    s = services()
    flow.purge_expired_sign_ins(PendingStore(s.tables(PENDING_TABLE)), s.tokens)


@bp.function_name("refresh_idle_tokens")
@bp.timer_trigger(schedule="0 17 3 * * *", arg_name="timer", run_on_startup=False)
def refresh_idle_tokens(timer: func.TimerRequest) -> None:
    s = services()
    refresh_idle_connections(s.connections, s.tokens, SessionStore(s.tables(SESSIONS_TABLE)))


@bp.function_name("purge_expired_sync_rows")
@bp.timer_trigger(schedule="0 47 3 * * *", arg_name="timer", run_on_startup=False)
def purge_expired_sync_rows(timer: func.TimerRequest) -> None:
    s = services()
    removed = purge_expired_rows(s.tables)
    forgotten = forget_disconnected(s.tables, s.connections)
    outcome(log, "sync_upkeep", "done", disconnected_rows=forgotten, **removed)


@bp.function_name("resume_stalled_drains")
@bp.timer_trigger(schedule="30 * * * * *", arg_name="timer", run_on_startup=False)
def resume_stalled_drains_timer(timer: func.TimerRequest) -> None:
    # Every minute: a drain marker whose webhook died before sending the message (sync/pending.py).
    s = services()
    resumed = resume_stalled_drains(s.pending, s.queues)
    if resumed:
        outcome(log, "drain_upkeep", "resumed", accounts=resumed)
