"""One Dataverse budget per user across instances (dataverse/budget.py), through the transport's seam.

Each "instance" is a Transport with its own Budget (its own instance id, as separate processes have) over
one shared store: an in-memory one, and the Table store on Azurite. Fake sessions answer, a fake clock
moves time; concurrency is real threads held inside the fake session until the test lets them go."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from core.storage import Tables
from dataverse.budget import (
    Budget,
    BudgetStore,
    Shared,
    TableBudgetStore,
    Turn,
    budget_key,
    concurrency_cap,
    instance_share,
)
from dataverse.errors import Busy, Throttled
from dataverse.lease import (
    Answer,
    Lease,
    given_back,
    learned_cap,
    paced_until,
    taken_lease,
)
from dataverse.transport import Transport
from sync.throttle import Patience
from tests.fixtures.fake_time import FakeTime

URL = "https://org.crm.dynamics.com"


# -- pure rules -------------------------------------------------------------------------------------

def test_shares_add_up_to_the_cap_and_instances_beyond_it_get_none() -> None:
    names = ["c", "a", "b"]
    assert [instance_share(8, names, me) for me in ("a", "b", "c")] == [3, 3, 2]
    assert [instance_share(2, names, me) for me in ("a", "b", "c")] == [1, 1, 0]
    assert instance_share(52, [], "a") == 52  # alone: the whole cap
    assert instance_share(52, ["a"], "z") == 26  # an instance counts itself before storage lists it
    for n in range(1, 60):
        ids = [f"i{k:02d}" for k in range(n)]
        assert sum(instance_share(8, ids, me) for me in ids) == 8


def test_the_cap_is_the_dop_hint_when_lower_than_the_concurrency_limit() -> None:
    assert concurrency_cap(None) == 52 and concurrency_cap(8) == 8 and concurrency_cap(500) == 52
    assert concurrency_cap(0) == 52  # no usable hint


def test_the_key_names_the_host_and_the_user_and_is_a_valid_table_key() -> None:
    key = budget_key("https://Org.crm4.dynamics.com/", "5f1c/#?\\x")
    assert key.startswith("org.crm4.dynamics.com~") and not any(c in key for c in "/\\#?")
    assert budget_key(URL, "u1") != budget_key(URL, "u2") != budget_key("https://other.crm.dynamics.com", "u1")


# -- the transport seam over a shared store ---------------------------------------------------------

class MemoryStore:
    """A BudgetStore in memory, shared by the test's 'instances' as the Table is by processes."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.hints: dict[str, int] = {}
        self.seen: dict[tuple[str, str], float] = {}
        self.next_turn: dict[str, float] = {}
        self.rows: dict[str, dict[str, object]] = {}  # the lease's and the log's fields of the budget row

    def read(self, key: str, live_since: float) -> Shared:
        return Shared(self.until.get(key, 0.0), self.hints.get(key),
                      tuple(sorted(i for (k, i), at in self.seen.items() if k == key and at >= live_since)))

    def note_penalty(self, key: str, until: float) -> None:
        self.until[key] = max(until, self.until.get(key, 0.0))

    def note_dop_hint(self, key: str, hint: int) -> None:
        self.hints[key] = hint

    def heartbeat(self, key: str, instance: str, now: float) -> None:
        self.seen[(key, instance)] = now

    def claim_turn(self, key: str, not_before: float, stagger: float, latest: float | None) -> Turn:
        until = self.until.get(key, 0.0)
        at = max(not_before, until, self.next_turn.get(key, 0.0))
        taken = latest is None or at <= latest
        if taken:
            self.next_turn[key] = at + stagger
        return Turn(at, taken, until)

    def _row(self, key: str) -> dict[str, object]:
        return {**self.rows.get(key, {}), "penalty_until": self.until.get(key, 0.0)}

    def take_lease(self, key: str, token: str, now: float, until: float, window: float) -> Lease:
        lease, new = taken_lease(self._row(key), token, now, until, window)
        if new is not None:
            self.rows[key] = new
        return lease

    def give_back(self, key: str, lease: Lease, answer: Answer, window: float) -> None:
        new = given_back(self._row(key), lease, answer, window)
        if new is not None:
            self.rows[key] = new
            self.note_penalty(key, float(new["penalty_until"]))  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "azurite"])
def store(request: pytest.FixtureRequest) -> BudgetStore:
    if request.param == "memory":
        return MemoryStore()
    tables: Tables = request.getfixturevalue("tables")
    return TableBudgetStore(tables("dataversebudget"))



EXECUTION_TIME = b'{"error": {"code": "0x80072321", "message": "Combined execution time ... exceeded limit"}}'


def response(status: int, headers: Mapping[str, str] | None = None, body: bytes = b"{}") -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers = CaseInsensitiveDict(headers or {})
    resp._content = body
    return resp


@dataclass
class Session:
    """Answers 200 (or what `script` says first); with `gate`, holds each request until the gate opens,
    counting the requests in flight over every session sharing `flight`."""

    flight: Flight | None = None
    script: list[requests.Response] = field(default_factory=list)
    sent: int = 0

    def request(self, method: str, url: str, *, data: bytes | None, headers: Mapping[str, str],
                timeout: tuple[float, float], verify: str | bool, allow_redirects: bool) -> requests.Response:
        self.sent += 1
        if self.flight is not None:
            self.flight.enter(self)
        answer = self.script.pop(0) if self.script else response(200)
        if self.flight is not None:
            self.flight.leave(self)
        return answer

    def close(self) -> None:
        pass


class Flight:
    """Requests in flight across sessions: the most at once overall and per session."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.open = False
        self.now: dict[int, int] = {}
        self.most = 0
        self.most_per: dict[int, int] = {}

    def enter(self, session: Session) -> None:
        with self.cond:
            self.now[id(session)] = self.now.get(id(session), 0) + 1
            self.most = max(self.most, sum(self.now.values()))
            self.most_per[id(session)] = max(self.most_per.get(id(session), 0), self.now[id(session)])
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.open, timeout=30)

    def leave(self, session: Session) -> None:
        with self.cond:
            self.now[id(session)] -= 1

    def wait_in_flight(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: sum(self.now.values()) >= count, timeout=30)

    def release(self) -> None:
        with self.cond:
            self.open = True
            self.cond.notify_all()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll a condition other threads make true (threads blocked on a Condition cannot signal the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@dataclass
class Instance:
    transport: Transport
    session: Session
    budget: Budget


def instance(store: BudgetStore, key: str, clock: FakeTime, flight: Flight | None = None,
             **kwargs: object) -> Instance:
    """One app instance's client of the user: its own process id, budget and session."""
    budget = Budget(key, store, instance=uuid.uuid4().hex, clock=clock)
    session = Session(flight)
    t = Transport(URL, lambda force_refresh=False: "token", session=session, sleep=clock.sleep, clock=clock,
                  budget=budget, **kwargs)  # type: ignore[arg-type]
    return Instance(t, session, budget)


@pytest.fixture
def key() -> str:
    return budget_key(URL, uuid.uuid4().hex)  # a user of its own per test (Azurite is the session's)


def test_a_429_seen_by_one_instance_holds_back_another_without_a_request(store: BudgetStore, key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    assert b.transport.request("GET", "WhoAmI").status_code == 200  # b has read the (empty) budget
    a.session.script = [response(429, {"Retry-After": "30"})]
    with pytest.raises(Throttled):
        a.transport.request("GET", "contacts")
    clock.now += 1.5  # b's view of the budget is older than its refresh interval: it reads storage
    with pytest.raises(Throttled) as held:
        b.transport.request("GET", "contacts")
    # nothing sent into the penalty; back after its rest (plus b's place among the instances' waiters)
    assert held.value.retry_after == pytest.approx(28.5, abs=0.3) and b.session.sent == 1
    assert b.budget.remaining() == pytest.approx(28.5)
    clock.now += 28.5
    assert b.transport.request("GET", "contacts").status_code == 200 and b.session.sent == 2


def test_a_shorter_penalty_never_shortens_the_shared_one(store: BudgetStore, key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    a.budget.note(20)
    b.budget.note(5)  # b had not heard of a's penalty yet, and meets a shorter one
    assert store.read(key, 0).penalty_until == clock.now + 20
    c = instance(store, key, clock)
    assert c.budget.remaining() == pytest.approx(20)


def test_an_instance_reads_storage_at_most_once_per_refresh_interval(key: str) -> None:
    clock, reads = FakeTime(1_800_000_000.0), []
    store = MemoryStore()
    original = store.read
    store.read = lambda k, since: reads.append(clock.now) or original(k, since)  # type: ignore[method-assign]
    a = instance(store, key, clock)
    for _ in range(50):
        a.transport.request("GET", "contacts")
    clock.now += 1.0
    for _ in range(50):
        a.transport.request("GET", "contacts")
    assert len(reads) == 2 and a.session.sent == 100


def test_a_waiter_reads_storage_again_before_sending_after_a_penalty(store: BudgetStore, key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock, max_inline_wait=2.0)
    a.budget.note(1.5)
    clock.now += 1.0  # b's refresh interval has passed: it reads the penalty's last 0.5 s ...
    assert b.budget.remaining() == pytest.approx(0.5)
    a.budget.note(11.0)  # ... and a meets a new one: b learns of it before sending
    with pytest.raises(Throttled):
        b.transport.request("GET", "contacts")
    assert clock.slept == []  # taking its turn read the row: the new penalty is too long to wait inline
    assert b.session.sent == 0 and b.budget.remaining() == pytest.approx(11.0)


def test_a_waiter_learns_of_a_penalty_met_while_it_slept(key: str) -> None:
    clock, store = FakeTime(1_800_000_000.0), MemoryStore()
    a, b = instance(store, key, clock), instance(store, key, clock, max_inline_wait=2.0)
    a.budget.note(1.5)
    clock.now += 1.0
    sleep = b.transport._sleep

    def meanwhile(seconds: float) -> None:  # while b waits out the last 0.5 s, a meets a new penalty
        sleep(seconds)
        if len(clock.slept) == 1:
            a.budget.note(11.0)

    b.transport._sleep = meanwhile  # type: ignore[method-assign]
    with pytest.raises(Throttled):
        b.transport.request("GET", "contacts")
    assert clock.slept == [0.5] and b.session.sent == 0 and b.budget.remaining() == pytest.approx(11.0)


def test_prepared_work_reads_storage_before_each_request(store: BudgetStore, key: str) -> None:
    """Per-contact requests see another instance's penalty within the refresh interval; a backfill page's few
    bulk requests (sync/throttle.py Patience) read the row as they take the lease, so they are not sent
    into a penalty met a moment ago."""
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    assert b.transport.request("GET", "WhoAmI").status_code == 200  # b's view is fresh for a second
    a.budget.note(30.0)
    assert b.budget.remaining() == 0  # the cached view, as the hot path reads it
    patience = Patience(b.budget, longest=3.0, budget=6.0, sleep=clock.sleep)
    with pytest.raises(Throttled) as held:
        patience.call(lambda: b.transport.request("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple"))
    assert held.value.retry_after == pytest.approx(30.0, abs=0.3) and b.session.sent == 1 and clock.slept == []


def test_requests_in_flight_stay_within_the_dop_hint_across_instances(store: BudgetStore, key: str) -> None:
    clock, flight = FakeTime(1_800_000_000.0), Flight()
    instances = [instance(store, key, clock, flight, max_inline_wait=30.0) for _ in range(3)]
    for i in instances:
        i.budget.remaining()  # each says it is there
    instances[0].budget.note_dop_hint(6)
    clock.now += 1.5
    for i in instances:
        i.budget.remaining()
    assert sorted(i.budget.share for i in instances) == [2, 2, 2] and {i.budget.cap for i in instances} == {6}

    errors: list[BaseException] = []

    def send(i: Instance) -> None:
        try:
            i.transport.request("GET", "contacts")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in instances for _ in range(6)]
    for th in threads:
        th.start()
    assert flight.wait_in_flight(6)
    assert wait_until(lambda: sum(i.budget.waiting for i in instances) == 12)
    assert sum(flight.now.values()) == 6
    flight.release()
    for th in threads:
        th.join(30)
    assert errors == [] and sum(i.session.sent for i in instances) == 18
    assert flight.most == 6 and sorted(flight.most_per.values()) == [2, 2, 2]


def test_an_instance_beyond_the_cap_sends_nothing_and_a_dead_ones_share_returns(store: BudgetStore,
                                                                                 key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    instances = [instance(store, key, clock) for _ in range(3)]
    for i in instances:
        i.budget.note_dop_hint(2)
        i.budget.remaining()
    clock.now += 1.5
    for i in instances:
        i.budget.remaining()
    idle = next(i for i in instances if i.budget.share == 0)
    with pytest.raises(Busy) as busy:
        idle.transport.request("GET", "contacts")
    assert idle.session.sent == 0 and busy.value.retry_after > 0
    # the other two stop (killed): after the instance TTL without a heartbeat their shares are free
    clock.now += idle.budget.instance_ttl + 1
    assert idle.transport.request("GET", "contacts").status_code == 200 and idle.budget.share == 2


def test_a_storage_failure_leaves_the_instance_on_what_it_knows(key: str) -> None:
    from azure.core.exceptions import ServiceRequestError

    class Down(MemoryStore):
        def read(self, key: str, live_since: float) -> Shared:
            raise ServiceRequestError("storage unreachable")

        def note_penalty(self, key: str, until: float) -> None:
            raise ServiceRequestError("storage unreachable")

    clock = FakeTime(1_800_000_000.0)
    a = instance(Down(), key, clock)
    assert a.transport.request("GET", "contacts").status_code == 200
    a.session.script = [response(429, {"Retry-After": "30"})]
    with pytest.raises(Throttled):
        a.transport.request("GET", "contacts")
    with pytest.raises(Throttled):  # held back by the penalty it saw itself
        a.transport.request("GET", "contacts")
    assert a.session.sent == 2


@pytest.fixture
def table_store(tables: Tables) -> Iterator[TableBudgetStore]:
    yield TableBudgetStore(tables("dataversebudget"))


def test_the_table_rows_one_penalty_row_and_one_row_per_live_instance(table_store: TableBudgetStore,
                                                                      key: str) -> None:
    table_store.note_penalty(key, 1000.0)
    table_store.note_penalty(key, 900.0)  # ends earlier: left as it is
    table_store.note_dop_hint(key, 8)
    table_store.heartbeat(key, "old", 100.0)
    table_store.heartbeat(key, "new", 990.0)
    assert table_store.read(key, live_since=500.0) == Shared(1000.0, 8, ("new",))
    table_store.note_penalty(key, 1100.0)
    assert table_store.read(key, live_since=0.0) == Shared(1100.0, 8, ("new", "old"))


def test_before_its_first_read_no_thread_sends_on_an_empty_view(key: str) -> None:
    """Many messages arrive at a fresh instance at once: all wait for the one storage read, none sends on
    the empty view meanwhile (the end-to-end test in tests/test_shared_budget.py found this)."""
    clock, reading, go = FakeTime(1_800_000_000.0), threading.Event(), threading.Event()
    store = MemoryStore()
    store.note_penalty(key, clock.now + 30)  # another instance's penalty

    class SlowStore(MemoryStore):
        def read(self, key: str, live_since: float) -> Shared:
            reading.set()
            assert go.wait(30)
            return store.read(key, live_since)

    fresh = instance(SlowStore(), key, clock)
    seen: list[float] = []
    first = threading.Thread(target=lambda: seen.append(fresh.budget.remaining()))
    first.start()
    assert reading.wait(30)
    second = threading.Thread(target=lambda: seen.append(fresh.budget.remaining()))
    second.start()
    assert wait_until(lambda: fresh.budget._cond._waiters)  # type: ignore[attr-defined]  # blocked on the read
    go.set()
    first.join(30)
    second.join(30)
    assert seen == [30.0, 30.0]


def test_inside_a_caller_that_waits_itself_the_client_raises_instead_of_waiting_inline(key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    a = instance(MemoryStore(), key, clock, max_inline_wait=2.0)
    a.session.script = [response(429, {"Retry-After": "1"})]
    with a.budget.caller_waits(), pytest.raises(Throttled) as err:
        a.transport.request("GET", "contacts")
    assert err.value.retry_after == 1 and clock.slept == [] and a.session.sent == 1
    with a.budget.caller_waits(), pytest.raises(Throttled):  # held back during the penalty, not waited
        a.transport.request("GET", "contacts")
    assert clock.slept == [] and a.session.sent == 1
    assert a.transport.request("GET", "contacts").status_code == 200  # outside: the short rest is waited
    assert clock.slept == [1.0] and a.session.sent == 2


def test_requests_of_callers_that_wait_themselves_go_one_at_a_time(key: str) -> None:
    """Two pages of one instance: the second waits for the first's answer, a 429, and is not sent into the
    penalty (side by side it would have been, and extended it)."""
    clock, flight = FakeTime(1_800_000_000.0), Flight()
    a = instance(MemoryStore(), key, clock, flight)
    a.budget.turn_wait = 30.0
    a.session.script = [response(429, {"Retry-After": "9"})]
    outcomes: list[str] = []

    def page() -> None:
        with a.budget.caller_waits():
            try:
                a.transport.request("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple")
                outcomes.append("sent")
            except Throttled:
                outcomes.append("throttled")

    threads = [threading.Thread(target=page) for _ in range(2)]
    threads[0].start()
    assert flight.wait_in_flight(1)
    threads[1].start()
    assert wait_until(lambda: a.budget.in_flight == 2)  # the second holds a slot, waiting for its turn
    flight.release()
    for t in threads:
        t.join(30)
    assert outcomes == ["throttled", "throttled"] and a.session.sent == 1


def test_a_request_that_hangs_holds_back_the_next_one_only_briefly(key: str) -> None:
    """A stuck bulk write (held inside Dataverse) must not hold back the user's other prepared work, such as
    another account's drain: the next request goes after `turn_wait` with the first still in flight."""
    clock, flight = FakeTime(1_800_000_000.0), Flight()
    a = instance(MemoryStore(), key, clock, flight)
    a.budget.turn_wait = 0.05
    threads = [threading.Thread(target=lambda: page(a)) for _ in range(2)]
    threads[0].start()
    assert flight.wait_in_flight(1)
    threads[1].start()
    clock.now += a.budget.turn_wait  # the first one's lease has ended
    assert flight.wait_in_flight(2)  # both in flight at once
    flight.release()
    for t in threads:
        t.join(30)
    assert a.session.sent == 2


def page(a: Instance, rows: int = 0) -> None:
    with a.budget.caller_waits():
        a.transport.request("POST", "contacts/Microsoft.Dynamics.CRM.UpsertMultiple", rows=rows)


def test_after_a_penalty_the_instances_waiters_take_turns_in_one_sequence(store: BudgetStore, key: str) -> None:
    """Three instances' waiters go one stagger apart, as one instance's do: the service gives the window's
    budget back at the pace the old requests were sent, so three sequences side by side would go three
    times as fast and meet a second 429."""
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    a.budget.note(2.0)
    b.budget.remaining(fresh=True)  # reads a's penalty
    turns = [round(i.budget.turn(), 3) for i in (a, b, b, a, b)]
    assert turns == [2.0, 2.2, 2.4, 2.6, 2.8]
    clock.now += 1.0  # later callers queue behind the turns given out, not beside them
    assert round(a.budget.turn(), 3) == 2.0


def test_a_turn_beyond_the_callers_wait_takes_no_place(store: BudgetStore, key: str) -> None:
    """A page that may wait only 1 s goes back to its queue (sync/throttle.py Patience) and leaves its place
    to the next caller."""
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    a.budget.note(2.0)
    b.budget.remaining(fresh=True)
    assert round(a.budget.turn(1.0), 3) == 2.0  # more than its limit: not taken
    assert round(b.budget.turn(2.1), 3) == 2.0
    assert round(a.budget.turn(2.1), 3) == 2.2  # 2.2 > 2.1: not taken either
    assert round(b.budget.turn(), 3) == 2.2


def test_instances_claiming_turns_at_once_get_distinct_ones(store: BudgetStore, key: str) -> None:
    clock = FakeTime(1_800_000_000.0)
    instances = [instance(store, key, clock) for _ in range(3)]
    instances[0].budget.note(5.0)
    for i in instances:
        i.budget.remaining(fresh=True)
    turns: list[float] = []
    lock = threading.Lock()

    def claim(i: Instance) -> None:
        got = i.budget.turn()
        with lock:
            turns.append(round(got, 3))

    threads = [threading.Thread(target=claim, args=(i,)) for i in instances for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(turns) == [round(5.0 + 0.2 * n, 3) for n in range(9)]


def test_without_the_shared_schedule_instances_take_turns_a_fraction_of_a_stagger_apart(key: str) -> None:
    """Storage failing (or no store): each instance keeps its own places, offset by rank, so two instances'
    waiters still never go at the same instant."""
    from azure.core.exceptions import ServiceRequestError

    class NoTurns(MemoryStore):
        def claim_turn(self, key: str, not_before: float, stagger: float, latest: float | None) -> Turn:
            raise ServiceRequestError("storage unreachable")

    clock, store = FakeTime(1_800_000_000.0), NoTurns()
    a, b = instance(store, key, clock), instance(store, key, clock)
    for i in (a, b, a, b):
        i.budget.remaining(fresh=True)  # both have said they are there and read each other
    a.budget.note(2.0)
    b.budget.remaining(fresh=True)  # reads a's penalty
    first, second = sorted((a, b), key=lambda i: i.budget.instance)
    assert [round(first.budget.turn(), 3) for _ in range(3)] == [2.0, 2.2, 2.4]
    assert [round(second.budget.turn(), 3) for _ in range(2)] == [2.1, 2.3]  # never at the same instant


class Refusals:
    """A store that counts the leases it refused (a request of another instance waiting for its turn)."""

    def __init__(self, store: BudgetStore) -> None:
        self.store, self.refused = store, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def take_lease(self, key: str, token: str, now: float, until: float, window: float) -> Lease:
        got = self.store.take_lease(key, token, now, until, window)
        self.refused += not got.taken
        return got


def test_prepared_requests_of_two_instances_go_one_at_a_time(store: BudgetStore, key: str) -> None:
    """Two instances' pages when the window's budget runs out: the second waits for the first's answer, a
    429, and learns of it from the row before sending. With turns per instance both went out side by side,
    and a penalty reached the row up to 370 ms after its 429 (BENCHMARKS.md (a))."""
    clock, flight, shared = FakeTime(1_800_000_000.0), Flight(), Refusals(store)
    a, b = (instance(shared, key, clock, flight) for _ in range(2))  # type: ignore[arg-type]
    b.budget.turn_wait = 30.0
    a.session.script = [response(429, {"Retry-After": "9"})]
    outcomes: list[str] = []

    def send(i: Instance) -> None:
        try:
            page(i)
            outcomes.append("sent")
        except Throttled:
            outcomes.append("throttled")

    first = threading.Thread(target=send, args=(a,))
    first.start()
    assert flight.wait_in_flight(1)
    second = threading.Thread(target=send, args=(b,))
    second.start()
    assert wait_until(lambda: shared.refused >= 2)  # b has asked for the lease and been told to wait
    flight.release()
    for t in (first, second):
        t.join(30)
    assert outcomes == ["throttled", "throttled"] and (a.session.sent, b.session.sent) == (1, 0)
    assert b.budget.remaining() == pytest.approx(9.0)
    assert store.read(key, 0).penalty_until == pytest.approx(clock.now + 9.0)  # written as the lease ended


def test_another_instances_hung_request_holds_back_the_next_only_until_its_lease_ends(store: BudgetStore,
                                                                                     key: str) -> None:
    clock, flight, shared = FakeTime(1_800_000_000.0), Flight(), Refusals(store)
    a, b = (instance(shared, key, clock, flight) for _ in range(2))  # type: ignore[arg-type]
    b.budget.turn_wait = 30.0
    first = threading.Thread(target=page, args=(a,))
    first.start()
    assert flight.wait_in_flight(1)
    second = threading.Thread(target=page, args=(b,))
    second.start()
    assert wait_until(lambda: shared.refused >= 1)
    clock.now += a.budget.turn_wait  # a's lease has ended: its request was let in, and is slow
    assert flight.wait_in_flight(2)
    flight.release()
    for t in (first, second):
        t.join(30)
    assert (a.session.sent, b.session.sent) == (1, 1)


def test_the_lease_row_gives_back_with_the_penalty_in_one_write(table_store: TableBudgetStore, key: str) -> None:
    mine = table_store.take_lease(key, "t1", now=100.0, until=100.5, window=10)
    assert mine.taken and mine.etag
    other = table_store.take_lease(key, "t2", now=100.1, until=100.6, window=10)
    assert not other.taken and other.until == 100.5
    table_store.give_back(key, mine, Answer(penalty_until=109.0), window=10)
    assert table_store.read(key, 0).penalty_until == 109.0
    assert not table_store.take_lease(key, "t2", now=100.2, until=100.7, window=10).taken  # a penalty runs
    later = table_store.take_lease(key, "t2", now=109.0, until=109.5, window=10)
    assert later.taken and later.penalty_until == 109.0
    table_store.note_penalty(key, 120.0)  # another instance writes the row meanwhile: read and write again
    table_store.give_back(key, later, Answer(), window=10)
    assert table_store.read(key, 0).penalty_until == 120.0
    assert table_store.take_lease(key, "t3", now=120.0, until=120.5, window=10).taken  # given back


# -- pacing bulk requests by the window's log ---------------------------------------------------------

def test_a_request_waits_while_the_window_holds_the_learned_cap_until_enough_has_aged_out() -> None:
    log = [[100.0, 500], [101.0, 500], [102.0, 500], [103.0, 500], [80.0, 500]]  # the last one has aged out
    assert paced_until(log, None, 104.0, 10.0) == 0  # nothing learned yet: the first 429 teaches it
    assert paced_until(log, 2500, 104.0, 10.0) == 0  # 2,000 rows in the window, under the cap
    assert paced_until(log, 2000, 104.0, 10.0) == 110.0  # at the cap: until the oldest leaves the window
    assert paced_until(log, 1200, 104.0, 10.0) == 111.0  # over it: until enough have left
    assert paced_until(log, 2000, 110.5, 10.0) == 0
    assert learned_cap(log, 104.0, 10.0) == 2000 and learned_cap(log, 200.0, 10.0) is None


def test_the_row_logs_answered_bulk_requests_and_learns_the_cap_from_a_429() -> None:
    row: dict[str, object] = {}
    for at in (100.0, 101.0, 102.0):
        lease, taken = taken_lease(row, "t", at, at + 0.5, 10.0)
        assert lease.taken and taken is not None
        row = given_back(taken, lease, Answer(rows=500, at=at), 10.0) or {}
    lease, taken = taken_lease(row, "t", 102.5, 103.0, 10.0)
    assert taken is not None
    assert "cap" not in (given_back(taken, lease, Answer(rows=500, at=102.6, penalty_until=105.0), 10.0) or {})
    row = given_back(taken, lease, Answer(rows=500, at=102.6, penalty_until=105.0, execution_time=True),
                     10.0) or {}
    assert row["cap"] == 1500 and row["penalty_until"] == 105.0 and row["lease"] == ""
    assert not taken_lease(row, "u", 104.0, 104.5, 10.0)[0].taken  # the penalty runs
    late = taken_lease(row, "u", 105.5, 106.0, 10.0)[0]
    assert not late.taken and late.paced_until == 110.0  # 1,500 rows still in the window: the cap
    assert taken_lease(row, "u", 110.0, 110.5, 10.0)[0].taken


def test_after_a_429_teaches_the_cap_no_instance_sends_into_a_spent_window(store: BudgetStore, key: str) -> None:
    """The service gives a window's budget back as its requests age out, at the pace they were sent: pages
    sent faster than that after a penalty met a second 429 in the window, and the split carried into
    every later window (BENCHMARKS.md (a)). Once a 429 has shown the cap, every instance waits for the
    window's log instead."""
    clock = FakeTime(1_800_000_000.0)
    a, b = instance(store, key, clock), instance(store, key, clock)
    for i in (a, b):
        i.budget.window = 10.0
    start = clock.now
    for _ in range(3):
        page(a, rows=500)
        clock.now += 1.0
    a.session.script = [response(429, {"Retry-After": "7"}, EXECUTION_TIME)]
    with pytest.raises(Throttled):
        page(a, rows=500)
    clock.now = start + 10.5  # the penalty is over; the first write (at +0) has left the window
    page(b, rows=500)
    assert b.session.sent == 1
    with pytest.raises(Throttled) as held:  # 1,500 rows in the window again: until the one at +1 leaves it
        page(b, rows=500)
    assert b.session.sent == 1 and held.value.retry_after == pytest.approx(0.5, abs=0.25)
    clock.now = start + 11.0
    page(b, rows=500)
    assert b.session.sent == 2 and a.session.sent == 4
