"""Daily upkeep: keep idle connections' refresh tokens alive and drop abandoned sign-ins.

Entra expires a refresh token unused for 90 days; a customer whose contacts do not change for a while
must not lose the connection for that. Refreshing every connection idle for more than a week keeps it
far from that limit; a refresh that fails moves the connection to needs_reauth (TokenStore does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.connections import ConnectionStore, live_connection
from core.log import outcome
from core.storage import iso
from oauth.errors import ConnectionGone, TokenUnavailable
from oauth.sessions import SessionStore
from oauth.token_store import TokenStore

log = logging.getLogger(__name__)

IDLE_AFTER = timedelta(days=7)


@dataclass(frozen=True)
class UpkeepResult:
    refreshed: int = 0
    needs_reauth: int = 0
    unavailable: int = 0
    sessions_removed: int = 0


def refresh_idle_connections(connections: ConnectionStore, tokens: TokenStore, sessions: SessionStore,
                             now: datetime | None = None) -> UpkeepResult:
    now = now or datetime.now(UTC)
    cutoff = iso(now - IDLE_AFTER)
    refreshed = reauth = unavailable = 0
    for conn in connections.all():
        idle_since = conn.token_refreshed_at or conn.connected_at or ""
        if live_connection(conn) is None or not conn.secret_name or idle_since > cutoff:
            continue
        try:
            tokens.access_token(conn, force_refresh=True)
            refreshed += 1
        except ConnectionGone:  # moved to needs_reauth, or its instance URL is no longer accepted
            reauth += 1
        except TokenUnavailable as exc:  # tomorrow's run tries again, with weeks to spare
            unavailable += 1
            outcome(log, "token_upkeep", "unavailable", level=logging.WARNING, account_id=conn.account_id,
                    error=str(exc))
    result = UpkeepResult(refreshed, reauth, unavailable, sessions.purge_expired(now))
    outcome(log, "token_upkeep", "done", refreshed=result.refreshed, needs_reauth=result.needs_reauth,
            unavailable=result.unavailable, sessions_removed=result.sessions_removed)
    return result
