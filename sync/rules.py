"""The sync's business rules as pure functions: ordering, dedupe, owner choice, retry timing.

Everything here is decided from values the caller has read; nothing does I/O, so each rule is tested
on its own (tests/test_rules.py).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from dataverse.client import ContactRef, UserRef


@dataclass(frozen=True)
class Applied:
    """What the contact sync state says was last written to Dataverse for one Wave contact."""

    version: int | None = None
    deleted: bool = False
    content_hash: str | None = None
    dynamics_id: str | None = None


class Step(enum.Enum):
    STALE = "stale"  # an equal or newer version is already applied: do nothing
    UPSERT = "upsert"
    DELETE = "delete"


def next_step(applied: Applied | None, version: int, deleted: bool, *, force: bool = False) -> Step:
    """What to do with a snapshot at `version`, given what was applied.

    Versions only move forward: an older snapshot never overwrites a newer one, and since a delete has
    a version like any change, an update older than the delete can never undo it. `force` re-applies the
    same version (after a concurrent writer may have clobbered it), never an older one.
    """
    if applied is not None and applied.version is not None and (
            version < applied.version or (version == applied.version and not force)):
        return Step.STALE
    return Step.DELETE if deleted else Step.UPSERT


def unchanged(applied: Applied | None, content_hash: str) -> bool:
    """The mapped content equals what Dataverse already holds for a live row: skip the request."""
    return (applied is not None and not applied.deleted and applied.dynamics_id is not None
            and applied.content_hash == content_hash)


def backfill_writes(wave_version: int, applied: Applied | None, pending_version: int | None) -> bool:
    """A backfill snapshot is written only if it is newer than what was applied and than any live
    snapshot still waiting in the contact-events lane (that one will be applied by the live worker)."""
    if pending_version is not None and pending_version > wave_version:
        return False
    return next_step(applied, wave_version, deleted=False) is not Step.STALE


# A failure that `failures/retry` queued counts as queued for this long unless the worker settles it first
# (a success deletes it, a new failure replaces it). Longer than a message can take through throttling
# and the transient backoff (8 attempts, at most 5 minutes apart); should the message be dropped without
# settling it (the contact was meanwhile applied at a newer version), a retry after that re-queues it.
REQUEUE_PENDING_SECONDS = 3600


def requeue_pending(requeued_at: str | None, stale_before: str) -> bool:
    """A failure marked as queued at `requeued_at` (ISO UTC text) is still waiting for the worker, so a
    retry must not queue it again; `stale_before` is now minus REQUEUE_PENDING_SECONDS, as the same text."""
    return requeued_at is not None and requeued_at > stale_before


def choose_owner(users: Iterable[UserRef]) -> str | None:
    """The systemuserid to own a contact among the users whose email matched, or None (no owner).

    Only enabled, interactive users can own contacts: disabled users and non-interactive or
    application users (accessmode 4) are skipped. Several matches are resolved deterministically,
    preferring read-write users (accessmode 0).
    """
    eligible = [u for u in users if not u.disabled and u.accessmode != 4 and u.systemuserid]
    if not eligible:
        return None
    return min(eligible, key=lambda u: (u.accessmode not in (0, None), u.systemuserid.lower())).systemuserid


def pick_row(rows: Iterable[ContactRef]) -> ContactRef | None:
    """The row to keep using among several of one Wave contact (made before this integration, or by
    hand): the active one, then the oldest, then the lowest id, so every instance picks the same."""
    return min(rows, key=lambda r: (r.statecode != 0, r.createdon or "", r.contactid), default=None)


# The longest address that can be used in a mail path (RFC 3696 erratum 1690,
# https://www.rfc-editor.org/errata/eid1690). Longer text cannot be a Dynamics user's email, and looking it
# up could only make the request URL too long.
MAX_EMAIL_LENGTH = 254


def owner_lookup_problem(email: str) -> str | None:
    """Why an assigned team member's email is not looked up as an owner, or None when it is.

    The reason never quotes the email: it ends up in logs and in the contact's state.
    """
    text = email.strip()
    if len(text) > MAX_EMAIL_LENGTH:
        return f"the team member's email is {len(text)} characters long (at most {MAX_EMAIL_LENGTH})"
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return "the team member's email is not shaped like an address (name@domain, no spaces)"
    return None


MAX_WARNING_LENGTH = 1000


def warning_text(warnings: Iterable[str | None]) -> str | None:
    """A contact's warnings as the one bounded text its sync state keeps, or None when there are none."""
    text = "; ".join(w for w in warnings if w)
    return text[:MAX_WARNING_LENGTH] if text else None


# Transient failures are re-enqueued with a growing delay (the host's fixed visibilityTimeout cannot
# grow), until MAX_TRANSIENT_ATTEMPTS; then the contact is recorded as failed for a person to retry.
MAX_TRANSIENT_ATTEMPTS = 8
BASE_DELAY_SECONDS = 2
MAX_DELAY_SECONDS = 300


def retry_delay(attempt: int) -> int:
    """Seconds before attempt number `attempt + 1` (attempt counts from 0)."""
    return min(MAX_DELAY_SECONDS, BASE_DELAY_SECONDS << max(0, attempt))


def throttle_delay(retry_after: float | None, jitter: float = 0.0) -> int:
    """Never earlier than Retry-After (rounded up); `jitter` in [0, 1) spreads waiting messages over up
    to twice that, so they do not all return at the same moment and extend the penalty again."""
    wait = BASE_DELAY_SECONDS if retry_after is None or retry_after <= 0 else retry_after
    return min(MAX_DELAY_SECONDS * 4, math.ceil(wait * (1 + max(0.0, min(jitter, 1.0)))))
