"""One outcome ladder for both workers (sync/worker.py, sync/backfill.py), and the failure categories and
readable reasons of the errors they meet. Pure: the workers act on the verdict.

The ladder, so that only true bugs reach the poison queue:
- a sign-in Microsoft no longer accepts (ReauthRequired: the token layer has set needs_reauth), or a
  connection that is not live any more (NotConnected; both are ConnectionGone): the work is dropped;
- throttling (Dataverse's 429, Wave's 429): the message goes back to its queue, visible after Retry-After
  (and the original completes: the host's dequeue count is not burned); Dataverse's penalty is already
  in the user's budget (dataverse/budget.py), which holds back the user's other work on every instance;
- transient errors (5xx, network, token service hiccups): back to the queue with a growing delay and an
  attempt counter (the host's fixed visibilityTimeout cannot back off) until MAX_TRANSIENT_ATTEMPTS, then
  recorded as failed;
- everything else the workers expect (a record Dynamics rejects, an invalid contact, a row another account
  holds, Wave's API refusing): recorded with a category (core/failures.py) and a reason a person can act
  on, not retried until someone asks (`POST /api/connections/{id}/failures/retry`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from core.errors import FieldError
from dataverse.errors import AuthExpired, DataverseError, Throttled, Transient
from oauth.errors import ConnectionGone, NotConnected, ReauthRequired, TokenUnavailable
from sync.holds import HeldElsewhere
from sync.rules import MAX_TRANSIENT_ATTEMPTS, retry_delay, throttle_delay
from sync.wave_api import WaveError, WaveThrottled, WaveUnavailable

# The errors a worker expects; anything else is a bug, left to the host's retries and the poison queue.
EXPECTED: tuple[type[Exception], ...] = (ConnectionGone, TokenUnavailable, DataverseError, WaveError, FieldError,
                                         HeldElsewhere)
_CATEGORIES = ("validation", "permission", "not_found", "throttled", "transient", "auth", "conflict")


class Action(enum.Enum):
    DROP = "dropped"
    RESCHEDULE = "rescheduled"
    RECORD = "failed"


@dataclass(frozen=True)
class Verdict:
    action: Action
    outcome: str  # the worker's outcome word: dropped:needs_reauth, rescheduled:throttled, ...
    delay: int = 0  # RESCHEDULE: seconds before the message is visible again
    next_attempt: bool = False  # RESCHEDULE: the message comes back as its next attempt
    category: str = ""  # RECORD
    exhausted: bool = False  # RECORD: a transient error that used up its attempts


def failure_category(error: Exception) -> str:
    """The customer-visible category (core/failures.py CATEGORIES) for an error."""
    if isinstance(error, FieldError):
        return "validation"
    if isinstance(error, WaveError):
        return "source"
    if isinstance(error, TokenUnavailable):
        return "transient"
    category = getattr(error, "category", "")
    if category in _CATEGORIES:
        return str(category)
    return "validation" if isinstance(error, DataverseError) else "internal"


def readable(error: Exception) -> str:
    if isinstance(error, FieldError):
        return f"Wave sent an invalid value: {error}"
    if isinstance(error, DataverseError):
        return f"Dynamics answered {error}"
    return str(error)


def verdict(error: Exception, attempt: int, *, jitter: float = 0.0) -> Verdict:
    """What a worker does about `error` on attempt number `attempt` (from 0). `jitter` in [0, 1) spreads
    throttled messages over up to twice their Retry-After (sync/rules.py throttle_delay)."""
    if isinstance(error, ReauthRequired):
        return Verdict(Action.DROP, "dropped:needs_reauth")
    if isinstance(error, NotConnected):
        return Verdict(Action.DROP, "dropped:not_connected")
    if isinstance(error, (Throttled, WaveThrottled)):
        return Verdict(Action.RESCHEDULE, "rescheduled:throttled", delay=throttle_delay(error.retry_after, jitter))
    transient = isinstance(error, (Transient, AuthExpired, TokenUnavailable, WaveUnavailable))
    if transient and attempt + 1 < MAX_TRANSIENT_ATTEMPTS:
        return Verdict(Action.RESCHEDULE, "rescheduled:transient", delay=retry_delay(attempt), next_attempt=True)
    category = failure_category(error)
    return Verdict(Action.RECORD, f"failed:{category}", category=category, exhausted=transient)
