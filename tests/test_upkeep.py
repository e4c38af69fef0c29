"""Daily upkeep of the sync tables (sync/upkeep.py) against Azurite: expired owner-cache rows
go, fresh ones and rows renewed meanwhile stay."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from azure.data.tables import UpdateMode

from core.storage import delete_expired
from sync.owners import TABLE as OWNERS
from sync.upkeep import purge_expired_rows
from tests.fixtures.stack import MASTER_KEY

NOW = datetime(2026, 11, 27, 3, 47, tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rows(table, account: str) -> set[str]:
    return {e["RowKey"] for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": account})}


def test_expired_owner_cache_rows_are_deleted_and_fresh_ones_kept(tables) -> None:
    account = f"acct_u_{uuid.uuid4().hex[:8]}"
    owners = tables(OWNERS)
    for i in range(150):  # more than one transaction's worth in one partition
        owners.create_entity({"PartitionKey": account, "RowKey": f"old_{i}",
                              "expires_at": _iso(NOW - timedelta(minutes=i + 1))})
    owners.create_entity({"PartitionKey": account, "RowKey": "new", "expires_at": _iso(NOW + timedelta(minutes=5))})

    removed = purge_expired_rows(tables, NOW)

    assert removed[OWNERS] >= 150  # other tests' expired rows may go too
    assert _rows(owners, account) == {"new"}
    assert purge_expired_rows(tables, NOW) == {OWNERS: 0}


class RenewsAfterListing:
    """A table whose listing is followed, before any delete, by another writer renewing one row."""

    def __init__(self, table, renew: dict[str, Any]) -> None:
        self.table, self.renew = table, renew

    def query_entities(self, *args: Any, **kwargs: Any) -> list[Any]:
        rows = list(self.table.query_entities(*args, **kwargs))
        self.table.update_entity(self.renew, mode=UpdateMode.REPLACE)
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)


def test_a_row_renewed_between_listing_and_delete_stays(tables) -> None:
    account = "acct_u"
    table = tables(f"upkeep{uuid.uuid4().hex[:12]}")  # a table of this test's rows only
    for i in range(5):
        table.create_entity({"PartitionKey": account, "RowKey": f"e{i}", "expires_at": _iso(NOW - timedelta(days=1))})
    renewed = {"PartitionKey": account, "RowKey": "e2", "expires_at": _iso(NOW + timedelta(days=7))}
    assert delete_expired(RenewsAfterListing(table, renewed), _iso(NOW)) == 4  # type: ignore[arg-type]
    assert _rows(table, account) == {"e2"}



def test_the_daily_timer_is_wired_and_purges_through_the_dev_host(devhost, tables) -> None:
    account = f"acct_u_{uuid.uuid4().hex[:8]}"
    owners = tables(OWNERS)
    owners.create_entity({"PartitionKey": account, "RowKey": "gone", "expires_at": "2020-01-01T00:00:00Z"})
    owners.create_entity({"PartitionKey": account, "RowKey": "kept", "expires_at": "2999-01-01T00:00:00Z"})
    resp = requests.post(f"{devhost.url}/admin/functions/purge_expired_sync_rows",
                         headers={"x-functions-key": MASTER_KEY}, timeout=60)
    assert resp.status_code == 202
    assert _rows(owners, account) == {"kept"}
