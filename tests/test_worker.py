"""The contact and page workers at unit level: real Azurite tables and a real DataverseClient against the
Dataverse simulator, with the queue replaced by a recorder so re-enqueued messages can be inspected.
(The end-to-end paths through the dev host are in test_sync_e2e.py and test_backfill*.py.)"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from core.connections import CONNECTED, Connection, ConnectionStore
from core.failures import FailureStore
from core.storage import BACKFILL_PAGES, CONTACT_EVENTS
from dataverse.client import DataverseClient
from devstack.dataverse_sim import Fault
from sync import backfill, worker
from sync.context import SyncContext
from sync.holds import TABLE as HOLDS
from sync.holds import HoldStore, hold_partition, org_key
from sync.mapping import contact_id
from sync.messages import ContactMessage, PageMessage
from sync.owners import TABLE as OWNERS
from sync.owners import OwnerCache
from sync.rules import MAX_TRANSIENT_ATTEMPTS
from sync.state import SNAPSHOTS, STATE, ContactStateStore, SnapshotStore
from sync.wave_api import Page


@dataclass
class RecordingQueues:
    sent: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)

    def send(self, queue_name: str, message: dict[str, Any], *, delay_seconds: int = 0) -> None:
        self.sent.append((queue_name, message, delay_seconds))


@dataclass
class StubWave:
    pages: dict[str | None, Page]
    calls: int = 0

    def contacts_page(self, account_id: str, cursor: str | None, limit: int = 500) -> Page:
        self.calls += 1
        return self.pages[cursor]


@pytest.fixture
def ctx(tables, dataverse_client) -> SyncContext:
    account = f"acct_w_{uuid.uuid4().hex[:10]}"
    connections = ConnectionStore(tables("connections"))
    connections.save(Connection(account_id=account, state=CONNECTED, generation="gen1",
                                instance_url="https://org.crm.dynamics.com"))
    c = SyncContext(connections=connections, failures=FailureStore(tables("failures")),
                    snapshots=SnapshotStore(tables(SNAPSHOTS)), states=ContactStateStore(tables(STATE)),
                    owners=OwnerCache(tables(OWNERS)), queues=RecordingQueues(),  # type: ignore[arg-type]
                    holds=HoldStore(tables(HOLDS)), dataverse=lambda conn: dataverse_client)
    c.account = account  # type: ignore[attr-defined]
    return c


def _put(ctx, cid: str, version: int, deleted: bool = False, **fields) -> ContactMessage:
    contact = {"id": cid, "version": version, "first_name": None, "last_name": None, "email": None, "phone": None,
               "company": None, "job_title": None, "website": None, "note": None, "updated_at": None,
               "assigned_team_member": None, **fields}
    ctx.snapshots.put_if_newer(ctx.account, contact, deleted=deleted, event_id=f"evt_{uuid.uuid4().hex}")
    return ContactMessage(ctx.account, cid, version, "gen1")


def _rows(sim, cid: str) -> list[dict]:
    return sim.contacts_by_external_id(f"wavecnct_{cid}")


def test_old_generation_and_disconnected_accounts_are_dropped_without_calls(ctx, dataverse_sim):
    msg = _put(ctx, "c_gen", 1, first_name="A")
    stale = ContactMessage(ctx.account, "c_gen", 1, "gen0")
    assert worker.process(ctx, stale) == "dropped:not_connected"
    ctx.connections.update(ctx.account, lambda c: setattr(c, "state", "disconnected"))
    assert worker.process(ctx, msg) == "dropped:not_connected"
    assert dataverse_sim.request_log() == []


def test_unchanged_content_skips_the_request_and_stale_versions_do_nothing(ctx, dataverse_sim):
    assert worker.process(ctx, _put(ctx, "c_same", 1, first_name="A")) == "synced"
    writes = len(dataverse_sim.request_log())
    assert worker.process(ctx, _put(ctx, "c_same", 2, first_name="A", updated_at="later")) == "unchanged"
    assert len(dataverse_sim.request_log()) == writes  # only updated_at changed: not a mapped field
    assert worker.process(ctx, ContactMessage(ctx.account, "c_same", 1, "gen1")) == "stale"
    assert ctx.states.get(ctx.account, "c_same").version == 2


def test_throttling_reschedules_after_retry_after_and_holds_back_the_connection(ctx, dataverse_sim):
    dataverse_sim.configure(requests=1, window_seconds=30.0)
    try:
        msg = _put(ctx, "c_t1", 1, first_name="B")
        assert worker.process(ctx, msg) == "rescheduled:throttled"  # the lookup passes, the write gets 429
        assert any(r["status"] == 429 for r in dataverse_sim.request_log())
        queue, body, delay = ctx.queues.sent[-1]
        assert queue == CONTACT_EVENTS and body == msg.to_dict() and delay >= 25  # same message, attempt kept
        seen = len(dataverse_sim.request_log())
        other = _put(ctx, "c_t2", 1, first_name="C")
        assert worker.process(ctx, other) == "rescheduled:throttled"
        assert len(dataverse_sim.request_log()) == seen  # held back without calling Dataverse
    finally:
        dataverse_sim.protection.reset()


def test_transient_errors_back_off_then_are_recorded(ctx, dataverse_sim):
    msg = _put(ctx, "c_tr", 1, first_name="A")
    dataverse_sim.set_fault_rates([(Fault("status", status=503), 1.0)])
    try:
        assert worker.process(ctx, msg) == "rescheduled:transient"
        _, body, delay = ctx.queues.sent[-1]
        assert body["attempt"] == 1 and delay == 2
        late = ContactMessage(ctx.account, "c_tr", 1, "gen1", attempt=MAX_TRANSIENT_ATTEMPTS - 1)
        assert worker.process(ctx, late) == "failed:transient"
    finally:
        dataverse_sim.clear_faults()
    [failure] = list(ctx.failures.all(ctx.account))
    assert failure.category == "transient" and "503" in failure.reason
    assert worker.process(ctx, msg) == "synced"  # a later success clears the record
    assert list(ctx.failures.all(ctx.account)) == []


class NewerWriteFirst:
    """The Dataverse client, except that just before worker A's first contact write, worker B applies
    version 2 of the contact in full (then `meanwhile` runs), so that A's older write lands last."""

    def __init__(self, ctx, client, cid: str, meanwhile=lambda: None) -> None:
        self.ctx, self.client, self.cid, self.meanwhile = ctx, client, cid, meanwhile
        self.fired = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def upsert_contact(self, *args, **kwargs):
        if not self.fired:
            self.fired = True
            ctx = self.ctx
            _put(ctx, self.cid, 2, first_name="v2")
            b_ctx = dataclasses.replace(ctx, dataverse=lambda conn: self.client)
            assert worker.process(b_ctx, ContactMessage(ctx.account, self.cid, 2, "gen1")) == "synced"
            self.meanwhile()
        return self.client.upsert_contact(*args, **kwargs)


def test_a_concurrent_newer_write_is_reapplied_after_a_state_conflict(ctx, dataverse_sim, dataverse_client):
    """Worker A holds v1 and is about to write when worker B applies v2 in full; A's older write lands
    last in Dataverse, its state write conflicts, and A re-applies the newest snapshot."""
    first = _put(ctx, "c_race", 1, first_name="v1")
    interleaving = NewerWriteFirst(ctx, dataverse_client, "c_race")
    ctx.dataverse = lambda conn: interleaving
    assert worker.process(ctx, first) == "synced"
    [row] = _rows(dataverse_sim, "c_race")
    assert row["firstname"] == "v2"
    assert ctx.states.get(ctx.account, "c_race").version == 2


def test_a_repair_that_meets_a_throttle_comes_back_forced(ctx, dataverse_sim, dataverse_client, sim_tokens):
    """As above, but Dataverse throttles the connection's user before A can re-apply v2: the message A puts
    back must still force the re-apply, or it would find v2 recorded and leave A's v1 in Dynamics."""

    class ThrottledAfterTheWrite(NewerWriteFirst):
        def upsert_contact(self, *args, **kwargs):
            written = super().upsert_contact(*args, **kwargs)
            self.client.budget.note(30)  # another message of the user is throttled meanwhile
            return written

    first = _put(ctx, "c_race_t", 1, first_name="v1")
    ctx.dataverse = lambda conn: ThrottledAfterTheWrite(ctx, dataverse_client, "c_race_t")
    assert worker.process(ctx, first) == "rescheduled:throttled"
    assert _rows(dataverse_sim, "c_race_t")[0]["firstname"] == "v1"  # A's older write landed last
    queue, body, delay = ctx.queues.sent[-1]
    assert queue == CONTACT_EVENTS and body["force"] is True and delay >= 30

    later = DataverseClient(dataverse_sim.url, sim_tokens, timeout=(2.0, 10.0))  # the penalty is over
    ctx.dataverse = lambda conn: later
    try:
        assert worker.process(ctx, ContactMessage.parse(json.dumps(body).encode())) == "synced"
    finally:
        later.close()
    assert _rows(dataverse_sim, "c_race_t")[0]["firstname"] == "v2"


def test_delete_policies(ctx, dataverse_sim):
    for policy, cid in (("deactivate", "c_deact"), ("ignore", "c_ign"), ("delete", "c_del")):
        ctx.connections.update(ctx.account, lambda c, p=policy: setattr(c, "delete_policy", p))
        assert worker.process(ctx, _put(ctx, cid, 1, first_name="A")) == "synced"
        assert worker.process(ctx, _put(ctx, cid, 2, deleted=True)) == "deleted"
    assert _rows(dataverse_sim, "c_deact")[0]["statecode"] == 1
    assert _rows(dataverse_sim, "c_ign")[0]["statecode"] == 0
    assert _rows(dataverse_sim, "c_del") == []
    # deactivated, then re-created in Wave with a newer version: the row comes back active
    ctx.connections.update(ctx.account, lambda c: setattr(c, "delete_policy", "deactivate"))
    assert worker.process(ctx, _put(ctx, "c_deact", 3, first_name="Back")) == "synced"
    row = _rows(dataverse_sim, "c_deact")[0]
    assert (row["statecode"], row["firstname"]) == (0, "Back")


def test_owner_cache_negative_entries_save_lookups(ctx, dataverse_sim, dataverse_client):
    user = dataverse_sim.add_user("known@contoso.test")
    got = ctx.owners.resolve(dataverse_client, ctx.account, "gen1", ["Known@Contoso.test", "missing@contoso.test"])
    assert got == {"known@contoso.test": user["systemuserid"], "missing@contoso.test": None}
    seen = len(dataverse_sim.request_log())
    again = ctx.owners.resolve(dataverse_client, ctx.account, "gen1", ["known@contoso.test", "missing@contoso.test"])
    assert again == got and len(dataverse_sim.request_log()) == seen  # both answers cached
    ctx.owners.resolve(dataverse_client, ctx.account, "gen2", ["known@contoso.test"])
    assert len(dataverse_sim.request_log()) == seen + 1  # a new generation does not reuse the old answers


def test_backfill_never_overwrites_a_newer_live_version(ctx, dataverse_sim):
    assert worker.process(ctx, _put(ctx, "c_bf", 2, first_name="live v2")) == "synced"
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    old = {"id": "c_bf", "version": 1, "first_name": "backfill v1"}
    new = {"id": "c_new", "version": 1, "first_name": "fresh"}
    ctx.wave = StubWave({None: Page([old, new], None)})
    result, report = backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))
    assert result == "done" and (report.written, report.unchanged) == (1, 1)
    assert _rows(dataverse_sim, "c_bf")[0]["firstname"] == "live v2"
    assert _rows(dataverse_sim, "c_new")[0]["firstname"] == "fresh"
    conn = ctx.connections.get(ctx.account)
    assert (conn.backfill.state, conn.backfill.pages, conn.backfill.contacts) == ("done", 1, 2)
    # a superseded run or generation (or a finished one): nothing happens, not even a Wave read
    calls = ctx.wave.calls
    assert backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))[0] == "dropped:stale_run"
    assert backfill.run_page(ctx, PageMessage(ctx.account, "gen1", "old-run", None, 2))[0] == "dropped:stale_run"
    assert backfill.run_page(ctx, PageMessage(ctx.account, "gen0", run_id, None, 2))[0] == "dropped:stale_run"
    assert ctx.wave.calls == calls


def test_backfill_page_enqueues_the_next_cursor_and_a_rerun_writes_nothing(ctx, dataverse_sim):
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = StubWave({None: Page([{"id": "c_p1", "version": 1, "first_name": "P"}], "cur2")})
    first = PageMessage(ctx.account, "gen1", run_id, None, 1)
    assert backfill.run_page(ctx, first)[0] == "page"
    queue, body, _ = ctx.queues.sent[-1]
    assert queue == BACKFILL_PAGES
    assert body == {"account_id": ctx.account, "generation": "gen1", "run_id": run_id, "cursor": "cur2",
                    "page": 2, "attempt": 0}
    sent, writes = len(ctx.queues.sent), len(dataverse_sim.request_log())
    # A second delivery of the completed page: dropped (its successor is already queued) ...
    assert backfill.run_page(ctx, first, dequeue_count=1)[0] == "dropped:page_done"
    assert len(ctx.queues.sent) == sent
    # ... unless it is a redelivery after a crash (dequeue count 2): then it runs again, writes nothing
    # to Dataverse (every contact is applied) and queues the next page once more, so the run goes on.
    result, report = backfill.run_page(ctx, first, dequeue_count=2)
    assert result == "page" and report.written == 0 and report.unchanged == 1
    assert len(dataverse_sim.request_log()) == writes and ctx.queues.sent[-1][1]["page"] == 2
    assert ctx.connections.get(ctx.account).backfill.pages == 1


def test_a_row_dynamics_refuses_is_recorded_as_validation_with_its_reason(ctx, dataverse_sim, dataverse_client):
    """A row someone deactivated in Dynamics is read-only there: the update is refused (400), recorded
    with Dynamics' reason, and not retried by itself."""
    made = dataverse_client.upsert_contact("7d1c2a9e-0000-4000-8000-000000000001",
                                           {"externaluseridentifier": "wavecnct_c_inactive", "firstname": "Old"})
    dataverse_client.deactivate_contact(made.contactid)
    assert worker.process(ctx, _put(ctx, "c_inactive", 1, first_name="New")) == "failed:validation"
    [failure] = list(ctx.failures.all(ctx.account))
    assert failure.category == "validation" and "inactive" in failure.reason.lower()
    assert ctx.queues.sent == []  # not re-queued
    assert _rows(dataverse_sim, "c_inactive")[0]["firstname"] == "Old"


def test_backfill_records_the_records_dynamics_rejects_and_writes_the_rest(ctx, dataverse_sim, dataverse_client):
    made = dataverse_client.upsert_contact("7d1c2a9e-0000-4000-8000-000000000002",
                                           {"externaluseridentifier": "wavecnct_c_ro", "firstname": "Old"})
    dataverse_client.deactivate_contact(made.contactid)  # read-only in Dynamics: its update is refused
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    page = [{"id": f"c_ok{i}", "version": 1, "first_name": f"ok{i}"} for i in range(6)]
    page.insert(3, {"id": "c_ro", "version": 1, "first_name": "New"})
    ctx.wave = StubWave({None: Page(page, None)})
    result, report = backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))
    assert result == "done" and (report.written, report.failed) == (6, 1)
    assert all(_rows(dataverse_sim, f"c_ok{i}") for i in range(6))
    [failure] = list(ctx.failures.all(ctx.account))
    assert failure.contact_id == "c_ro" and failure.category == "validation" and "inactive" in failure.reason
    assert ctx.snapshots.get(ctx.account, "c_ro").version == 1  # kept for failures/retry
    assert ctx.states.get(ctx.account, "c_ro").last_result == "failed:validation"


def test_wave_failing_fails_the_run_visibly_and_a_later_run_settles_it(ctx):
    from sync.wave_api import WaveUnavailable

    class DownWave:
        def contacts_page(self, *args, **kwargs):
            raise WaveUnavailable("Wave's contacts API answered 503")

    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = DownWave()
    msg = PageMessage(ctx.account, "gen1", run_id, None, 1)
    assert backfill.run_page(ctx, msg)[0] == "rescheduled:transient"
    assert ctx.queues.sent[-1][1]["attempt"] == 1
    last = dataclasses.replace(msg, attempt=MAX_TRANSIENT_ATTEMPTS - 1)
    assert backfill.run_page(ctx, last)[0] == "failed"
    assert ctx.connections.get(ctx.account).backfill.state == "failed"
    [failure] = list(ctx.failures.all(ctx.account))
    assert failure.category == "source" and "503" in failure.reason
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = StubWave({None: Page([{"id": "c_after", "version": 1}], None)})
    assert backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))[0] == "done"
    assert list(ctx.failures.all(ctx.account)) == []


def test_a_cached_owner_that_no_longer_exists_is_forgotten_and_the_contact_saved_without_it(
        ctx, dataverse_sim, dataverse_client):
    user = dataverse_sim.add_user("leaver@contoso.test")
    member = {"id": "tm_l", "email": "leaver@contoso.test"}
    assert worker.process(ctx, _put(ctx, "c_own1", 1, first_name="A", assigned_team_member=member)) == "synced"
    assert _rows(dataverse_sim, "c_own1")[0]["_ownerid_value"] == user["systemuserid"]
    with dataverse_sim.store.lock:  # the user is removed from Dynamics while the cache still names them
        del dataverse_sim.store.users[user["systemuserid"]]
    assert worker.process(ctx, _put(ctx, "c_own2", 1, first_name="B", assigned_team_member=member)) == "synced"
    assert _rows(dataverse_sim, "c_own2")[0]["_ownerid_value"] != user["systemuserid"]
    assert ctx.owners.resolve(dataverse_client, ctx.account, "gen1", ["leaver@contoso.test"]) == {
        "leaver@contoso.test": None}


def test_an_owner_email_that_cannot_be_looked_up_costs_only_that_contact_its_owner(
        ctx, dataverse_sim, dataverse_client):
    """A page's owners are looked up together: an email too long to look up, and one whose lookup Dynamics
    refuses (400), leave their contacts without an owner and with a warning; the rest of the page, owners
    included, lands, and nothing is recorded as failed."""
    users = {i: dataverse_sim.add_user(f"owner{i}.{uuid.uuid4().hex[:6]}@contoso.test") for i in range(12)}
    refused = f"refused.{uuid.uuid4().hex[:6]}@contoso.test"
    dataverse_sim.add_user(refused)  # exists, but the lookup naming it is refused
    page = [{"id": f"c_o{i:02d}", "version": 1, "first_name": f"o{i}",
             "assigned_team_member": {"id": f"tm{i}", "email": users[i]["internalemailaddress"]}} for i in range(12)]
    page.insert(4, {"id": "c_o04a", "version": 1, "first_name": "long",
                    "assigned_team_member": {"id": "tm_l", "email": "x" * 40_000 + "@contoso.test"}})
    page.insert(9, {"id": "c_o08a", "version": 1, "first_name": "refused",
                    "assigned_team_member": {"id": "tm_r", "email": refused}})
    dataverse_sim.set_fault_rates([(Fault("status", status=400, match="refused.", method="GET"), 1.0)])
    try:
        run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
        ctx.wave = StubWave({None: Page(page, None)})
        result, report = backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))
        assert result == "done" and (report.written, report.failed) == (14, 0)
        for i in range(12):
            assert _rows(dataverse_sim, f"c_o{i:02d}")[0]["_ownerid_value"] == users[i]["systemuserid"]
        for cid, why in (("c_o04a", "40013 characters long"), ("c_o08a", "Dynamics refused the lookup")):
            assert _rows(dataverse_sim, cid)[0]["_ownerid_value"] not in {u["systemuserid"] for u in users.values()}
            state = ctx.states.get(ctx.account, cid)
            assert state.last_result == "synced" and "no owner set" in state.warning and why in state.warning
            assert "@contoso.test" not in state.warning
        assert list(ctx.failures.all(ctx.account)) == []
        assert ctx.states.get(ctx.account, "c_o00").warning is None

        # the live worker: the same refusal gives the same outcome
        msg = _put(ctx, "c_live_r", 1, first_name="live", assigned_team_member={"id": "tm_r", "email": refused})
        assert worker.process(ctx, msg) == "synced"
        assert "Dynamics refused the lookup" in ctx.states.get(ctx.account, "c_live_r").warning
    finally:
        dataverse_sim.clear_faults()
    assert list(ctx.failures.all(ctx.account)) == []


def test_a_contact_that_fails_to_map_unexpectedly_is_recorded_alone(ctx, dataverse_sim, monkeypatch):
    """Even a bug that hits one contact (here: mapping raising something unforeseen) costs only that
    contact: it is recorded as `internal`, and the rest of its page lands."""
    real = backfill.map_contact

    def flaky(contact, owner_id):
        if contact["id"] == "c_m2":
            raise KeyError("something unforeseen")
        return real(contact, owner_id)

    monkeypatch.setattr(backfill, "map_contact", flaky)
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = StubWave({None: Page([{"id": f"c_m{i}", "version": 2**40, "first_name": f"m{i}"}
                                     for i in range(5)], None)})
    result, report = backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))
    assert result == "done" and (report.written, report.failed) == (4, 1)
    assert [bool(_rows(dataverse_sim, f"c_m{i}")) for i in range(5)] == [True, True, False, True, True]
    [failure] = list(ctx.failures.all(ctx.account))
    assert (failure.contact_id, failure.category, failure.version) == ("c_m2", "internal", 2**40)
    assert "KeyError" in failure.reason and ctx.states.get(ctx.account, "c_m2").last_result == "failed:internal"


def test_a_page_during_a_long_penalty_goes_back_unread_to_return_shortly_before_it_ends(
        ctx, dataverse_sim, dataverse_client):
    """The penalty another instance met is in the user's budget: the page is not read from Wave, sends
    nothing to Dataverse and holds no thread; it comes back up to 5 s before the penalty ends, to be read
    and prepared meanwhile."""
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = StubWave({None: Page([{"id": "c_pen", "version": 1, "first_name": "P"}], None)})
    dataverse_client.budget.note(8.6)
    msg = PageMessage(ctx.account, "gen1", run_id, None, 1)
    assert backfill.run_page(ctx, msg)[0] == "rescheduled:throttled"
    assert ctx.queues.sent[-1] == (BACKFILL_PAGES, msg.to_dict(), 4)
    assert ctx.wave.calls == 0 and dataverse_sim.request_log() == []


def test_a_page_meeting_a_429_after_its_read_goes_back_instead_of_sleeping(ctx, dataverse_sim, dataverse_client):
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    ctx.wave = StubWave({None: Page([{"id": "c_429", "version": 1, "first_name": "P",
                                      "assigned_team_member": {"id": "tm", "email": "o@example.com"}}], None)})
    dataverse_sim.script_faults(Fault("status", status=429, retry_after=9))
    msg = PageMessage(ctx.account, "gen1", run_id, None, 1)
    result, _ = backfill.run_page(ctx, msg)
    assert result == "rescheduled:throttled" and ctx.wave.calls == 1
    queue, body, delay = ctx.queues.sent[-1]
    assert (queue, body["page"]) == (BACKFILL_PAGES, 1) and delay == 4  # 5 s before the 9 s penalty ends
    assert [r["status"] for r in dataverse_sim.request_log()] == [429]  # nothing sent into the penalty


def test_a_page_claims_its_new_rows_before_its_lookup_and_not_again_when_it_comes_back(
        ctx, dataverse_sim, dataverse_client, sim_tokens):
    """The claims (sync/holds.py) are Table writes: made before the first Dataverse request, they do not
    stand between the lookup and the write once a penalty ends; a page that went back to its queue after
    them does not make them again (row by row, as rows that exist already are)."""
    run_id = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
    contacts = [{"id": f"c_claim{i}", "version": 1, "first_name": "P"} for i in range(3)]
    ctx.wave = StubWave({None: Page(contacts, None)})
    dataverse_sim.script_faults(Fault("status", status=429, retry_after=9))  # the lookup meets a penalty
    assert backfill.run_page(ctx, PageMessage(ctx.account, "gen1", run_id, None, 1))[0] == "rescheduled:throttled"
    org = org_key("https://org.crm.dynamics.com")
    for c in contacts:
        row = contact_id(ctx.account, c["id"])
        assert ctx.holds.table.get_entity(hold_partition(org, row), row)["account_id"] == ctx.account
    body = ctx.queues.sent[-1][1]
    assert body["claimed"]

    claims: list[object] = []
    claim_many = ctx.holds.claim_many
    ctx.holds.claim_many = lambda *args: claims.append(args) or claim_many(*args)  # type: ignore[method-assign]
    later = DataverseClient(dataverse_sim.url, sim_tokens, timeout=(2.0, 10.0))  # the penalty is over
    ctx.dataverse = lambda conn: later
    try:
        assert backfill.run_page(ctx, PageMessage.parse(json.dumps(body).encode()))[0] == "done"
        assert claims == [] and {r["externaluseridentifier"] for r in dataverse_sim.rows("contacts")} >= {
            f"wavecnct_{c['id']}" for c in contacts}
        # the same page with another contact on it claims again
        ctx.wave = StubWave({None: Page([*contacts, {"id": "c_claim9", "version": 1, "first_name": "Q"}], None)})
        rerun = backfill.start_backfill(ctx.connections, ctx.queues, ctx.account)
        again = replace(PageMessage.parse(json.dumps(body).encode()), run_id=rerun)
        assert backfill.run_page(ctx, again)[0] == "done" and len(claims) == 1
    finally:
        later.close()
