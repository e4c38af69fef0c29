"""Contact states in Table Storage (sync/state.py) against Azurite: an account's states are spread over
STATE_BUCKETS partitions, and every way of reading and writing them finds them there."""

from __future__ import annotations

import uuid

from sync.state import STATE, STATE_BUCKETS, ContactState, ContactStateStore, state_partition


def test_states_spread_over_buckets_and_are_found_by_every_read(tables) -> None:
    table = tables(STATE)
    store = ContactStateStore(table)
    account = f"acct_s_{uuid.uuid4().hex[:8]}"
    ids = sorted(f"c_{i:05d}" for i in range(300))  # one page of a listing sorted by id
    assert store.save_many([ContactState(account, cid, f"dyn-{cid}", 1, "h1", last_result="synced")
                            for cid in ids]) == []

    rows = list(table.query_entities("PartitionKey ge @lo and PartitionKey lt @hi",
                                     parameters={"lo": f"{account}~", "hi": f"{account}~~"}))
    partitions = {r["PartitionKey"] for r in rows}
    assert len(rows) == 300 and partitions == {f"{account}~{b}" for b in range(STATE_BUCKETS)}
    assert all(r["PartitionKey"] == state_partition(account, r["RowKey"]) for r in rows)

    for adjacent in (True, False):
        found = store.get_many(account, ids[40:260], adjacent=adjacent)
        assert sorted(found) == ids[40:260]
        assert {s.account_id for s in found.values()} == {account} and found[ids[40]].dynamics_id == f"dyn-{ids[40]}"
    one = store.get(account, ids[7])
    assert one is not None and (one.account_id, one.version) == (account, 1)
    assert store.get(f"{account}x", ids[7]) is None  # another account's partitions

    # Writers of one contact still notice each other across the buckets: a stale ETag conflicts.
    stale = store.get_many(account, ids[:150], adjacent=True)
    fresh = store.get(account, ids[3])
    fresh.version = 2
    store.save(fresh)
    for state in stale.values():
        state.version = 3
    conflicts = store.save_many(list(stale.values()))
    assert [c.contact_id for c in conflicts] == [ids[3]]
    assert store.get(account, ids[3]).version == 2 and store.get(account, ids[4]).version == 3


VERSIONS = (2**31 - 1, 2**31, 2**53)  # the last Int32, the first beyond it, the largest Wave sends


def test_versions_up_to_2_53_are_stored_and_read_back_exactly_in_every_table(tables) -> None:
    from core.failures import FailureStore
    from sync.state import SNAPSHOTS, SnapshotStore

    account = f"acct_v_{uuid.uuid4().hex[:8]}"
    states, snapshots, failures = ContactStateStore(tables(STATE)), SnapshotStore(tables(SNAPSHOTS)), \
        FailureStore(tables("failures"))
    ids = [f"c_{i}" for i in range(len(VERSIONS))]
    expected = dict(zip(ids, VERSIONS, strict=True))
    # one by one (save) and in a transaction (save_many, the backfill's plain-text changeset)
    states.save(ContactState(account, ids[0], version=VERSIONS[0]))
    assert states.save_many([ContactState(account, cid, version=expected[cid]) for cid in ids[1:]]) == []
    for cid, version in expected.items():
        got = states.get(account, cid)
        assert got is not None and got.version == version and type(got.version) is int
        assert snapshots.put_if_newer(account, {"id": cid, "version": version}, deleted=False, event_id="e")
        assert not snapshots.put_if_newer(account, {"id": cid, "version": version - 1}, deleted=False, event_id="e")
        assert snapshots.get(account, cid).version == version
        assert failures.record(account, cid, "validation", "r", version=version).version == version
    assert {s.contact_id: s.version for s in states.get_many(account, ids, adjacent=True).values()} == expected
    assert snapshots.versions(account, ids) == expected
    assert {f.contact_id: f.version for f in failures.all(account)} == expected
    # 2**53 + 1 is not a float: it survives as exactly one more than 2**53
    assert snapshots.put_if_newer(account, {"id": ids[2], "version": 2**53 + 1}, deleted=False, event_id="e")
    assert snapshots.get(account, ids[2]).version == 2**53 + 1


def test_a_row_written_as_int32_before_compares_with_an_int64_version(tables) -> None:
    from sync.state import SNAPSHOTS, SnapshotStore

    account = f"acct_v_{uuid.uuid4().hex[:8]}"
    # rows as the code before Int64 wrote them: a plain int, stored as Edm.Int32
    tables(SNAPSHOTS).create_entity({"PartitionKey": account, "RowKey": "c_old", "version": 7, "deleted": False,
                                     "event_id": "e", "chunks": 1, "data0": b'{"id":"c_old","version":7}'})
    tables(STATE).create_entity({"PartitionKey": state_partition(account, "c_old"), "RowKey": "c_old",
                                 "version": 7, "deleted": False})
    states, snapshots = ContactStateStore(tables(STATE)), SnapshotStore(tables(SNAPSHOTS))
    old = states.get(account, "c_old")
    assert old.version == 7 and snapshots.versions(account, ["c_old"]) == {"c_old": 7}
    assert not snapshots.put_if_newer(account, {"id": "c_old", "version": 6}, deleted=False, event_id="e")
    assert snapshots.put_if_newer(account, {"id": "c_old", "version": 2**31}, deleted=False, event_id="e")
    old.version = 2**31  # replacing the Int32 row with an Int64 one, ETag-conditional as ever
    states.save(old)
    assert states.get(account, "c_old").version == 2**31 and snapshots.get(account, "c_old").version == 2**31
