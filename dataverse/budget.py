"""One Dataverse budget per user, shared by every instance of the app.

Service protection counts per user: requests and execution time over 300 s, and 52 requests in flight;
a request sent during a penalty (a 429's Retry-After) extends it
(https://learn.microsoft.com/power-apps/developer/data-platform/api-limits). On Flex Consumption each
queue function scales on its own instances
(https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#per-function-scaling), so what one
process learns from a 429 must hold back the others too, and their requests in flight add up.

- Penalty: a 429 is noted in this process at once and written to the user's row in the `dataversebudget`
  table (only when it ends later than the one already known). Every instance reads that partition at most
  every REFRESH_SECONDS while it sends to the user, so the hot path reads memory; an instance learns of
  another's penalty within that time.
- Turns: after a penalty the user's waiting callers go one stagger apart over all instances, in one
  schedule: the next free turn is `next_turn` in the user's row, taken with an ETag-conditional write.
  The service gives the window's budget back as the old requests age out, at the pace they were sent;
  each instance's own schedule side by side sent three instances' waiters three times as fast as one's,
  and most windows met a second 429. One or two Table requests per waiting call, after a penalty only.
- One prepared request at a time over all instances, paced by the window's log: dataverse/lease.py (the
  lease and the log are fields of the same row, taken and given back by `TableBudgetStore`).
- Concurrency: requests in flight to the user, over all instances, stay within the cap: Dataverse's
  concurrency limit, or the `x-ms-dop-hint` when it is lower (sending more than the hint "worsens
  performance": https://learn.microsoft.com/power-apps/developer/data-platform/send-parallel-requests).
  Each instance sending to the user heartbeats a row in the same partition; the cap is divided among the
  live instances by rank (`instance_share`), so the shares add up to the cap exactly, and an instance
  beyond the cap gets 0 and sends nothing (its work goes back to its queue). A lease per request in
  storage would be exact too, but costs two conditional writes per Dataverse request on the hot path,
  and a killed instance's leases stay taken until they expire; shares cost one partition read per
  REFRESH_SECONDS per instance, and a killed instance's share returns after INSTANCE_TTL_SECONDS.

A storage error never fails a request: the budget then goes on with what this process knows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import quote, urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, UpdateMode

from core.errors import ConcurrencyError
from core.penalties import Penalties
from core.tables import update_row
from dataverse.lease import WINDOW_SECONDS, Answer, Lease, given_back, taken_lease

log = logging.getLogger("dataverse.budget")

TABLE = "dataversebudget"
CONCURRENCY_LIMIT = 52  # requests in flight per user (api-limits page above)
REFRESH_SECONDS = 1.0  # how old the shared view may get before a request reads storage again
HEARTBEAT_SECONDS = 5.0  # how often an instance sending to a user says so
INSTANCE_TTL_SECONDS = 20.0  # an instance not heard of for this long has no share any more
NO_SHARE_RETRY_SECONDS = HEARTBEAT_SECONDS  # work of an instance without a share comes back after this
TURN_WAIT_SECONDS = 0.5  # longest a request of prepared work holds the lease, or waits for this instance's lock
LEASE_WAIT_SECONDS = 5.0  # longest a request waits for the lease (Budget.in_turn), then goes without it
LEASE_POLL_SECONDS = 0.02  # how often a request waiting for another instance's lease reads the row again
_PENALTY_ROW = "budget"
_INSTANCE_PREFIX = "i~"
_KEY = "user"  # the one key of the local Penalties
# This process, as other instances see it in the instance rows.
INSTANCE_ID = uuid.uuid4().hex


@dataclass(frozen=True)
class Shared:
    """What storage holds for one Dataverse user."""

    penalty_until: float = 0.0  # epoch seconds
    dop_hint: int | None = None
    instances: tuple[str, ...] = ()  # instance ids heard of within INSTANCE_TTL_SECONDS


class BudgetStore(Protocol):
    def read(self, key: str, live_since: float) -> Shared: ...

    def note_penalty(self, key: str, until: float) -> None: ...

    def note_dop_hint(self, key: str, hint: int) -> None: ...

    def heartbeat(self, key: str, instance: str, now: float) -> None: ...

    def claim_turn(self, key: str, not_before: float, stagger: float, latest: float | None) -> Turn: ...

    def take_lease(self, key: str, token: str, now: float, until: float, window: float) -> Lease: ...

    def give_back(self, key: str, lease: Lease, answer: Answer, window: float) -> None: ...


@dataclass(frozen=True)
class Turn:
    """A place in the user's one schedule of sends after a penalty (TableBudgetStore.claim_turn)."""

    at: float  # epoch seconds
    taken: bool  # False: it was later than the caller may wait, and left for others
    penalty_until: float = 0.0  # the penalty the row held


def next_turn(not_before: float, penalty_until: float, scheduled: float) -> float:
    """The first free turn: after the penalty (as the caller and the row know it) and after the turns
    already given out (`scheduled`: the row's next free one)."""
    return max(not_before, penalty_until, scheduled)


def budget_key(instance_url: str, user: str) -> str:
    """The partition of a Dataverse user: the instance's host and the user (Table keys take no / \\ # ?)."""
    return quote(f"{urlsplit(instance_url).netloc.lower()}~{user}", safe="~@:")


def concurrency_cap(dop_hint: int | None, limit: int = CONCURRENCY_LIMIT) -> int:
    """Requests in flight to one user over all instances: the limit, or the DOP hint when lower."""
    return max(1, min(limit, dop_hint)) if dop_hint else limit


def instance_share(cap: int, instances: Sequence[str], me: str) -> int:
    """This instance's part of `cap`: the live instances sorted, the first `cap % n` get one more, so the
    parts add up to `cap`; with more instances than `cap` the last ones get 0."""
    live = sorted({*instances, me})
    rank = live.index(me)
    return cap // len(live) + (1 if rank < cap % len(live) else 0)


class TableBudgetStore:
    """The users' rows in a Table: `budget` (penalty_until, dop_hint) and `i~<instance>` (seen)."""

    def __init__(self, table: TableClient) -> None:
        self.table = table

    def read(self, key: str, live_since: float) -> Shared:
        until, hint, instances = 0.0, None, []
        for row in self.table.query_entities("PartitionKey eq @pk", parameters={"pk": key}):
            name = str(row["RowKey"])
            if name == _PENALTY_ROW:
                until = float(row.get("penalty_until") or 0.0)
                hint = int(row["dop_hint"]) if row.get("dop_hint") else None
            elif name.startswith(_INSTANCE_PREFIX) and float(row.get("seen") or 0.0) >= live_since:
                instances.append(name[len(_INSTANCE_PREFIX):])
        return Shared(until, hint, tuple(sorted(instances)))

    def _update(self, key: str, change: Callable[[TableEntity | None], dict[str, object] | None]) -> str | None:
        return update_row(self.table, key, _PENALTY_ROW, change, what="Dataverse budget")

    def note_penalty(self, key: str, until: float) -> None:
        def extend(old: TableEntity | None) -> dict[str, object] | None:
            if old is not None and float(old.get("penalty_until") or 0.0) >= until:
                return None  # another instance noted a penalty that ends later
            return {**(old or {}), "PartitionKey": key, "RowKey": _PENALTY_ROW, "penalty_until": until}

        self._update(key, extend)

    def note_dop_hint(self, key: str, hint: int) -> None:
        def set_hint(old: TableEntity | None) -> dict[str, object] | None:
            if old is not None and old.get("dop_hint") == hint:
                return None
            return {"penalty_until": 0.0, **(old or {}), "PartitionKey": key, "RowKey": _PENALTY_ROW,
                    "dop_hint": hint}

        self._update(key, set_hint)

    def claim_turn(self, key: str, not_before: float, stagger: float, latest: float | None) -> Turn:
        """Take the user's next turn (not before `not_before`) and move the row's `next_turn` one stagger on,
        with an ETag-conditional write (retried on a conflict); a turn later than `latest` is returned
        without taking it."""
        got: list[Turn] = []

        def claim(old: TableEntity | None) -> dict[str, object] | None:
            row: dict[str, object] = dict(old or {})
            until = float(row.get("penalty_until") or 0.0)  # type: ignore[arg-type]
            at = next_turn(not_before, until, float(row.get("next_turn") or 0.0))  # type: ignore[arg-type]
            got[:] = [Turn(at, latest is None or at <= latest, until)]
            if not got[0].taken:
                return None
            return {"penalty_until": 0.0, **row, "PartitionKey": key, "RowKey": _PENALTY_ROW,
                    "next_turn": at + stagger}

        self._update(key, claim)
        return got[0]

    def take_lease(self, key: str, token: str, now: float, until: float, window: float) -> Lease:
        """`taken_lease` with an ETag-conditional write (retried on a conflict)."""
        got: list[Lease] = []

        def take(old: TableEntity | None) -> dict[str, object] | None:
            lease, new = taken_lease(dict(old or {}), token, now, until, window)
            row = None if new is None else {**new, "PartitionKey": key, "RowKey": _PENALTY_ROW}
            got[:] = [replace(lease, row=row)]
            return row

        etag = self._update(key, take)
        return replace(got[0], etag=etag) if got[0].taken else got[0]

    def give_back(self, key: str, lease: Lease, answer: Answer, window: float) -> None:
        """`given_back` in one replace on the ETag of the take when nobody wrote the row since, else read and
        write again."""
        if lease.row is not None and lease.etag:
            new = given_back(lease.row, lease, answer, window)
            try:
                if new is not None:
                    self.table.update_entity(new, mode=UpdateMode.REPLACE, etag=lease.etag,
                                             match_condition=MatchConditions.IfNotModified)
                return
            except (ResourceModifiedError, ResourceNotFoundError):
                pass  # another write came between (a penalty, a turn): read it and write again
        self._update(key, lambda old: None if old is None else given_back(old, lease, answer, window))

    def heartbeat(self, key: str, instance: str, now: float) -> None:
        self.table.upsert_entity({"PartitionKey": key, "RowKey": _INSTANCE_PREFIX + instance, "seen": now},
                                 mode=UpdateMode.REPLACE)


class NoSlot(Exception):
    """No request slot within the wait: this instance's share of the user's requests is in flight."""

    def __init__(self, share: int, retry_after: float) -> None:
        super().__init__(f"{share} requests of this Dataverse user are in flight from this instance"
                         if share else "other instances hold this Dataverse user's whole concurrency")
        self.share, self.retry_after = share, retry_after


class Budget:
    """One Dataverse user's budget as this process sees it; every transport of the user shares one.

    Without a store it is this process's alone (tests, the connect flow's access check, the benchmark's
    baselines)."""

    def __init__(self, key: str = "local", store: BudgetStore | None = None, *, instance: str = INSTANCE_ID,
                 clock: Callable[[], float] = time.time, refresh: float = REFRESH_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS, instance_ttl: float = INSTANCE_TTL_SECONDS,
                 limit: int = CONCURRENCY_LIMIT, turn_wait: float = TURN_WAIT_SECONDS,
                 window: float = WINDOW_SECONDS) -> None:
        self.key, self.store, self.instance = key, store, instance
        self._clock = clock
        self.refresh, self.heartbeat, self.instance_ttl, self.limit = refresh, heartbeat, instance_ttl, limit
        self._local = Penalties(clock)  # epoch clock: the shared rows hold epoch seconds
        self._cond = threading.Condition()
        self._shared = Shared(instances=(instance,))
        self._read_at = self._beat_at = -math.inf
        self._refreshing = False
        self.dop_hint: int | None = None  # the last hint this process saw
        self.in_flight = 0
        self.waiting = 0  # callers waiting for a slot
        self._callers = threading.local()  # threads whose caller waits out penalties itself
        self._in_turn = threading.Lock()
        self.turn_wait, self.window = turn_wait, window

    # -- the shared view ------------------------------------------------------------------------

    def _refresh(self, fresh: bool = False) -> None:
        """Read the user's rows when the view is older than `refresh` (one thread at a time; the others go
        on with the view they have, except before the first read) or when `fresh`, heartbeating first when
        due. Waiters for a slot are woken: a share may have grown."""
        if self.store is None:
            return
        now = self._clock()
        with self._cond:
            while self._refreshing and self._read_at == -math.inf:
                self._cond.wait()  # before the first read there is no view to go on with: wait for it
            if not fresh and (self._refreshing or now - self._read_at < self.refresh):
                return
            self._refreshing = True
        shared: Shared | None = None
        try:
            if now - self._beat_at >= self.heartbeat:
                self.store.heartbeat(self.key, self.instance, now)
                self._beat_at = now
            shared = self.store.read(self.key, now - self.instance_ttl)
        except AzureError as exc:
            log.warning("Dataverse budget %s: storage unavailable (%s); going on with what this instance knows",
                        self.key, type(exc).__name__)
        finally:
            if shared is not None and shared.penalty_until > now:
                self._local.note(_KEY, shared.penalty_until - now)
            with self._cond:
                if shared is not None:
                    self._shared = Shared(shared.penalty_until, shared.dop_hint,
                                          tuple(sorted({*shared.instances, self.instance})))
                self._refreshing, self._read_at = False, now
                self._cond.notify_all()

    def _write(self, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except (AzureError, ConcurrencyError) as exc:
            log.warning("Dataverse budget %s: could not share the %s (%s)", self.key, what, type(exc).__name__)

    # -- penalties ------------------------------------------------------------------------------

    def remaining(self, fresh: bool = False) -> float:
        """Seconds the user's penalty still runs, as any instance has seen it (0: none). `fresh` reads
        storage first: a caller that has just waited out a penalty asks so, because the first requests
        after it may have met a new one on another instance."""
        self._refresh(fresh)
        return self._local.remaining(_KEY)

    def turn(self, limit: float | None = None) -> float:
        """Seconds a caller waits before trying again: the penalty's end plus its place among the waiters; a
        turn longer than `limit` takes no place. With a store the places are one schedule for the user over
        all instances (the budget row's `next_turn`, claimed with a conditional write): after a penalty the
        service gives the window's budget back as the old requests age out, at the pace they were sent, so
        the user's waiters go one stagger apart whatever the number of instances, as one instance's do.
        (Places per instance, the instances a fraction of a stagger apart, sent three instances' waiters
        three times as fast as one's, and met a second 429 in most windows.) Each caller reads storage
        again before sending (`remaining(fresh=True)`), so that a 429 one instance meets stops the others
        too. Without a store, or when storage fails, the places are this process's (core/penalties.py
        `turn`), the instances offset by rank."""
        left = self._local.remaining(_KEY)
        if left <= 0:
            return 0.0
        if self.store is not None and (limit is None or left <= limit):
            now = self._clock()
            try:
                got = self.store.claim_turn(self.key, now + left, self._local.stagger,
                                            None if limit is None else now + limit)
            except (AzureError, ConcurrencyError) as exc:
                log.warning("Dataverse budget %s: could not take a shared turn (%s); taking one in this instance",
                            self.key, type(exc).__name__)
            else:
                if got.penalty_until > now:
                    self._local.note(_KEY, got.penalty_until - now)
                return max(0.0, got.at - now)
        live = sorted({*self._shared.instances, self.instance})
        return self._local.turn(_KEY, limit, rank=live.index(self.instance), processes=len(live))

    @contextlib.contextmanager
    def caller_waits(self) -> Iterator[None]:
        """In this thread, for the block: the client raises Throttled instead of waiting a penalty inline,
        because its caller waits (sync/throttle.py Patience), within a budget of its own."""
        before = getattr(self._callers, "on", False)
        self._callers.on = True
        try:
            yield
        finally:
            self._callers.on = before

    @property
    def caller_waiting(self) -> bool:
        return bool(getattr(self._callers, "on", False))

    @contextlib.contextmanager
    def in_turn(self, rows: int = 0) -> Iterator[None]:
        """Around one request: those of callers that wait out penalties themselves (`caller_waits`: a
        backfill page, a drain; few and bulk) go one at a time, in this process (a lock) and over all
        instances (the user's lease in storage), so that a 429 one of them meets is noted, in the shared row
        too, before the next is sent. Sent side by side when the window's budget runs out, all but the
        first would be sent during the penalty and extend it. A lease, and the lock, are held at most
        `turn_wait`: a 429 is answered at once, so a request still running after that was let in, and a slow
        or stuck bulk write (seconds on the service) must not hold back the user's other work, another
        account's drain among it. A request waits for the lease while others hold it one after another, up
        to LEASE_WAIT_SECONDS. Per-contact requests are not held."""
        if not self.caller_waiting:
            yield
            return
        mine = self._in_turn.acquire(timeout=self.turn_wait)
        try:
            lease = self._take_lease(time.monotonic() + LEASE_WAIT_SECONDS)
            answer = self._callers.answer = Answer(rows)
            try:
                yield
            finally:
                self._callers.answer = None
                if lease is not None or answer.at:  # sent without the lease too: its rows count all the same
                    self._give_back(lease or Lease(False, 0.0), answer)
        finally:
            if mine:
                self._in_turn.release()

    def _take_lease(self, deadline: float) -> Lease | None:
        """The user's lease, waiting for another instance's request until `deadline` (monotonic); None
        without a store, when storage fails, after the deadline, or when the row shows a penalty (noted
        here, so the request is not sent)."""
        if self.store is None:
            return None
        token = uuid.uuid4().hex
        while True:
            now = self._clock()
            try:
                got = self.store.take_lease(self.key, token, now, now + self.turn_wait, self.window)
            except (AzureError, ConcurrencyError) as exc:
                log.warning("Dataverse budget %s: could not take the lease (%s); sending in this instance's turn",
                            self.key, type(exc).__name__)
                return None
            held = max(got.penalty_until, got.paced_until) - now
            if held > 0:  # a penalty, or the window's known budget spent: held back as a penalty would
                self._local.note(_KEY, held)
                return None
            if got.taken:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(LEASE_POLL_SECONDS, left))

    def _give_back(self, lease: Lease, answer: Answer) -> None:
        store = self.store
        if store is not None:
            self._write("lease", lambda: store.give_back(self.key, lease, answer, self.window))

    def answered(self) -> None:
        """The request in this thread's lease was answered, not with a 429: its rows go into the log."""
        answer: Answer | None = getattr(self._callers, "answer", None)
        if answer is not None:
            answer.at = self._clock()

    def note(self, retry_after: float, *, execution_time: bool = False) -> None:
        """A 429's Retry-After: held back here at once, and shared when it ends later than the known one
        (inside a lease, by the write that gives it back, which learns the cap from an `execution_time`
        one: only that limit is what the window's rows measure; a 429 of the request count or of
        concurrency, or one scripted by a test, teaches nothing about them)."""
        self._local.note(_KEY, retry_after)
        now = self._clock()
        until = now + retry_after
        answer: Answer | None = getattr(self._callers, "answer", None)
        if answer is not None:
            answer.at, answer.penalty_until, answer.execution_time = now, until, execution_time
        with self._cond:
            if until <= self._shared.penalty_until:
                return
            self._shared = Shared(until, self._shared.dop_hint, self._shared.instances)
        if answer is None and self.store is not None:
            store = self.store
            self._write("penalty", lambda: store.note_penalty(self.key, until))

    # -- concurrency ----------------------------------------------------------------------------

    def note_dop_hint(self, hint: int) -> None:
        self.dop_hint = hint
        with self._cond:
            if self._shared.dop_hint == hint:
                return
            self._shared = Shared(self._shared.penalty_until, hint, self._shared.instances)
            self._cond.notify_all()
        if self.store is not None:
            store = self.store
            self._write("DOP hint", lambda: store.note_dop_hint(self.key, hint))

    @property
    def cap(self) -> int:
        return concurrency_cap(self._shared.dop_hint or self.dop_hint, self.limit)

    @property
    def share(self) -> int:
        """Requests this instance may have in flight to the user now."""
        return instance_share(self.cap, self._shared.instances, self.instance)

    @contextlib.contextmanager
    def slot(self, wait: float) -> Iterator[None]:
        """Hold one of this instance's request slots while a request is in flight; raises NoSlot when none
        frees within `wait` seconds (at once when this instance has no share)."""
        self._refresh()
        deadline = time.monotonic() + wait
        with self._cond:
            while self.in_flight >= self.share:
                left = deadline - time.monotonic()
                if self.share == 0:
                    raise NoSlot(0, NO_SHARE_RETRY_SECONDS)
                self.waiting += 1
                try:
                    if left <= 0 or not self._cond.wait(left):
                        raise NoSlot(self.share, 1.0)
                finally:
                    self.waiting -= 1
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify()


class Budgets:
    """One Budget per Dataverse user in this process, over one store."""

    def __init__(self, store: BudgetStore | None, window: float = WINDOW_SECONDS) -> None:
        self.store, self.window = store, window
        self._budgets: dict[str, Budget] = {}
        self._lock = threading.Lock()

    def __call__(self, instance_url: str, user: str) -> Budget:
        key = budget_key(instance_url, user)
        with self._lock:
            found = self._budgets.get(key)
            if found is None:
                found = self._budgets[key] = Budget(key, self.store, window=self.window)
            return found
