"""core/tables.py's shortcuts against the pinned azure-data-tables and Azurite.

`submit_changeset` sends a hand-built `$batch`, and `insert_row` / `row_exists` (the webhook's two calls) a
plain insert and point read, through the SDK's private `TableClient._client`; these tests fail when an
upgrade of the SDK removes or changes what they use (so the change is seen, not silently slower), and show
that the fallback through the SDK's own calls writes and reads the same rows."""

from __future__ import annotations

import inspect
import re
import uuid
from pathlib import Path

import azure.data.tables
import pytest
from azure.data.tables import TableClient

from core.storage import Tables, int64, read_int
from core.tables import ChangesetFailed, etag_of, fast_path_available, insert_row, row_exists, submit_changeset

ROOT = Path(__file__).resolve().parent.parent


class WithoutPrivateClient:
    """A TableClient as a newer SDK might have it: everything public, no `_client`."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def __getattr__(self, name: str) -> object:
        if name == "_client":
            raise AttributeError(name)
        return getattr(self._table, name)


@pytest.fixture
def table(tables: Tables) -> TableClient:
    return tables("txcontract")


def test_the_sdk_is_the_pinned_version_with_the_private_shape_the_shortcut_uses(table: TableClient) -> None:
    pinned = re.search(r"^azure-data-tables==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and azure.data.tables.__version__ == pinned.group(1)
    assert fast_path_available(table)
    send = inspect.signature(table._client.send_request)
    assert next(iter(send.parameters)) == "request"  # send_request(request, *, stream=..., **kwargs)
    assert isinstance(table.api_version, str) and table.table_name == "txcontract"


@pytest.mark.parametrize("shape", ["private", "sdk"])
def test_a_transaction_round_trips_and_a_conflict_applies_nothing(table: TableClient, shape: str) -> None:
    target = table if shape == "private" else WithoutPrivateClient(table)
    assert fast_path_available(target) is (shape == "private")  # type: ignore[arg-type]
    pk = f"p{uuid.uuid4().hex}"
    rows = [{"PartitionKey": pk, "RowKey": f"r{i}", "name": f"n'{i}/#?", "big": int64(2**53), "small": i,
             "flag": True} for i in range(3)]
    submit_changeset(target, [("create", r, None) for r in rows])  # type: ignore[arg-type]
    stored = {e["RowKey"]: e for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": pk})}
    assert sorted(stored) == ["r0", "r1", "r2"]
    assert stored["r1"]["name"] == "n'1/#?" and read_int(stored["r1"]["big"]) == 2**53 and stored["r1"]["small"] == 1

    first = stored["r0"]
    submit_changeset(target, [("replace", {**rows[0], "name": "renamed"}, etag_of(first))])  # type: ignore[arg-type]
    assert table.get_entity(pk, "r0")["name"] == "renamed"

    # the ETag read before the rename no longer matches: the whole transaction is refused
    with pytest.raises(ChangesetFailed):
        submit_changeset(target, [("replace", {**rows[1], "name": "lost"}, etag_of(stored["r1"])),  # type: ignore[arg-type]
                                  ("replace", {**rows[0], "name": "stale"}, etag_of(first))])
    assert table.get_entity(pk, "r1")["name"] == "n'1/#?" and table.get_entity(pk, "r0")["name"] == "renamed"

    with pytest.raises(ChangesetFailed):  # a create of a row that exists
        submit_changeset(target, [("create", rows[2], None)])  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", ["private", "sdk"])
def test_upserts_deletes_and_binary_properties_in_one_transaction(table: TableClient, shape: str) -> None:
    """What the live lane's drain sends (sync/pending.py settle): a snapshot upserted with its binary chunks
    and pending rows deleted, all or nothing."""
    target = table if shape == "private" else WithoutPrivateClient(table)
    pk = f"p{uuid.uuid4().hex}"
    table.create_entity({"PartitionKey": pk, "RowKey": "~p~c1~1", "v": 1})
    table.create_entity({"PartitionKey": pk, "RowKey": "c1", "v": 0})
    data = "\U0001F600 ünïcode".encode() + bytes(range(256))
    submit_changeset(target, [("upsert", {"PartitionKey": pk, "RowKey": "c1", "data0": data}, None),  # type: ignore[arg-type]
                              ("upsert", {"PartitionKey": pk, "RowKey": "c2", "data0": b""}, None),
                              ("delete", {"PartitionKey": pk, "RowKey": "~p~c1~1"}, None)])
    rows = {e["RowKey"]: e for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": pk})}
    assert sorted(rows) == ["c1", "c2"] and bytes(rows["c1"]["data0"]) == data and "v" not in rows["c1"]
    with pytest.raises(ChangesetFailed):  # deleting a row that is gone refuses the whole transaction
        submit_changeset(target, [("upsert", {"PartitionKey": pk, "RowKey": "c3", "x": 1}, None),  # type: ignore[arg-type]
                                  ("delete", {"PartitionKey": pk, "RowKey": "~p~c1~1"}, None)])
    assert "c3" not in {e["RowKey"] for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": pk})}


@pytest.mark.parametrize("shape", ["private", "sdk"])
def test_an_insert_stores_what_the_sdk_would_and_a_second_one_changes_nothing(table: TableClient, shape: str
                                                                              ) -> None:
    """A webhook's pending change (sync/pending.py add): inserted once; the same keys again are refused
    (a duplicate) and leave the first row as it was."""
    target = table if shape == "private" else WithoutPrivateClient(table)
    pk = f"p{uuid.uuid4().hex}"
    data = "\U0001F600 ünïcode".encode() + bytes(range(256))
    row = {"PartitionKey": pk, "RowKey": "~p~c'1 é~0000000000000007", "version": int64(2**53), "deleted": False,
           "event_id": "evt_1", "chunks": 1, "data0": data}
    assert insert_row(target, row) is True  # type: ignore[arg-type]
    assert insert_row(target, {**row, "event_id": "evt_2", "deleted": True}) is False  # type: ignore[arg-type]
    stored = table.get_entity(pk, row["RowKey"])
    assert read_int(stored["version"]) == 2**53 and stored["deleted"] is False and stored["event_id"] == "evt_1"
    assert stored["chunks"] == 1 and bytes(stored["data0"]) == data

    reference = {**row, "PartitionKey": pk + "sdk"}
    table.create_entity(reference)
    by_sdk = table.get_entity(reference["PartitionKey"], reference["RowKey"])
    assert {k: (type(v), v) for k, v in stored.items() if k != "PartitionKey"} == \
        {k: (type(v), v) for k, v in by_sdk.items() if k != "PartitionKey"}


@pytest.mark.parametrize("shape", ["private", "sdk"])
def test_a_point_read_says_whether_the_row_exists(table: TableClient, shape: str) -> None:
    target = table if shape == "private" else WithoutPrivateClient(table)
    pk = f"p{uuid.uuid4().hex}"
    assert row_exists(target, pk, "marker") is False  # type: ignore[arg-type]
    table.create_entity({"PartitionKey": pk, "RowKey": "marker", "at": "2026-12-01T08:00:00Z"})
    assert row_exists(target, pk, "marker") is True  # type: ignore[arg-type]
    assert row_exists(target, pk, "marker'é") is False  # type: ignore[arg-type]
    table.delete_entity(pk, "marker")
    assert row_exists(target, pk, "marker") is False  # type: ignore[arg-type]
