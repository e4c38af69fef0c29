"""Deletes in the live lane's drain (sync/drain.py, sync/worker.py apply_deletes): a backlog of deletes of one
account goes to Dynamics in `$batch` requests of independent deletes, with every guarantee of the per-contact
path: a refused row fails alone, an older update never brings a deleted row back, a row another account holds
is never deleted.

End to end through the dev host: Wave's signed webhooks in, the Dataverse simulator's rows and request log out.
A backlog is made without timing: the first delete's request is held inside Dataverse (the drain holds the
account's lease meanwhile), the others are stored as pending changes behind it, and once it is released the
drain's next pass reads them all at once.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from devstack.dataverse.faults import Fault
from tests.fixtures.sync import SyncAccount, connect_sync_account, wait_for

BATCH_SIZE = 100  # DataverseClient's default batch_size


def _ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["contact"]["id"] for e in events]


def _created(acct: SyncAccount, count: int, prefix: str) -> list[str]:
    wave = acct.wave
    events = [wave.create_contact(acct.account_id, first_name=prefix, last_name=str(i)) for i in range(count)]
    assert set(wave.send(events)) == {202}
    ids = _ids(events)
    wait_for(lambda: all(acct.row(cid) for cid in ids), 120, what=f"the {count} contacts in Dynamics")
    return ids


def _deletes_behind_a_held_one(acct: SyncAccount, first: str, rest: list[str]) -> None:
    """Delete `first` alone, hold its request in Dynamics, send the deletes of `rest` meanwhile, release."""
    dv, wave = acct.identity.dataverse, acct.wave
    dv.script_faults(Fault("hold", delay=120, method="DELETE"))
    try:
        assert wave.send([wave.delete_contact(acct.account_id, first)]) == [202]
        wait_for(lambda: not any(f["kind"] == "hold" for f in dv.faults.pending()), 60,
                 what="the first delete to be held in Dynamics")
        assert set(wave.send([wave.delete_contact(acct.account_id, cid) for cid in rest])) == {202}
    finally:
        dv.release_held()


def _delete_requests(dv, since: int) -> list[tuple[str, int]]:
    """(method, rows it deletes) of each delete request on the wire since `since`."""
    return [(r["method"], r["inner"] if r["method"] == "POST" else 1) for r in dv.request_log()[since:]
            if r["method"] == "DELETE" or (r["method"] == "POST" and r["path"].endswith("$batch"))]


def test_a_burst_of_deletes_reaches_dynamics_in_batches_and_an_older_update_never_brings_a_row_back(
        devhost, identity, wave, sync_queues, fresh_entra):
    acct = connect_sync_account(devhost, identity, wave, sync_queues)
    dv = identity.dataverse
    updates = {cid: wave.update_contact(acct.account_id, cid, first_name="Older")
               for cid in _created(acct, 251, "Doomed")}  # made before the deletes, delivered after them
    first, *rest = list(updates)
    since = len(dv.request_log())
    _deletes_behind_a_held_one(acct, first, rest)
    wait_for(lambda: not any(acct.rows(cid) for cid in updates), 120, what="every row of the burst deleted")
    acct.drained()
    # the held lone delete, then the backlog of 250 in ceil(250 / 100) batches: each row deleted once
    requests = _delete_requests(dv, since)
    assert requests == [("DELETE", 1)] + [("POST", BATCH_SIZE)] * 2 + [("POST", 50)]
    assert len(requests) == 1 + math.ceil(len(rest) / BATCH_SIZE)
    assert acct.status()["counters"]["deleted"] == 251

    # Wave redelivers the updates made before the deletes: each is older than its contact's delete
    since = len(dv.request_log())
    assert set(wave.send(list(updates.values()))) == {202}
    acct.drained()
    assert not any(acct.rows(cid) for cid in updates)
    assert [r for r in dv.request_log()[since:] if r["method"] in ("PATCH", "POST", "DELETE")] == []
    assert acct.poison()["contact-events-poison"] == 0


def test_a_delete_dynamics_refuses_fails_alone_and_the_others_of_its_batch_are_deleted(
        devhost, identity, wave, sync_queues, fresh_entra):
    acct = connect_sync_account(devhost, identity, wave, sync_queues)
    dv = identity.dataverse
    first, *rest = _created(acct, 7, "Batch")
    refused = rest[3]
    row = acct.row(refused)["contactid"]
    # a plug-in refuses this row's delete; the batch goes on (continue-on-error)
    dv.script_faults(Fault("status", status=400, code="0x80040265", method="DELETE", match=f"contacts({row})",
                           message="The delete was cancelled by a plug-in.", in_batch=True))
    since = len(dv.request_log())
    _deletes_behind_a_held_one(acct, first, rest)
    failures = wait_for(lambda: acct.status()["failures"], 60, what="the refused delete recorded")
    acct.drained()
    assert [(f["contact_id"], f["category"]) for f in failures] == [(refused, "validation")]
    assert "cancelled by a plug-in" in failures[0]["reason"]
    assert [r["contactid"] for r in acct.rows(refused)] == [row]
    assert not any(acct.rows(cid) for cid in [first, *rest] if cid != refused)
    assert _delete_requests(dv, since) == [("DELETE", 1), ("POST", 6)]
    counters = acct.status()["counters"]
    assert (counters["deleted"], counters["failed"]) == (6, 1)

    # retried from the status page once the plug-in lets it go: deleted, the failure cleared
    assert acct.api("POST", "/failures/retry").status_code in (200, 202)
    wait_for(lambda: not acct.rows(refused), 60, what="the retried delete")
    wait_for(lambda: not acct.status()["failures"], 60, what="the failure cleared")
    acct.drained()
    assert acct.poison()["contact-events-poison"] == 0


def test_a_batch_of_deletes_leaves_a_row_another_account_holds(devhost, identity, wave, sync_queues, fresh_entra):
    a = connect_sync_account(devhost, identity, wave, sync_queues)
    b = connect_sync_account(devhost, identity, wave, sync_queues)
    dv = identity.dataverse
    shared = f"c_shared_{uuid.uuid4().hex[:8]}"
    assert wave.send([wave.create_contact(a.account_id, id=shared, first_name="Ada")]) == [202]
    held = wait_for(lambda: a.row(shared), 60, what="A's row")
    first, *own = _created(b, 4, "Own")
    wave.create_contact(b.account_id, id=shared, first_name="Bob")  # B's contact of the same id, never synced
    since = len(dv.request_log())
    _deletes_behind_a_held_one(b, first, [*own, shared])
    wait_for(lambda: not any(b.rows(cid) for cid in [first, *own]), 60, what="B's own rows deleted")
    failures = wait_for(lambda: b.status()["failures"], 60, what="the conflict recorded")
    b.drained()
    assert [(f["contact_id"], f["category"]) for f in failures] == [(shared, "conflict")]
    assert "did not delete" in failures[0]["reason"] and a.account_id not in failures[0]["reason"]
    assert a.rows(shared) == [held]  # every column as A left it
    assert _delete_requests(dv, since) == [("DELETE", 1), ("POST", 3)]
    assert b.status()["counters"]["deleted"] == 4 and b.poison()["contact-events-poison"] == 0
