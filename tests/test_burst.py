"""Bursts in the live lane (sync/pending.py, sync/drain.py): a backlog of one account goes to Dynamics in bulk,
and never in front of another account's change.

End to end through the dev host: Wave's signed webhooks in, the Dataverse simulator's rows and request log out.
The pure rule that picks each contact's change of a pass, and the webhook's connection cache, are tested
without I/O.
"""

from __future__ import annotations

import random
import time

import requests

from core.connections import CONNECTED, DISCONNECTED, Connection
from core.storage import CONTACT_EVENTS
from devstack.dataverse.faults import Fault
from sync.events import validate_event
from sync.pending import DRAINS, PendingChange, PendingStore, newest_by_contact
from sync.state import SNAPSHOTS
from sync.webhook import LiveConnections
from tests.fixtures.stack import MASTER_KEY
from tests.fixtures.sync import connect_sync_account, wait_for


def _change(cid: str, version: int, deleted: bool = False) -> PendingChange:
    return PendingChange("acct", cid, version, deleted, {"id": cid, "version": version}, f"~p~{cid}~{version:016d}")


def test_a_pass_applies_the_newest_change_of_each_contact_and_a_delete_wins_a_tie():
    changes = [_change("a", 3), _change("a", 7), _change("a", 5), _change("b", 2), _change("b", 2, deleted=True),
               _change("c", 2**53), _change("c", 2**53 - 1)]
    random.Random(1).shuffle(changes)
    newest = newest_by_contact(changes)
    assert {cid: (c.version, c.deleted) for cid, c in newest.items()} == {
        "a": (7, False), "b": (2, True), "c": (2**53, False)}


def _bulk_writes(dv, since: int) -> list[dict]:
    return [r for r in dv.request_log()[since:] if r["method"] == "POST" and r["status"] < 300
            and "UpsertMultiple" in r["path"]]


def test_a_burst_of_one_account_does_not_delay_another_accounts_change(devhost, identity, wave, sync_queues,
                                                                       fresh_entra):
    busy = connect_sync_account(devhost, identity, wave, sync_queues)
    quiet = connect_sync_account(devhost, identity, wave, sync_queues)
    dv = identity.dataverse
    since = len(dv.request_log())
    burst = [wave.create_contact(busy.account_id, first_name="Burst", last_name=str(i)) for i in range(300)]
    ids = [e["data"]["contact"]["id"] for e in burst]
    # The busy account's bulk write is held inside Dataverse until released: its backlog is stuck mid-drain.
    dv.script_faults(Fault("hold", delay=120, match="CRM.UpsertMultiple"))
    try:
        assert set(wave.send(burst)) == {202}
        wait_for(lambda: not dv.faults.pending(), 60, what="the busy account's bulk write to be held")
        lone = wave.create_contact(quiet.account_id, first_name="Lone")
        lone_id = lone["data"]["contact"]["id"]
        sent = time.monotonic()
        assert wave.send([lone]) == [202]
        wait_for(lambda: quiet.row(lone_id), 20, what="the quiet account's contact in Dynamics")
        latency = time.monotonic() - sent
        # it landed while every change of the burst was still waiting
        assert not any(busy.rows(cid) for cid in ids), "the burst was not held"
    finally:
        dv.release_held()
    wait_for(lambda: all(busy.row(cid) for cid in ids), 120, what="every contact of the burst in Dynamics")
    assert latency < 10, latency
    # written in bulk: a few requests for 300 contacts, where the per-contact path made one each
    assert 1 <= len(_bulk_writes(dv, since)) - 1 <= 10  # (one of them the quiet account's)
    per_contact = [r for r in dv.request_log()[since:] if r["method"] == "PATCH" and r["status"] < 300]
    assert per_contact == []
    busy.drained()
    assert busy.status()["counters"]["synced"] == 300 and quiet.status()["counters"]["synced"] == 1
    assert busy.poison()["contact-events-poison"] == 0


def test_a_burst_with_redeliveries_and_reordering_ends_at_each_contacts_newest_version(devhost, identity, wave,
                                                                                       sync_queues, fresh_entra):
    acct = connect_sync_account(devhost, identity, wave, sync_queues)
    rng = random.Random(7)
    created = [wave.create_contact(acct.account_id, first_name="V1", last_name=str(i)) for i in range(60)]
    ids = [e["data"]["contact"]["id"] for e in created]
    events = list(created)
    for cid in ids:
        events += [wave.update_contact(acct.account_id, cid, first_name="V2"),
                   wave.update_contact(acct.account_id, cid, first_name="V3")]
    deleted = ids[:10]
    events += [wave.delete_contact(acct.account_id, cid) for cid in deleted]
    rng.shuffle(events)
    assert set(wave.send(events + rng.sample(events, 40))) == {202}  # 40 delivered twice, all out of order
    wait_for(lambda: all(acct.row(cid) and acct.row(cid)["firstname"] == "V3" for cid in ids[10:]), 120,
             what="every live contact at its newest version")
    acct.drained()
    assert all(acct.rows(cid) == [] for cid in deleted)  # no delete undone by an older update
    assert acct.poison()["contact-events-poison"] == 0


def test_a_change_whose_drain_message_was_never_sent_is_applied_by_the_stalled_drain_timer(
        devhost, identity, wave, sync_queues, fresh_entra, tables):
    acct = connect_sync_account(devhost, identity, wave, sync_queues)
    pending = PendingStore(tables(SNAPSHOTS), tables(DRAINS))
    orphan = wave.create_contact(acct.account_id, first_name="Orphan")
    # What a webhook's process did before it died: the change stored and the marker created, no message sent.
    assert pending.add(acct.account_id, validate_event(orphan).contact, deleted=False, event_id=orphan["id"])
    assert pending.mark(acct.account_id)
    tables(DRAINS).upsert_entity({"PartitionKey": acct.account_id, "RowKey": "marker", "at": "2026-01-01T00:00:00Z"})
    # a later webhook of the account finds the marker and sends nothing either
    later = wave.create_contact(acct.account_id, first_name="Later")
    assert wave.send([later]) == [202]
    assert sync_queues[CONTACT_EVENTS].get_queue_properties().approximate_message_count == 0
    assert acct.row(orphan["data"]["contact"]["id"]) is None
    res = requests.post(f"{devhost.url}/admin/functions/resume_stalled_drains",
                        headers={"x-functions-key": MASTER_KEY}, timeout=60)
    assert res.status_code == 202
    for event in (orphan, later):
        wait_for(lambda e=event: acct.row(e["data"]["contact"]["id"]), 60, what="the stalled changes in Dynamics")
    acct.drained()
    assert pending.read(acct.account_id, 10) == []


class _Connections:
    """A connection store that counts its reads."""

    def __init__(self, conn: Connection | None) -> None:
        self.conn, self.reads = conn, 0

    def get(self, account_id: str) -> Connection | None:
        self.reads += 1
        return self.conn


def test_the_webhook_trusts_a_live_connection_for_a_few_seconds_and_reads_an_absent_one_every_time():
    now = [100.0]
    live = Connection(account_id="acct", state=CONNECTED, generation="g1", instance_url="https://org.crm.dynamics.com")
    store = _Connections(live)
    cache = LiveConnections(store, ttl=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert cache.get("acct").generation == "g1" and cache.get("acct") is not None and store.reads == 1
    now[0] += 5.0  # the TTL ran out: read again, and see the disconnect
    store.conn = Connection(account_id="acct", state=DISCONNECTED, generation="g1")
    assert cache.get("acct") is None and cache.get("acct") is None and store.reads == 3  # absent: never cached
    store.conn = Connection(account_id="acct", state=CONNECTED, generation="g2", instance_url=live.instance_url)
    assert cache.get("acct").generation == "g2"  # a new connection is seen at once
