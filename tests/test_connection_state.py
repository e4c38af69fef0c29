"""Connection rows, sharded counters and failure records against real Azurite tables."""

from __future__ import annotations

import threading
import uuid

import pytest

from core.connections import CONNECTED, Connection, ConnectionStore
from core.errors import ConcurrencyError
from core.failures import FailureStore


def _account() -> str:
    return f"acct_{uuid.uuid4().hex[:12]}"


def test_round_trip_and_optimistic_concurrency(tables):
    store = ConnectionStore(tables("connections"))
    acct = _account()
    conn = store.save(Connection(account_id=acct, state=CONNECTED, generation="g1", auto_sync=True,
                                 instance_url="https://org.crm.dynamics.com"))
    loaded = store.get(acct)
    assert loaded == conn and loaded.accepts("g1") and not loaded.accepts("g0")
    stale = store.get(acct)
    loaded.backfill.state = "running"
    store.save(loaded)
    stale.state = "disconnected"
    with pytest.raises(ConcurrencyError):
        store.save(stale)  # the other writer's change must not be lost
    assert store.get(acct).backfill.state == "running"
    with pytest.raises(ConcurrencyError):
        store.save(Connection(account_id=acct))  # a second insert of the same account


def test_update_retries_until_every_concurrent_writer_lands(tables):
    store = ConnectionStore(tables("connections"))
    acct = _account()
    store.save(Connection(account_id=acct, state=CONNECTED, generation="g"))

    def bump() -> None:
        for _ in range(5):
            store.update(acct, lambda c: setattr(c.backfill, "pages", c.backfill.pages + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(acct).backfill.pages == 20


def test_counters_add_up_across_shards_and_generations(tables):
    store = ConnectionStore(tables("connections"))
    acct = _account()

    def count() -> None:
        for _ in range(10):
            store.add_counts(acct, "g2", synced=1, skipped=1)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.add_counts(acct, "g1", failed=3)
    totals = store.counters(acct, "g2")
    assert (totals.synced, totals.skipped, totals.failed, totals.deleted) == (40, 40, 0, 0)
    assert totals.last_sync_at is not None
    assert store.counters(acct, "g1").failed == 3


def test_failures_count_attempts_and_clear(tables):
    failures = FailureStore(tables("failures"))
    acct = _account()
    failures.record(acct, "c_1", "validation", "lastname is required", version=3)
    second = failures.record(acct, "c_1", "validation", "lastname is required", version=4)
    failures.record(acct, "c_2", "permission", "missing prvAssignContact")
    assert second.attempts == 2 and second.version == 4
    assert {f.contact_id for f in failures.recent(acct)} == {"c_1", "c_2"}
    failures.clear(acct, "c_1")
    failures.clear(acct, "c_404")
    assert [f.contact_id for f in failures.all(acct)] == ["c_2"] and failures.count(acct) == 1
    with pytest.raises(ValueError):
        failures.record(acct, "c_3", "made-up", "x")
