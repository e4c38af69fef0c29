"""The user's lease and the window's log: the part of a Dataverse user's budget (dataverse/budget.py) that
keeps prepared work to one request at a time over all instances and paces it as the service gives its
budget back. Both are fields of the user's row in the `dataversebudget` table; these are the pure rules,
`TableBudgetStore` takes and gives back the row.

- One prepared request at a time over all instances: requests of callers that wait out penalties
  themselves (a backfill page, a drain pass: few and bulk) take the user's lease (`lease`, `lease_until` in
  the same row, ETag-conditional) and give it back after the answer, with the 429 it may have met written
  in the same write. The next one, of any instance, takes the lease by reading that row, so it sees the
  penalty before sending. Per-instance turns let two instances' requests go side by side when the window
  ran out, and a penalty reached the row 5-370 ms after its 429, so a third was sent into it. A lease ends
  after TURN_WAIT_SECONDS: a 429 is answered at once, so a request still running then was let in, and a
  slow bulk write must not hold back the user's other work. Three Table requests per bulk request.
- The window's log: the give-back also logs each answered bulk request (when, rows) for the last window
  (WINDOW_SECONDS), and a 429 of the execution-time limit makes the rows then in the window the user's
  cap. A prepared request that finds the cap's rows in the window waits, as for a penalty, until enough
  have aged out (paced_until): the service gives the budget back as its requests age out, at the pace
  they were sent, and pages sent faster met a second 429 and split every later window in two
  (BENCHMARKS.md (a)). The cap assumes a row costs the same execution time in every bulk request; a 429
  corrects it downwards, and it is trusted CAP_TTL_WINDOWS windows, then met again, so a service that
  grew is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The service's sliding window (https://learn.microsoft.com/power-apps/developer/data-platform/api-limits).
WINDOW_SECONDS = 300.0
CAP_TTL_WINDOWS = 6  # a learned cap is trusted this many windows, then met again (the service's may have grown)
LOG_LIMIT = 500  # bulk requests kept in the row's log (one window's; ~150 at a bulk write every 2 s)


@dataclass(frozen=True)
class Lease:
    """The user's one prepared request in flight over all instances (TableBudgetStore.take_lease)."""

    taken: bool  # False: another instance's request holds it (until `until`), or a penalty runs
    until: float  # epoch seconds: when the lease ends
    penalty_until: float = 0.0  # the penalty the row held
    token: str = ""
    row: dict[str, object] | None = None  # the row as written when taken, for a one-request give-back
    etag: str | None = None
    paced_until: float = 0.0  # not taken: the window's known budget is spent until then (paced_until())


@dataclass
class Answer:
    """What the request sent in a lease came to: written to the row as the lease is given back."""

    rows: int = 0  # rows a bulk request writes (0: a lookup)
    at: float = 0.0  # epoch seconds the service answered (0: not sent)
    penalty_until: float = 0.0  # the end of the 429 it met (0: none)
    execution_time: bool = False  # that 429 was the execution-time limit's: the window's rows are the cap


def row_log(row: Mapping[str, object]) -> list[list[float]]:
    return list(json.loads(str(row.get("sent") or "[]")))


def cap_of(row: Mapping[str, object], now: float, window: float) -> int | None:
    """The row's learned cap while it is trusted (CAP_TTL_WINDOWS)."""
    cap, at = row.get("cap"), float(row.get("cap_at") or 0.0)  # type: ignore[arg-type]
    return int(cap) if cap and now - at < CAP_TTL_WINDOWS * window else None  # type: ignore[call-overload]


def lease_state(row: Mapping[str, object], token: str, now: float) -> tuple[float, float, bool]:
    """(penalty_until, lease_until, free) of a budget row: the lease is free when it has ended or is
    `token`'s, and no penalty runs."""
    penalty = float(row.get("penalty_until") or 0.0)  # type: ignore[arg-type]
    held = float(row.get("lease_until") or 0.0)  # type: ignore[arg-type]
    return penalty, held, penalty <= now and (held <= now or row.get("lease") == token)


def window_rows(log: Sequence[Sequence[float]], now: float, window: float) -> list[tuple[float, int]]:
    """The log's bulk requests still inside the window: (answered at, rows)."""
    return sorted((float(at), int(rows)) for at, rows in log if float(at) > now - window)


def paced_until(log: Sequence[Sequence[float]], cap: int | None, now: float, window: float) -> float:
    """When the next prepared request may go (0: now), as the service would admit it: a request is refused
    while the window's execution time is at its limit, and time leaves the window as requests age out
    (devstack/dataverse/limits.py, after the api-limits page). The limit is known as `cap`, the rows the
    user's bulk requests had written within the window when one met a 429 (`learned_cap`); so with `cap`
    rows in the window, the request waits until enough of them have aged out. Without a cap, nothing
    waits: the first 429 teaches it."""
    if not cap:
        return 0.0
    inside = window_rows(log, now, window)
    rows = sum(r for _, r in inside)
    if rows < cap:
        return 0.0
    for at, r in inside:
        rows -= r
        if rows < cap:
            return at + window
    return 0.0  # not reached: with every request aged out, 0 rows are left


def learned_cap(log: Sequence[Sequence[float]], now: float, window: float) -> int | None:
    """The rows written within the window when a 429 came: what the user's execution time allows (None when
    the log holds none: that 429 came from other work, and teaches nothing about bulk requests)."""
    rows = sum(r for _, r in window_rows(log, now, window))
    return rows or None


def taken_lease(row: Mapping[str, object], token: str, now: float, until: float,
                window: float) -> tuple[Lease, dict[str, object] | None]:
    """The user's lease, taken until `until` when it is free (lease_state) and the window's known budget is
    not spent (paced_until): the lease and the row to write; otherwise who holds it until when, which
    penalty runs, or when the budget comes back, and nothing to write."""
    penalty, held, free = lease_state(row, token, now)
    pace = paced_until(row_log(row), cap_of(row, now, window), now, window) if free else 0.0
    if not free or pace > now:
        return Lease(False, held, penalty, paced_until=pace), None
    new = {"penalty_until": 0.0, **row, "lease": token, "lease_until": until}
    return Lease(True, until, penalty, token, new), new


def given_back(row: Mapping[str, object], lease: Lease, answer: Answer, window: float) -> dict[str, object] | None:
    """The row with the lease ended and what its request came to: a bulk request answered goes into the
    window's log; a 429 is noted (when it ends later than the row's penalty), and the rows the log holds
    then become the cap (learned_cap). None: nothing to write."""
    new = dict(row)
    mine = lease.taken and new.get("lease") == lease.token
    later = answer.penalty_until > float(new.get("penalty_until") or 0.0)  # type: ignore[arg-type]
    if not mine and not later and not answer.at:
        return None
    if mine:
        new.update(lease="", lease_until=0.0)
    if later:
        new["penalty_until"] = answer.penalty_until
    if answer.at:
        log = [[at, rows] for at, rows in window_rows(row_log(new), answer.at, window)]
        if answer.execution_time:
            cap = learned_cap(log, answer.at, window)
            if cap:
                new.update(cap=cap, cap_at=answer.at)
        elif answer.rows:
            log = [*log, [answer.at, answer.rows]][-LOG_LIMIT:]
        new["sent"] = json.dumps(log, separators=(",", ":"))
    return new
