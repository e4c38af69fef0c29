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
