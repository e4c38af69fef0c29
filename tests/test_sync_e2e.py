"""Live sync end to end: the Wave simulator signs webhooks to the dev host (function_app.py), the
contact worker runs from Azurite's contact-events queue, and Dynamics is the Dataverse simulator the
account connected to through the real connect flow (Entra stand-in, Key Vault simulator)."""

from __future__ import annotations

import threading
import uuid

from devstack.dataverse.faults import Fault
from devstack.dataverse_sim import ADMIN_PRIVILEGES
from tests.fixtures.sync import SyncAccount, wait_for


def _email() -> str:
    return f"owner.{uuid.uuid4().hex[:8]}@contoso.test"


def _synced(acct: SyncAccount, wave_id: str, **expected):
    def check():
        row = acct.row(wave_id)
        return row if row and all(row.get(k) == v for k, v in expected.items()) else None

    return wait_for(check, 60, what=f"contact {wave_id} in Dynamics with {expected}")


def test_create_update_delete_round_trip(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    created = wave.create_contact(acct.account_id, first_name="Ada", last_name="Lovelace", email="ada@example.com",
                                  phone="+44 20 7946 0000", company="Analytical Engines Ltd", job_title="Mathematician",
                                  website="https://example.com", note="Met at the expo")
    cid = created["data"]["contact"]["id"]
    assert wave.send([created]) == [202]
    row = _synced(acct, cid, lastname="Lovelace")
    assert (row["firstname"], row["emailaddress1"], row["mobilephone"], row["company"], row["jobtitle"],
            row["websiteurl"], row["description"]) == ("Ada", "ada@example.com", "+44 20 7946 0000",
                                                        "Analytical Engines Ltd", "Mathematician",
                                                        "https://example.com", "Met at the expo")

    assert wave.send([wave.update_contact(acct.account_id, cid, last_name="King", note=None)]) == [202]
    row = _synced(acct, cid, lastname="King")
    assert row["description"] is None and row["firstname"] == "Ada"  # a full snapshot: absent clears

    assert wave.send([wave.delete_contact(acct.account_id, cid)]) == [202]
    wait_for(lambda: not acct.rows(cid), 60, what="the row to be deleted")
    counters = wait_for(lambda: (c := acct.status()["counters"])["deleted"] == 1 and c, 30, what="counters")
    assert counters["synced"] == 2 and counters["failed"] == 0


def test_ten_duplicate_deliveries_make_one_row(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    event = wave.create_contact(acct.account_id, first_name="Dup")
    cid = event["data"]["contact"]["id"]
    # the same event ten times, half of them concurrently
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.extend(wave.send([event]))) for _ in range(5)]
    for t in threads:
        t.start()
    statuses += wave.send([event], duplicates=5)
    for t in threads:
        t.join()
    assert statuses == [202] * 10
    _synced(acct, cid, firstname="Dup")
    acct.drained()
    assert len(acct.rows(cid)) == 1
    assert acct.status()["counters"]["synced"] == 1


def test_racing_workers_on_one_new_contact_make_one_row(sync_account: SyncAccount):
    """Ten deliveries of one change with different event ids (not deduplicated at intake) put ten
    messages in the queue at once; the workers that race to create the row converge on one."""
    acct, wave = sync_account, sync_account.wave
    event = wave.create_contact(acct.account_id, first_name="Race")
    copies = [{**event, "id": f"evt_{uuid.uuid4().hex}"} for _ in range(10)]
    assert wave.send(copies) == [202] * 10
    _synced(acct, event["data"]["contact"]["id"], firstname="Race")
    acct.drained()
    assert len(acct.rows(event["data"]["contact"]["id"])) == 1


def test_out_of_order_updates_newest_wins(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    events = [wave.create_contact(acct.account_id, first_name="v1")]
    cid = events[0]["data"]["contact"]["id"]
    events += [wave.update_contact(acct.account_id, cid, first_name=f"v{v}") for v in (2, 3, 4)]
    assert wave.send(events, order="reverse") == [202] * 4
    _synced(acct, cid, firstname="v4")
    acct.drained()
    assert acct.row(cid)["firstname"] == "v4"


def test_delete_then_stale_update_stays_deleted(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    created = wave.create_contact(acct.account_id, first_name="Gone")
    cid = created["data"]["contact"]["id"]
    wave.send([created])
    _synced(acct, cid, firstname="Gone")
    stale = wave.update_contact(acct.account_id, cid, first_name="Zombie")
    deleted = wave.delete_contact(acct.account_id, cid)
    assert wave.send([deleted]) == [202]
    wait_for(lambda: not acct.rows(cid), 60, what="the row to be deleted")
    assert wave.send([stale]) == [202]  # the older update arrives after the delete
    acct.drained()
    assert acct.rows(cid) == []


def test_owner_matched_unmatched_and_disabled(sync_account: SyncAccount):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    matched, disabled, unknown = _email(), _email(), _email()
    user = dv.add_user(matched.upper())  # Dataverse compares emails case-insensitively
    off = dv.add_user(disabled, enabled=False)
    events = [wave.create_contact(acct.account_id, first_name=name, team_member={"id": f"tm_{name}", "email": email})
              for name, email in (("m", matched), ("d", disabled), ("u", unknown))]
    wave.send(events)
    ids = [e["data"]["contact"]["id"] for e in events]
    rows = [_synced(acct, cid) for cid in ids]
    admin = rows[2]["_createdby_value"]  # the connecting admin: the owner Dataverse gives by default
    assert rows[0]["_ownerid_value"] == user["systemuserid"]
    assert rows[1]["_ownerid_value"] == admin != off["systemuserid"]
    assert rows[2]["_ownerid_value"] == admin


def test_company_is_cut_to_49_characters(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    long_name = "Analytical Engines and Difference Machines of London Ltd"  # 56 characters
    event = wave.create_contact(acct.account_id, first_name="Co", company=long_name)
    wave.send([event])
    row = _synced(acct, event["data"]["contact"]["id"], firstname="Co")
    assert row["company"] == long_name[:49]


def test_throttling_storm_everything_lands_nothing_in_poison(sync_account: SyncAccount):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    before = dict(dv.limits.__dict__)
    # Service protection scaled down so the worker meets real 429s with Retry-After beyond the client's
    # inline wait: the messages must be rescheduled, not retried into the poison queue.
    dv.configure(requests=15, window_seconds=3.0)
    try:
        events = [wave.create_contact(acct.account_id, first_name=f"T{i}") for i in range(30)]
        assert wave.send(events) == [202] * 30
        for e in events:
            _synced(acct, e["data"]["contact"]["id"])
        acct.drained(120)
        throttled = [r for r in dv.request_log() if r.get("status") == 429]
        assert throttled, "the storm never throttled: the test proves nothing"
    finally:
        dv.configure(**{k: before[k] for k in ("requests", "window_seconds")})
        dv.protection.reset()  # the admin user's penalty must not spill into the next test
    assert acct.poison() == {"contact-events-poison": 0, "backfill-pages-poison": 0}
    assert acct.status()["counters"]["synced"] == 30


def test_revoked_grant_needs_reauth_and_stops_dataverse_traffic(sync_account: SyncAccount, fresh_entra):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    first = wave.create_contact(acct.account_id, first_name="Before")
    wave.send([first])
    cid = first["data"]["contact"]["id"]
    _synced(acct, cid, firstname="Before")
    fresh_entra.fail_refresh()  # Microsoft answers invalid_grant from now on
    dv.revoke_tokens()  # and the cached access token stops working
    wave.send([wave.update_contact(acct.account_id, cid, first_name="After")])
    status = wait_for(lambda: (s := acct.status())["state"] == "needs_reauth" and s, 60, what="needs_reauth")
    assert status["reason"]["category"] == "auth"
    acct.drained()
    seen = len(dv.request_log())
    more = [wave.update_contact(acct.account_id, cid, first_name=f"Later{i}") for i in range(3)]
    assert wave.send(more) == [202] * 3  # accepted and dropped: the account has no active connection
    acct.drained()
    assert len(dv.request_log()) == seen, "Dataverse was called for a connection that needs reauth"
    assert acct.row(cid)["firstname"] == "Before"


def test_rejected_record_is_recorded_with_a_reason_then_retried(sync_account: SyncAccount):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    ok = wave.create_contact(acct.account_id, first_name="Allowed")
    wave.send([ok])
    admin = _synced(acct, ok["data"]["contact"]["id"])["_createdby_value"]
    event = wave.create_contact(acct.account_id, first_name="Perm")
    cid = event["data"]["contact"]["id"]
    # The connected admin loses the privilege to create contacts: Dynamics answers 403 PrivilegeDenied.
    dv.set_privileges(admin, ADMIN_PRIVILEGES - {"prvCreateContact"})
    try:
        wave.send([event])
        failures = wait_for(lambda: acct.status()["failures"], 60, what="a recorded failure")
        assert failures[0]["contact_id"] == cid and failures[0]["category"] == "permission"
        assert "prvCreateContact" in failures[0]["reason"]
        acct.drained()
        assert acct.rows(cid) == [] and acct.poison()["contact-events-poison"] == 0
        assert acct.status()["counters"]["failed"] == 1
    finally:
        dv.set_privileges(admin, ADMIN_PRIVILEGES)
    res = acct.api("POST", "/failures/retry")
    assert res.status_code == 202 and res.json()["requeued"] == 1
    _synced(acct, cid, firstname="Perm")
    wait_for(lambda: acct.status()["failures"] == [], 30, what="the failure to clear")


def test_two_retries_in_a_row_queue_each_failure_once(sync_account: SyncAccount):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    ok = wave.create_contact(acct.account_id, first_name="Allowed")
    wave.send([ok])
    admin = _synced(acct, ok["data"]["contact"]["id"])["_createdby_value"]
    events = [wave.create_contact(acct.account_id, first_name=f"Twice{i}") for i in range(3)]
    ids = sorted(e["data"]["contact"]["id"] for e in events)
    dv.set_privileges(admin, ADMIN_PRIVILEGES - {"prvCreateContact"})
    try:
        assert wave.send(events) == [202] * 3
        wait_for(lambda: len(acct.status()["failures"]) == 3, 60, what="three recorded failures")
        acct.drained()
    finally:
        dv.set_privileges(admin, ADMIN_PRIVILEGES)
    # The worker's first Dataverse request for a retried contact (its lookup) waits until released, so
    # neither retry below can be settled by the worker before the other has run.
    dv.script_faults(*[Fault("hold", delay=30, match="contacts", method="GET") for _ in range(2 * len(ids))])
    try:
        first = acct.api("POST", "/failures/retry")
        second = acct.api("POST", "/failures/retry")
    finally:
        dv.clear_faults()  # lets the held lookups go and drops the holds nobody used
    assert first.status_code == second.status_code == 202
    assert (first.json()["requeued"], first.json()["already_queued"]) == (3, 0)
    assert (second.json()["requeued"], second.json()["already_queued"]) == (0, 3)
    rows = {cid: _synced(acct, cid) for cid in ids}
    wait_for(lambda: acct.status()["failures"] == [], 30, what="the failures to clear")
    acct.drained()
    for cid, row in rows.items():  # one message each: one write each
        writes = [r for r in dv.request_log() if r["method"] == "PATCH" and row["contactid"] in r["path"]
                  and r["status"] < 300]
        assert len(writes) == 1, (cid, writes)
    assert acct.poison()["contact-events-poison"] == 0
    # Settled: the rows are gone, so a retry now finds nothing to queue.
    assert acct.api("POST", "/failures/retry").json()["requeued"] == 0


def test_sync_routes_refuse_an_account_that_is_not_connected(devhost):
    from tests.fixtures.identity import api

    for path in ("sync", "failures/retry"):
        res = api(devhost, "POST", f"/api/connections/acct_never_connected/{path}")
        assert res.status_code == 409 and res.json()["error"]["code"] == "not_connected"
        assert api(devhost, "POST", f"/api/connections/bad%20id/{path}").status_code == 400


def _event_at(acct: SyncAccount, event: dict, version: int, **fields) -> dict:
    """A copy of `event` as Wave would send it for a later (or earlier) version of the same contact."""
    contact = {**event["data"]["contact"], "version": version, **fields}
    return {**event, "id": f"evt_{uuid.uuid4().hex}", "type": "contact.updated", "data": {"contact": contact}}


def test_versions_beyond_int32_sync_and_order_exactly(sync_account: SyncAccount):
    """Millisecond timestamps as versions: 2^31 - 1, 2^31 and 2^53 are applied in order and compared
    exactly (2^53 - 1 is older than 2^53)."""
    acct, wave = sync_account, sync_account.wave
    created = wave.create_contact(acct.account_id, first_name="v0")
    cid = created["data"]["contact"]["id"]
    for version, name in ((2**31 - 1, "a"), (2**31, "b")):
        assert wave.send([_event_at(acct, created, version, first_name=name)]) == [202]
        _synced(acct, cid, firstname=name)
    newest, older = _event_at(acct, created, 2**53, first_name="c"), _event_at(acct, created, 2**53 - 1,
                                                                              first_name="stale")
    assert wave.send([newest, older]) == [202, 202]
    _synced(acct, cid, firstname="c")
    acct.drained()
    assert acct.row(cid)["firstname"] == "c"
    status = acct.status()
    assert status["counters"]["failed"] == 0 and status["failures"] == []
    assert acct.poison() == {"contact-events-poison": 0, "backfill-pages-poison": 0}


def test_an_owner_email_that_cannot_be_looked_up_leaves_only_that_contact_without_owner(
        sync_account: SyncAccount, tables):
    from sync.state import STATE, ContactStateStore

    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    good = _email()
    user = dv.add_user(good)
    long_email = "x" * 39_988 + "@contoso.com"  # 40,000 characters: the schema allows 100,000
    odd = wave.create_contact(acct.account_id, first_name="Odd", team_member={"id": "tm_odd", "email": long_email})
    fine = wave.create_contact(acct.account_id, first_name="Fine", team_member={"id": "tm_ok", "email": good})
    assert wave.send([odd, fine]) == [202, 202]
    odd_row = _synced(acct, odd["data"]["contact"]["id"], firstname="Odd")
    fine_row = _synced(acct, fine["data"]["contact"]["id"], firstname="Fine")
    assert fine_row["_ownerid_value"] == user["systemuserid"]
    assert odd_row["_ownerid_value"] == odd_row["_createdby_value"]  # no owner set: Dynamics' default
    acct.drained()
    status = acct.status()
    assert status["failures"] == [] and status["counters"]["failed"] == 0 and status["counters"]["synced"] == 2
    state = ContactStateStore(tables(STATE)).get(acct.account_id, odd["data"]["contact"]["id"])
    assert state.last_result == "synced" and "40000 characters long" in state.warning
