"""Contact data leaves with the connection (through the dev host and Azurite): a disconnect deletes the
account's snapshots, failure records and owner cache; what stays (`contactstate`) holds ids, versions and
hashes only, and is what lets a reconnect find the Dynamics rows instead of creating them twice. The daily
timer finishes what a disconnect left."""

from __future__ import annotations

import uuid

import requests

from core.failures import TABLE as FAILURES
from core.failures import FailureStore
from devstack.dataverse_sim import ADMIN_PRIVILEGES
from sync.owners import TABLE as OWNERS
from sync.state import SNAPSHOTS, STATE, STATE_BUCKETS, SnapshotStore
from tests.fixtures.identity import connect_account
from tests.fixtures.stack import MASTER_KEY
from tests.fixtures.sync import SyncAccount, connect_sync_account, wait_for

# Everything a contact state row may hold: keys, ids, versions, a hash, flags and times.
# `warning` says why an owner was not looked up (lengths and reasons, never the email: sync/rules.py)
STATE_PROPERTIES = {"PartitionKey", "RowKey", "dynamics_id", "version", "content_hash", "deleted", "last_result",
                    "updated_at", "warning"}


def _partition(tables, table: str, account_id: str) -> list[dict]:
    return list(tables(table).query_entities("PartitionKey eq @pk", parameters={"pk": account_id}))


def _states(tables, account_id: str) -> list[dict]:
    return [e for n in range(STATE_BUCKETS) for e in _partition(tables, STATE, f"{account_id}~{n}")]


def _synced(acct: SyncAccount, wave_id: str) -> dict:
    return wait_for(lambda: acct.row(wave_id), 60, what=f"contact {wave_id} in Dynamics")


def test_disconnect_deletes_contact_content_and_a_reconnect_creates_no_duplicates(
        sync_account: SyncAccount, tables, devhost):
    acct, wave, dv = sync_account, sync_account.wave, sync_account.identity.dataverse
    mark = uuid.uuid4().hex[:10]
    content = [f"Zelda{mark}", f"zelda.{mark}@example.com", f"note-{mark}", f"member.{mark}@contoso.test"]
    events = [wave.create_contact(acct.account_id, first_name=f"Zelda{mark}", last_name=f"L{i}",
                                  email=f"zelda.{mark}@example.com", note=f"note-{mark}",
                                  team_member={"id": "tm_1", "email": f"member.{mark}@contoso.test"})
              for i in range(3)]
    ids = [e["data"]["contact"]["id"] for e in events]
    assert wave.send(events) == [202] * 3
    admin = _synced(acct, ids[0])["_createdby_value"]
    for cid in ids[1:]:
        _synced(acct, cid)
    # One contact Dynamics refuses, so that a failure record exists too.
    refused = wave.create_contact(acct.account_id, first_name=f"Zelda{mark}", last_name="Refused")
    ids.append(refused["data"]["contact"]["id"])
    dv.set_privileges(admin, ADMIN_PRIVILEGES - {"prvCreateContact"})
    try:
        assert wave.send([refused]) == [202]
        wait_for(lambda: acct.status()["failures"], 60, what="a recorded failure")
        acct.drained()
    finally:
        dv.set_privileges(admin, ADMIN_PRIVILEGES)
    # what the disconnect has to delete is there (the live lane keeps a snapshot where it may be read again:
    # the failed contact's, for `failures/retry`)
    assert [r["RowKey"] for r in _partition(tables, SNAPSHOTS, acct.account_id)] == [ids[-1]]
    assert len(_partition(tables, FAILURES, acct.account_id)) == 1
    assert _partition(tables, OWNERS, acct.account_id)

    res = acct.api("POST", "/disconnect", json={"disconnected_by": "wave-user-1"})
    assert res.status_code == 200 and res.json()["state"] == "disconnected"
    assert res.json()["failures"] == []

    for table in (SNAPSHOTS, FAILURES, OWNERS):
        assert _partition(tables, table, acct.account_id) == [], f"{table} still holds rows of the account"
    states = _states(tables, acct.account_id)
    assert sorted(s["RowKey"] for s in states) == sorted(ids)
    for state in states:
        assert set(state) <= STATE_PROPERTIES, set(state) - STATE_PROPERTIES
        assert not any(text in str(value) for value in state.values() for text in content)

    # Reconnect and import everything again: the states lead to the rows already there.
    done = connect_account(devhost, acct.identity, acct.account_id)
    assert done.status_code == 200 and done.json()["state"] == "connected", done.text
    assert acct.api("POST", "/sync").status_code == 202
    wait_for(lambda: acct.status()["backfill"]["state"] == "done", 120, what="the backfill to finish")
    acct.drained()
    for cid in ids:
        assert len(acct.rows(cid)) == 1, f"Wave contact {cid} has {len(acct.rows(cid))} Dynamics rows"
    assert acct.status()["failures"] == []


def test_the_daily_timer_finishes_what_a_disconnect_left(sync_account: SyncAccount, tables, devhost):
    live = sync_account
    kept = live.wave.create_contact(live.account_id, first_name="Stays")
    assert live.wave.send([kept]) == [202]
    _synced(live, kept["data"]["contact"]["id"])
    # a snapshot of the connected account (the live lane keeps one for a contact that failed, say)
    SnapshotStore(tables(SNAPSHOTS)).put_if_newer(live.account_id, {"id": "c_kept", "version": 1}, deleted=False,
                                                  event_id="evt_kept")

    gone = connect_sync_account(devhost, live.identity, live.wave, live.queues)
    assert gone.api("POST", "/disconnect").status_code == 200
    # Rows the disconnect did not get to: a webhook that raced it, a backfill page still running.
    SnapshotStore(tables(SNAPSHOTS)).put_if_newer(gone.account_id, {"id": "c_late", "version": 3,
                                                                    "first_name": "Late"},
                                                  deleted=False, event_id="evt_late")
    FailureStore(tables(FAILURES)).record(gone.account_id, "c_late", "validation", "Wave sent an invalid value")

    res = requests.post(f"{devhost.url}/admin/functions/purge_expired_sync_rows",
                        headers={"x-functions-key": MASTER_KEY}, timeout=60)
    assert res.status_code == 202
    assert _partition(tables, SNAPSHOTS, gone.account_id) == []
    assert _partition(tables, FAILURES, gone.account_id) == []
    assert [e["RowKey"] for e in _partition(tables, SNAPSHOTS, live.account_id)] == ["c_kept"]
