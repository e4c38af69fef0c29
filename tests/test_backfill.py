"""Backfill end to end: POST /api/connections/{id}/sync -> backfill-pages -> the page worker reads the
Wave simulator's contacts API and bulk-writes the Dataverse simulator; status shows the progress."""

from __future__ import annotations

import time
import uuid
from collections import Counter

from tests.fixtures.sync import SyncAccount, connect_sync_account, wait_for

INVALID = [  # what Wave's API could send that no Dynamics row can be made from
    {"version": 1, "first_name": "Num", "email": 12345},
    {"version": "three", "first_name": "Ver"},
    {"version": 1, "first_name": {"nested": True}},
    {"version": -4, "first_name": "Neg"},
    {"version": 1, "first_name": "Tm", "assigned_team_member": "carol"},
]


def _done(acct: SyncAccount, run_id: str, timeout: float = 300) -> dict:
    def finished():
        st = acct.status()
        return st if st["backfill"]["state"] in ("done", "failed") else None

    st = wait_for(finished, timeout, interval=0.5, what=f"backfill {run_id} to finish")
    assert st["backfill"]["state"] == "done", st
    return st


def _rows_by_wave_id(acct: SyncAccount, ids: set[str]) -> Counter:
    return Counter(r["externaluseridentifier"][len("wavecnct_"):] for r in acct.identity.dataverse.rows()
                   if (r.get("externaluseridentifier") or "")[len("wavecnct_"):] in ids)


def test_backfill_2000_contacts_with_5_invalid(devhost, identity, wave, sync_queues, fresh_entra, capsys):
    acct = connect_sync_account(devhost, identity, wave, sync_queues)
    dv = identity.dataverse
    owner_email = f"owner.{uuid.uuid4().hex[:8]}@contoso.test"
    owner = dv.add_user(owner_email)
    members = [{"id": "tm_1", "email": owner_email}, {"id": "tm_2", "email": "nobody@contoso.test"}, None]
    ids = wave.seed(acct.account_id, 1995, make=lambda i: {"first_name": f"F{i}", "last_name": f"L{i}",
                                                          "email": f"c{i}@example.com", "company": "C" * 60,
                                                          "team_member": members[i % 3]})
    bad_ids = [f"{ids[i]}_bad" for i in (10, 600, 1200, 1700, 1994)]  # spread over the pages
    for bad_id, raw in zip(bad_ids, INVALID, strict=True):
        wave.put_raw(acct.account_id, {"id": bad_id, **raw})

    log_before = len(dv.request_log())
    started = acct.api("POST", "/sync")
    assert started.status_code == 202, started.text
    st = _done(acct, started.json()["run_id"])
    requests_made = len(dv.request_log()) - log_before
    per_contact = requests_made / 2000
    with capsys.disabled():  # the figure the issue asks for, visible in `make test` output
        print(f"\nbackfill of 2000 contacts: {requests_made} Dataverse requests, {per_contact:.4f} per contact")
    assert per_contact <= 0.05

    rows = _rows_by_wave_id(acct, set(ids) | set(bad_ids))
    assert len(rows) == 1995 and set(rows.values()) == {1}  # every valid contact once, no invalid one
    assert st["backfill"]["pages"] == 4 and st["backfill"]["contacts"] == 2000
    counters = st["counters"]
    assert (counters["synced"], counters["failed"]) == (1995, 5)
    failures = {f["contact_id"]: f for f in st["failures"]}
    assert set(failures) == set(bad_ids)
    assert all(f["category"] == "validation" and "Wave sent an invalid contact" in f["reason"]
               for f in failures.values())
    assert "data" not in failures[bad_ids[0]]["reason"] and "email" in failures[bad_ids[0]]["reason"]
    sample = {r["externaluseridentifier"]: r for r in dv.rows()}
    assert sample[f"wavecnct_{ids[0]}"]["_ownerid_value"] == owner["systemuserid"]
    assert sample[f"wavecnct_{ids[1]}"]["_ownerid_value"] != owner["systemuserid"]
    assert len(sample[f"wavecnct_{ids[0]}"]["company"]) == 49

    # A second run finds everything applied: it reads Wave again but writes nothing to Dynamics.
    writes_before = [r for r in dv.request_log() if r["method"] in ("POST", "PATCH", "DELETE")]
    again = acct.api("POST", "/sync")
    assert again.status_code == 202
    st2 = _done(acct, again.json()["run_id"])
    writes_after = [r for r in dv.request_log() if r["method"] in ("POST", "PATCH", "DELETE")]
    assert len(writes_after) == len(writes_before)
    assert _rows_by_wave_id(acct, set(ids)) == rows
    assert st2["counters"]["synced"] == 1995 and st2["counters"]["skipped"] == 1995


def test_backfill_waits_out_wave_429_while_live_events_keep_flowing(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    ids = wave.seed(acct.account_id, 40)
    wave.faults.throttle, wave.faults.retry_after = 1, 6  # the first page read: 429, Retry-After 6 s
    wave.faults.errors, wave.faults.status = 0, 503
    started = acct.api("POST", "/sync")
    assert started.status_code == 202
    wait_for(lambda: any(r["status"] == 429 for r in wave.api_requests(acct.account_id)), 30,
             what="the backfill to meet a 429")
    # While the backfill waits, a live change goes through its own lane.
    live = wave.create_contact(acct.account_id, first_name="Live")
    wave.send([live])
    wait_for(lambda: acct.row(live["data"]["contact"]["id"]), 30, what="the live contact")
    assert acct.status()["backfill"]["state"] == "running"
    _done(acct, started.json()["run_id"], 60)
    statuses = [r["status"] for r in wave.api_requests(acct.account_id)]
    assert statuses[0] == 429 and statuses[-1] == 200
    assert set(_rows_by_wave_id(acct, set(ids)).values()) == {1} and len(_rows_by_wave_id(acct, set(ids))) == 40
    assert acct.poison() == {"contact-events-poison": 0, "backfill-pages-poison": 0}


def test_retry_of_an_invalid_wave_contact_rereads_it_after_it_was_fixed(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    ids = wave.seed(acct.account_id, 5)
    bad_id = f"{ids[2]}_bad"
    wave.put_raw(acct.account_id, {"id": bad_id, "version": 1, "first_name": ["not", "a", "string"]})
    run = acct.api("POST", "/sync").json()["run_id"]
    st = _done(acct, run, 60)
    assert [f["contact_id"] for f in st["failures"]] == [bad_id] and st["counters"]["synced"] == 5
    assert "first_name" in st["failures"][0]["reason"]
    wave.put_raw(acct.account_id, {"id": bad_id, "version": 2, "first_name": "Fixed"})  # corrected in Wave
    res = acct.api("POST", "/failures/retry")
    assert res.status_code == 202
    body = res.json()
    assert body["requeued"] == 0 and body["backfill_run_id"]  # no snapshot to re-apply: Wave is read again
    _done(acct, body["backfill_run_id"], 60)
    wait_for(lambda: acct.row(bad_id), 30, what="the fixed contact in Dynamics")
    assert acct.row(bad_id)["firstname"] == "Fixed"
    assert wait_for(lambda: acct.status()["failures"] == [], 30, what="the failure to clear")


def _webhook(acct: SyncAccount, contact: dict) -> dict:
    return {"id": f"evt_{uuid.uuid4().hex}", "type": "contact.updated", "created": int(time.time()),
            "account_id": acct.account_id, "data": {"contact": contact}}


def test_versions_beyond_int32_are_backfilled_and_compared_exactly(sync_account: SyncAccount):
    acct, wave = sync_account, sync_account.wave
    versions = {"c_v1": 2**31 - 1, "c_v2": 2**31, "c_v3": 2**53}
    for cid, version in versions.items():
        wave.put_raw(acct.account_id, {"id": cid, "version": version, "first_name": "backfill"})
    st = _done(acct, acct.api("POST", "/sync").json()["run_id"], 60)
    assert st["counters"]["synced"] == 3 and st["failures"] == []
    assert all(acct.row(cid)["firstname"] == "backfill" for cid in versions)
    # live changes: one newer than the backfilled version (applied), one a single step older (not)
    newer = _webhook(acct, {"id": "c_v1", "version": 2**31, "first_name": "live"})
    older = _webhook(acct, {"id": "c_v3", "version": 2**53 - 1, "first_name": "stale"})
    assert wave.send([newer, older]) == [202, 202]
    wait_for(lambda: acct.row("c_v1")["firstname"] == "live", 60, what="the live update")
    acct.drained()
    # A second run reads Wave's older c_v1 and the unchanged others: nothing is written to Dynamics.
    dv = acct.identity.dataverse
    writes = len([r for r in dv.request_log() if r["method"] in ("POST", "PATCH", "DELETE")])
    _done(acct, acct.api("POST", "/sync").json()["run_id"], 60)
    assert len([r for r in dv.request_log() if r["method"] in ("POST", "PATCH", "DELETE")]) == writes
    assert {cid: acct.row(cid)["firstname"] for cid in versions} == {"c_v1": "live", "c_v2": "backfill",
                                                                      "c_v3": "backfill"}
    assert acct.poison() == {"contact-events-poison": 0, "backfill-pages-poison": 0}


def test_a_40000_character_team_member_email_costs_one_contact_its_owner_not_the_page(
        sync_account: SyncAccount, tables):
    from sync.state import STATE, ContactStateStore

    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    owner_email = f"owner.{uuid.uuid4().hex[:8]}@contoso.test"
    owner = dv.add_user(owner_email)
    long_email = "x" * 39_988 + "@contoso.com"  # 40,000 characters: the schema allows 100,000
    ids = wave.seed(acct.account_id, 500, make=lambda i: {
        "first_name": f"F{i}", "team_member": {"id": "tm_odd", "email": long_email} if i == 250
        else {"id": "tm_1", "email": owner_email}})  # one page of 500
    st = _done(acct, acct.api("POST", "/sync").json()["run_id"], 120)
    assert (st["backfill"]["pages"], st["backfill"]["contacts"]) == (1, 500)
    assert st["failures"] == [] and (st["counters"]["synced"], st["counters"]["failed"]) == (500, 0)
    rows = {r["externaluseridentifier"][len("wavecnct_"):]: r for r in dv.rows()
            if r.get("externaluseridentifier", "").startswith("wavecnct_")}
    assert set(ids) <= rows.keys()
    assert all(rows[cid]["_ownerid_value"] == owner["systemuserid"] for i, cid in enumerate(ids) if i != 250)
    odd = rows[ids[250]]
    assert odd["_ownerid_value"] == odd["_createdby_value"] != owner["systemuserid"]  # no owner set
    state = ContactStateStore(tables(STATE)).get(acct.account_id, ids[250])
    assert state.last_result == "synced" and "no owner set" in state.warning and "40000" in state.warning
    assert acct.poison() == {"contact-events-poison": 0, "backfill-pages-poison": 0}
